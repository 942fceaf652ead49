import json
import math
from pathlib import Path

import pytest
import torch

from conftest import build_bpe_tokenizer, init_toy_dir, run, shared_file, tiny_model
from nanopr1 import data, format, toy
from nanopr1.scoring import collate, sequence_nll
from nanopr1.attention import build_inputs, find_blocks
from nanopr1.format import tag_ids
from nanopr1.checkpoint import model_dir
from nanopr1.model import load_model

ROOT = Path(__file__).resolve().parents[1]

RESPONSES = [  # real-layout responses: main text, blocks of 2 and 3 paths, paths of unequal length
    "First, 3 + 4 = 7.<Parallel><Path>Multiply: 7 * 2 = 14.</Path><Path>Add twice: 7 + 7 = 14, the same.</Path>"
    "</Parallel><Summary>Both give 14.</Summary>\nFinal Answer: 14",
    "Let x be the cats.<Parallel><Path>x = 4</Path><Path>Legs: 2 + x = 6, so x = 4.</Path><Path>Guess 4.</Path>"
    "</Parallel><Summary>x = 4</Summary>Then<Parallel><Path>4 + 2</Path><Path>6</Path></Parallel>"
    "<Summary>6 in all</Summary>\nFinal Answer: 6",
    "No block here, just 5.\nFinal Answer: 5",
]
QUESTIONS = ["What is (3 + 4) * 2?", "How many cats?", "What is 5?"]


def examples(tokenizer, responses=RESPONSES, questions=QUESTIONS):
    rows = [{"question": q, "response": r} for q, r in zip(questions, responses)]
    ex, dropped = data.sft_examples(rows, tokenizer, format.PARALLEL_PROMPT, max_len=4096)
    assert not dropped
    return ex


def path_alone_logits(model, tags, prompt, response, block, path):
    """Reference: encode what precedes the block (earlier blocks with their own Unseen
    layout), then <Parallel> + this one path alone through the KV cache, plain causal."""
    pre = build_inputs([prompt], [response[:block.parallel]], tags, "unseen", 0)
    out = model(**pre, use_cache=True)
    new = [response[block.parallel]] + response[path[0]:path[1]]
    start = int(pre["position_ids"][0, -1]) + 1
    L = pre["input_ids"].shape[1]
    mask = torch.ones(1, 1, len(new), L + len(new), dtype=torch.bool)
    mask[0, 0, :, L:] = torch.ones(len(new), len(new)).tril().bool()
    logits = model(input_ids=torch.tensor([new]), position_ids=torch.arange(start, start + len(new))[None],
                   attention_mask=mask, cache=getattr(out, "cache", None) or out.past_key_values).logits
    return logits[0, 1:]  # at the path's tokens


def test_unseen_forward_equals_each_path_alone(bpe_tokenizer):
    """Every path token's logits in one masked forward of the whole padded batch equal a
    separate forward of what precedes its block + that path alone (fp32, <= 1e-4)."""
    model, tags = tiny_model(bpe_tokenizer), tag_ids(bpe_tokenizer)
    ex = examples(bpe_tokenizer)
    batch, _ = collate(ex, tags, "unseen", bpe_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, V)
        checked = 0
        for b, (prompt, response) in enumerate(ex):
            for block in find_blocks(response, tags):
                for s, e in block.paths:
                    ref = path_alone_logits(model, tags, prompt, response, block, (s, e))
                    got = logits[b, len(prompt) + s:len(prompt) + e]
                    assert (got - ref).abs().max() <= 1e-4
                    checked += e - s
                if block.parallel == 0:  # a first block: the plain prefix + path is the same reference
                    alone = torch.tensor([prompt + response[:1] + response[s:e]])
                    torch.testing.assert_close(model(alone).logits[0, len(prompt) + 1:], ref, atol=1e-4, rtol=0)
    assert checked > 40


def test_padded_batch_loss_equals_unpadded_singles(bpe_tokenizer):
    model, tags = tiny_model(bpe_tokenizer), tag_ids(bpe_tokenizer)
    ex = examples(bpe_tokenizer)
    assert len({len(p) + len(r) for p, r in ex}) == 3  # lengths differ: the batch is padded
    with torch.no_grad():
        for variant in ("seen", "unseen"):
            together = sequence_nll(model, *collate(ex, tags, variant, bpe_tokenizer.pad_token_id))
            alone = torch.cat([sequence_nll(model, *collate([e], tags, variant, 0)) for e in ex])
            torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)
        # the unseen loss differs from the seen one exactly where a block is
        seen = sequence_nll(model, *collate(ex, tags, "seen", 0))
        assert (seen - together)[:2].abs().min() > 1e-3 and (seen - together)[2].abs() < 1e-4


def test_loss_mask_is_exactly_the_response_with_eos(bpe_tokenizer):
    ex = examples(bpe_tokenizer)
    batch, mask = collate(ex, tag_ids(bpe_tokenizer), "seen", bpe_tokenizer.pad_token_id)
    targets = batch["input_ids"][:, 1:]  # token t+1 is predicted at t
    for b, (prompt, response) in enumerate(ex):
        assert targets[b][mask[b]].tolist() == response and response[-1] == bpe_tokenizer.eos_token_id
        assert mask[b].sum() == len(response)


def test_malformed_and_long_traces_are_dropped_and_counted(bpe_tokenizer):
    rows = [{"question": "q", "response": RESPONSES[0]},
            {"question": "q", "response": "<Parallel><Path>a</Path></Parallel><Summary>s</Summary>"},
            {"question": "q", "response": "x <Parallel><Path>a</Path><Path>b</Path>"},
            {"question": "q", "response": "word " * 3000}]
    ex, dropped = data.sft_examples(rows, bpe_tokenizer, format.PARALLEL_PROMPT, max_len=1024)
    assert len(ex) == 1
    assert dropped == {"the block has 1 path(s)": 1, "expected </Parallel> after its last path": 1,
                       "longer than --max-len 1024": 1}  # the token parser's reasons, by kind


def test_real_teacher_traces_become_training_examples():
    """The 341 real traces with a BPE trained offline on them: which survive (those whose tag tokens
    are well formed), and that each survivor's tags are found, its loss mask is the response, its
    prompt is never parsed."""
    from nanopr1.rollout import make_rollout, texts
    rows = [json.loads(line) for line in open(shared_file("parallel_gsm8k_sample.jsonl"), encoding="utf-8")]
    tokenizer = build_bpe_tokenizer([r["question"] + "\n" + r["response"] for r in rows], vocab_size=2000)
    tags = tag_ids(tokenizer)
    ex, dropped = data.sft_examples(rows, tokenizer, format.PARALLEL_PROMPT, max_len=4096)
    assert len(ex) == 339 and sum(dropped.values()) == 2  # the 2 malformed traces (see test_format)
    short, _ = data.sft_examples(rows, tokenizer, format.PARALLEL_PROMPT, max_len=1024)
    assert 0 < len(short) < len(ex)  # the length filter drops whole sequences
    tag_set = set(tags.values())
    prompt_tags = 0
    texts_of = [format.normalize(r["response"]) for r in rows]
    rollouts = [make_rollout(tokenizer, [], tokenizer(t, add_special_tokens=False)["input_ids"], "budget")
                for t in texts_of]
    kept = [(t, r) for t, r in zip(texts_of, rollouts) if r.format_error is None]
    for (prompt, response), (text, r) in zip(ex, kept):
        assert response == r.ids + [tokenizer.eos_token_id]
        blocks = find_blocks(response, tags)
        in_text = [seg.split("</Parallel>")[0].count("<Path>") for seg in text.split("<Parallel>")[1:]]
        assert [len(b.paths) for b in blocks] == in_text  # the paths of each block of the text
        for block in texts(r, tokenizer)["blocks"]:  # every path span decodes to a path of the text
            assert all(f"<Path>{p}</Path>" in text for p in block["paths"])
        prompt_tags += sum(t in tag_set for t in prompt)
    assert prompt_tags > 0  # the instruction names the tags: the prompt does hold tag tokens...
    batch, mask = collate(ex[:4], tags, "unseen", tokenizer.pad_token_id)
    targets = batch["input_ids"][:, 1:]
    for b, (prompt, response) in enumerate(ex[:4]):  # ...yet is numbered 0..P-1, plain causal
        assert batch["position_ids"][b, :len(prompt)].tolist() == list(range(len(prompt)))
        assert batch["attention_mask"][b, 0, :len(prompt), :len(prompt)].equal(torch.ones(len(prompt), len(prompt)).tril().bool())
        assert targets[b][mask[b]].tolist() == response


def run_sft(out, *extra, procs=1, kill=None):
    """A toy SFT run: 6 steps (--max-steps) of one 8-step epoch (batch 8 of 64 examples), checkpoints at 3 and 6;
    kill: run under tests/kill.py with this kill point (the run must die: SIGKILL)."""
    toy_data = out.parent / "toy.jsonl"
    if not toy_data.exists():
        toy_data.write_text("".join(json.dumps(r) + "\n" for r in toy.sft_corpus(64, seed=1)))
    args = ["--preset", "toy", "--data", str(toy_data), "--out", str(out), "--batch-size", "8",
            "--micro-batch-tokens", "300", "--epochs", "1", "--max-steps", "6", "--save-every", "3", *extra]
    if kill:
        proc = run(ROOT / "tests" / "kill.py", kill, "train_sft.py", *args, check=False)
        assert proc.returncode == -9, proc.stderr[-2000:]
        log = proc.stdout
    else:
        log = run(ROOT / "train_sft.py", *args, procs=procs).stdout
    assert f"{procs} process" in log  # the world size the run saw
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def schedule(lr, steps, warmup):
    """train_sft.py's LR at each step: linear warm-up over int(warmup * steps) steps (at least 1), then cosine
    towards 0 over the rest (not 0 at the last step: it would train nothing), the scheduler stepped once per
    step (the logged lr is the one the step used)."""
    warm = max(1, int(warmup * steps))
    return [lr * min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * max(0, s + 1 - warm) / (steps - warm + 1))))
            for s in range(steps)]


def test_max_steps_sets_the_schedule(tmp_path):
    """--max-steps 6 (of 3 epochs of 8 steps) is the schedule's length, as in HF Trainer: a 3-step warm-up,
    then cosine towards 0 at step 6 (the schedule no longer spans the epochs: 1e-4/72, 2e-4/72, ...)."""
    rows = run_sft(tmp_path / "ms", "--lr", "1e-4", "--warmup", "0.5", "--epochs", "3")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    cosine = [(2 + 2 ** 0.5) / 4, 1 / 2, (2 - 2 ** 0.5) / 4]  # 0.5 (1 + cos(pi k / 4)), k = 1, 2, 3
    assert [r["lr"] for r in rows] == pytest.approx([1e-4 / 3, 2e-4 / 3, 1e-4] + [1e-4 * c for c in cosine], rel=1e-9)
    assert [r["lr"] for r in rows] == pytest.approx(schedule(1e-4, 6, 0.5), rel=1e-9, abs=1e-18)
    assert sorted(p.name for p in (tmp_path / "ms").glob("checkpoint-*")) == ["checkpoint-000006"]  # keep 1


def test_resume_and_two_processes_reproduce_the_run(tmp_path):
    """6 steps (micro-batches of ~2 sequences): the LR follows the 6-step schedule exactly (warm-up 1 step,
    then cosine over 6, stepped once per step); a run SIGKILLed right after logging step 4 (its checkpoint is
    step 3's) then resumed, and a run on two real processes (torchrun, gloo), reproduce the losses, the LR
    sequence and the weights of the uninterrupted single-process run."""
    w = lambda d: torch.cat([q.flatten() for q in load_model(model_dir(d))[0].state_dict().values()])
    full = run_sft(tmp_path / "full")
    lr = schedule(3e-3, 6, 0.04)  # the toy preset's --lr and --warmup
    assert lr[0] == 3e-3 and 0 < lr[-1] < 1e-3 and all(a > b for a, b in zip(lr, lr[1:]))
    assert [r["lr"] for r in full] == pytest.approx(lr, rel=1e-9, abs=1e-18)
    assert len(full) == 6 and full[-1]["loss"] < full[0]["loss"]
    # killed after the row of step 4 (the checkpoint is step 3's), then resumed: the same later losses
    part = run_sft(tmp_path / "part", kill="step=4")
    assert [r["step"] for r in part] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "part").glob("checkpoint-*")) == ["checkpoint-000003"]
    at_3 = w(tmp_path / "part")
    resumed = run_sft(tmp_path / "part", "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed[:3] == part[:3]  # the log goes on where the checkpoint was taken: step 4 is redone once
    assert resumed[3]["loss"] == pytest.approx(part[3]["loss"], rel=1e-6)
    two = run_sft(tmp_path / "two", procs=2)
    for rows in (resumed, two):
        assert [r["lr"] for r in rows] == pytest.approx(lr, rel=1e-9, abs=1e-18)
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in full], rel=1e-4, abs=1e-5)
    torch.testing.assert_close(w(tmp_path / "part"), w(tmp_path / "full"), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w(tmp_path / "two"), w(tmp_path / "full"), atol=1e-5, rtol=1e-4)
    assert (w(tmp_path / "full") - at_3).abs().max() > 1e-3  # the resumed run did train on from step 3


def test_lora_trains_adapters_only_and_checkpoint_reloads(tmp_path):
    base = tmp_path / "base"
    init_toy_dir(str(base), seed=0)
    run_sft(tmp_path / "lora", "--model", str(base), "--lora", "--lora-r", "4", "--max-steps", "3", "--lr", "1e-2")
    newest = sorted((tmp_path / "lora").glob("checkpoint-*"))[-1]
    assert newest.name == "checkpoint-000003"
    args = json.loads((newest / "args.json").read_text())
    assert args["lora"] is True and args["lora_r"] == 4 and args["max_steps"] == 3
    before, _ = load_model(str(base))
    after, tokenizer = load_model(model_dir(tmp_path / "lora"))
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    # merged adapters move the projection weights; embeddings move only in the six tag rows
    assert any("q_proj" in n for n in changed) and "model.norm.weight" not in changed
    emb_diff = (after.get_input_embeddings().weight - before.get_input_embeddings().weight).abs().sum(1)
    moved = set(torch.nonzero(emb_diff).flatten().tolist())
    assert moved and moved <= set(tag_ids(tokenizer).values())


def test_an_sft_run_on_trl_messages_records(tmp_path):
    """TRL's conversational format: each record a `messages` list (user question, assistant trace). The run
    trains on the same examples as the question/response records of the same traces."""
    rows = toy.sft_corpus(64, seed=1)
    messages = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["response"]}]}
                for r in rows]
    (tmp_path / "messages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in messages))
    args = ["--preset", "toy", "--batch-size", "8", "--micro-batch-tokens", "300", "--epochs", "1", "--max-steps", "2"]
    plain = run_sft(tmp_path / "plain", "--max-steps", "2")  # the same traces as question/response records
    log = run(ROOT / "train_sft.py", *args, "--data", str(tmp_path / "messages.jsonl"), "--out", str(tmp_path / "msg")).stdout
    assert "64/64 traces kept" in log
    got = [json.loads(line) for line in open(tmp_path / "msg" / "metrics.jsonl")]
    assert [r["loss"] for r in got] == [r["loss"] for r in plain]


def test_sft_skips_non_finite_updates_and_stops_after_three(tmp_path):
    """A NaN loss: the update is skipped (logged), three in a row stop SFT in one line, weights untouched."""
    import runpy
    from nanopr1 import UsageError
    g = runpy.run_path(str(ROOT / "train_sft.py"), run_name="not_main")["main"].__globals__  # the script's own
    nll_of = g["sequence_nll"]
    g["sequence_nll"] = lambda *a, **k: nll_of(*a, **k) * float("nan")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy.sft_corpus(64, seed=0)))
    args = g["parse_args"](["--preset", "toy", "--data", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o"),
                            "--batch-size", "8", "--max-steps", "5", "--save-every", "2"])
    with pytest.raises(UsageError, match=r"^step 3: 3 updates in a row had a non-finite loss or gradient norm"):
        g["main"](args)
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_update"] for r in rows] == [1, 1, 1]
    model, _ = load_model(str(tmp_path / "o" / "checkpoint-000002"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
