import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import CHAT_TEMPLATE, tiny_llama_config, tiny_model
from nanopr1 import UsageError
from nanopr1.format import PARALLEL_PROMPT, TAGS, chat_prompt_ids
from nanopr1.model import add_tags, apply_lora, load_model, tag_ids, tiny_qwen3_config


def plain_tokenizer():
    """A BPE tokenizer without the tags (like a fresh Qwen3 checkpoint)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Path Parallel Summary paths in parallel, a summary"] * 10, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    t.chat_template = CHAT_TEMPLATE
    return t


@pytest.mark.parametrize("make,padded_rows", [(tiny_qwen3_config, 16), (tiny_qwen3_config, 0), (tiny_llama_config, 0)])
def test_add_tags_ids_order_and_mean_init(make, padded_rows):
    tokenizer = plain_tokenizer()
    n = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make(n + padded_rows))  # Qwen3 pads its vocabulary; try both
    pieces = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in TAGS}
    assert all(len(p) > 1 for p in pieces.values())
    emb_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()

    assert add_tags(model, tokenizer) == list(TAGS)
    ids = tag_ids(tokenizer)
    assert [ids[t] for t in TAGS] == list(range(n, n + 6))  # official order, consecutive
    assert model.get_input_embeddings().weight.shape[0] == max(n + 6, n + padded_rows)
    for t in TAGS:  # one token each, and initialised to the mean of its pieces
        assert tokenizer(t, add_special_tokens=False)["input_ids"] == [ids[t]]
        emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        torch.testing.assert_close(emb[ids[t]], emb_before[pieces[t]].mean(0))
        torch.testing.assert_close(out[ids[t]], (emb_before if make is tiny_qwen3_config else out_before)[pieces[t]].mean(0))
    assert len(set(tuple(model.get_input_embeddings().weight[ids[t]].tolist()) for t in TAGS)) == 6

    # adding twice changes nothing: same ids, same weights, same vocabulary size
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert add_tags(model, tokenizer) == []
    assert tag_ids(tokenizer) == ids and len(tokenizer) == n + 6
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_save_load_round_trip_identical_logits(tmp_path, bpe_tokenizer):
    model = tiny_model(bpe_tokenizer)
    model.save_pretrained(tmp_path)
    bpe_tokenizer.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path))
    assert tag_ids(tokenizer) == tag_ids(bpe_tokenizer)
    ids = torch.tensor([chat_prompt_ids(tokenizer, PARALLEL_PROMPT, "What is 3 + 4?")])
    assert ids.tolist() == [chat_prompt_ids(bpe_tokenizer, PARALLEL_PROMPT, "What is 3 + 4?")]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="no such model directory"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="could not be loaded"):
        load_model("no-such-org/no-such-model-xyz")


def test_tokenizer_without_chat_template_is_a_clear_error():
    tokenizer = plain_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(UsageError, match="has no chat template"):
        chat_prompt_ids(tokenizer, PARALLEL_PROMPT, "2+2")


def test_lora_trains_only_adapters_and_tag_rows(bpe_tokenizer):
    model = apply_lora(tiny_model(bpe_tokenizer), r=4, alpha=8, train_tokens=list(tag_ids(bpe_tokenizer).values()))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    lora = [n for n in trainable if "lora_" in n]
    tokens = [n for n in trainable if "trainable_tokens" in n]
    assert len(lora) == 7 * 2 * 2  # one (A, B) pair per targeted projection, 7 projections x 2 layers
    assert len(tokens) == 1 and trainable[tokens[0]] == 6 * 64  # the six tag rows, nothing else
    assert len(trainable) == len(lora) + len(tokens)


def test_a_lora_model_saves_merged_without_copying_it(bpe_tokenizer, tmp_path, monkeypatch):
    """model.save of a peft model writes the merged weights one tensor at a time on the CPU (the old save
    deep-copied the whole model on its device: +8 GB at 4B at every checkpoint): the saved model's logits
    equal the adapted model's."""
    import copy
    from nanopr1.model import save_model
    model = apply_lora(tiny_model(bpe_tokenizer), r=4, alpha=8, train_tokens=list(tag_ids(bpe_tokenizer).values()))
    with torch.no_grad():
        for name, q in model.named_parameters():
            if "lora_B" in name or "trainable_tokens" in name:
                q.normal_(0, 0.1)  # the adapters as after training (B starts at zero)
    deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: pytest.fail("the model was copied")
                        if isinstance(x, torch.nn.Module) else deepcopy(x, *a))
    save_model(model, bpe_tokenizer, tmp_path / "merged")
    monkeypatch.undo()
    ids = torch.tensor([[5, 6, 7, *tag_ids(bpe_tokenizer).values(), 8]])
    loaded, _ = load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
