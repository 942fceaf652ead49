import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import CHAT_TEMPLATE, tiny_llama_config, tiny_model
from reference_cache import reference_cache
from test_kvcache import assert_same
from test_sampler import prompts_of
from nanopr1 import UsageError, scoring
from nanopr1.format import PARALLEL_PROMPT, TAGS, chat_prompt_ids, tag_ids
from nanopr1.kvcache import KVCache
from nanopr1.model import (add_tags, apply_lora, load_model, lora_layers, refresh_copy, sampling_copy,
                           save_model, tiny_qwen3_config)
from nanopr1.sampler import sample


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


def bf16_twin(model):
    """`model` in bf16 as load_model(..., "bfloat16") makes it (model.to() would round the rotary buffers)."""
    twin = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16, attn_implementation="sdpa")
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@torch.no_grad()
def lora_step(model, std, seed=2):
    """lora_B as after a step (it starts at zero): entries of about `std`."""
    g = torch.Generator().manual_seed(seed)
    for name, q in model.named_parameters():
        if "lora_B" in name:
            q.copy_(torch.randn(q.shape, generator=g) * std)


@torch.no_grad()
def test_a_bf16_lora_sampling_copy_computes_what_the_trainer_computes(bpe_tokenizer):
    """After a LoRA step of a training step's size (lora_B ~ 1e-4) the bf16 sampling copy's log-probs equal
    the trainer's at least as closely as a full fine-tune's bf16 copy does, and move as the trainer's move.
    The trainers run under bf16 autocast, as accelerate's mixed precision runs them on a GPU. (The old
    copy merged the adapters into its bf16 weights: most of the step rounded away, cosine 0.53.)"""
    tok = bpe_tokenizer
    fp32 = tiny_model(tok)
    lora = apply_lora(bf16_twin(fp32), r=8, alpha=16)
    ids = torch.randint(10, len(tok), (4, 48), generator=torch.Generator().manual_seed(1))

    def logprobs(model, trainer=False):  # (4, 39) teacher-forced log-probs; the trainer under bf16 autocast
        with torch.autocast("cpu", torch.bfloat16, enabled=trainer):
            return scoring.token_logprobs(model, {"input_ids": ids}, first=8)

    copy_ = sampling_copy(lora, torch.bfloat16, "cpu")
    refresh_copy(copy_, lora)
    trainer0, sampler0 = logprobs(lora, True), logprobs(copy_)
    lora_step(lora, 1e-4)
    refresh_copy(copy_, lora)
    trainer, sampler = logprobs(lora, True), logprobs(copy_)
    # the full fine-tune: the same step taken by the fp32 weights, sampled from their bf16 copy
    weights = dict(fp32.named_parameters())
    for name, m, a in lora_layers(lora):
        weights[name.removeprefix("base_model.model.") + ".weight"] += (
            m.lora_B[a].weight.float() @ m.lora_A[a].weight.float() * m.scaling[a])
    full_copy = sampling_copy(fp32, torch.bfloat16, "cpu")
    refresh_copy(full_copy, fp32)
    full_gap = (logprobs(full_copy) - logprobs(fp32, True)).abs().mean()
    assert (trainer - trainer0).abs().mean() > 1e-4 and full_gap > 1e-4  # the step, the bf16 error: real
    moved, trained = (sampler - sampler0).flatten(), (trainer - trainer0).flatten()
    cosine = torch.nn.functional.cosine_similarity(moved, trained, 0)
    assert cosine >= 0.95  # the sampler's log-probs move as the trainer's do
    assert (sampler - trainer).abs().mean() <= full_gap


def test_a_bf16_lora_model_saves_in_bf16(bpe_tokenizer, tmp_path):
    """A saved LoRA model dir keeps the base's dtype: W + B A * scaling summed in fp32, rounded once to
    bf16 (the adapted weights came out fp32 beside bf16 ones)."""
    from safetensors.torch import load_file
    tok = bpe_tokenizer
    lora = apply_lora(bf16_twin(tiny_model(tok)), r=4, alpha=8, train_tokens=list(tag_ids(tok).values()))
    lora_step(lora, 0.1)
    save_model(lora, tok, tmp_path / "merged")
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert {w.dtype for w in saved.values()} == {torch.bfloat16}
    q = lora.get_base_model().model.layers[0].self_attn.q_proj
    delta = q.lora_B.default.weight @ q.lora_A.default.weight * q.scaling["default"]  # fp32 adapters
    merged = q.base_layer.weight.float() + delta
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], merged.bfloat16())


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_a_lora_copy_refreshes_in_place_under_captured_decode_steps(bpe_tokenizer, variant):
    """The copy's adapters are refreshed in place: decode steps captured before a refresh (graphs.CpuGraph,
    which raises if a tensor it reads was freed) sample from the new adapters, as the trained model does."""
    tok, prompts = bpe_tokenizer, prompts_of(bpe_tokenizer)
    lora = apply_lora(tiny_model(tok), r=4, alpha=8)
    copy_ = sampling_copy(lora, torch.float32, "cpu")
    kv = KVCache(32, max(map(len, prompts)) + 41, "cpu", use_graphs=True)  # the captured step, as on a GPU
    kw = dict(temperature=0, max_new_tokens=40, variant=variant, force_block=3)
    refresh_copy(copy_, lora)
    before = sample(copy_, tok, prompts, 2, cache=kv, **kw)
    captured = dict(kv.captured.graphs)
    lora_step(lora, 0.3)
    refresh_copy(copy_, lora)
    after = sample(copy_, tok, prompts, 2, cache=kv, **kw)
    assert captured and all(kv.captured.graphs[k] is g for k, g in captured.items())  # the same captures replayed
    assert_same(sample(lora.get_base_model(), tok, prompts, 2, cache=reference_cache(), **kw), after)
    assert [r.ids for r in after] != [r.ids for r in before]  # the step changed the policy
