"""Tests for the GRPO loop: the trainer's view of sampled rollouts (nanopr1.scoring on rollouts of
the toy model), and train_rl.py run for real: micro-batch splits, two real processes, the recipes,
LoRA, the schedule of rewards, the argument checks."""

import json
from pathlib import Path

import pytest
import torch

from conftest import run
from nanopr1 import format, toy
from nanopr1.grpo import policy_loss
from nanopr1.model import load, tag_ids
from nanopr1.sampler import sample
from nanopr1.scoring import score

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "init"
    toy.init_dir(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A toy model after a short SFT: it writes the format and answers right now and then,
    so rewards within a group differ and advantages are not all zero."""
    out = tmp_path_factory.mktemp("sft")
    (out / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy.sft_corpus(32 * 150, seed=3)))
    run(ROOT / "train_sft.py", "--preset", "toy", "--data", str(out / "corpus.jsonl"), "--out", str(out / "model"),
        "--save-every", "1000")
    return str(out / "model")


def rollouts_for(model, tokenizer, variant, n_prompts=3, group=4, seed=0, **kw):
    rows = toy.problems("easy", n_prompts, seed=seed)
    prompts = [format.chat_prompt_ids(tokenizer, toy.TEMPLATE, r["question"]) for r in rows]
    return sample(model, tokenizer, prompts, group, variant=variant, max_new_tokens=60, seed=seed,
                  force_block=0, **kw)


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_trainer_logprobs_match_the_sampler(sft_dir, variant):
    """The logged sampler-trainer gap on rollouts with several blocks: ~0 for unseen on every sampled
    token; for seen on every sampled token except those of paths after the first."""
    model, tokenizer = load(sft_dir)
    tags = tag_ids(tokenizer)
    ros = rollouts_for(model, tokenizer, variant, n_prompts=4, max_blocks=4)
    assert all(r.blocks for r in ros) and sum(len(r.blocks) >= 2 for r in ros) >= 2
    with torch.no_grad():
        logp, mask = score(model, ros, tags, variant, 1.0, tokenizer.pad_token_id, "cpu")
    later_paths = 0
    for b, r in enumerate(ros):
        gap = (logp[b, :len(r.ids)] - torch.tensor(r.logprobs)).abs()
        skip = torch.zeros(len(r.ids), dtype=torch.bool)
        if variant == "seen":
            for block in r.blocks:
                for s, e in block.paths[1:]:
                    skip[s:e] = True
        later_paths += int((skip & mask[b, :len(r.ids)]).sum())
        assert gap[mask[b, :len(r.ids)] & ~skip].max() < 1e-4
    assert (later_paths > 0) == (variant == "seen")


def test_forced_tokens_get_no_gradient_and_eos_is_trained(toy_dir):
    model, tokenizer = load(toy_dir)
    ros = rollouts_for(model, tokenizer, "unseen", max_blocks=1)
    logp, mask = score(model, ros, tag_ids(tokenizer), "unseen", 1.0, tokenizer.pad_token_id, "cpu")
    logp.retain_grad()
    adv = torch.randn(len(ros))
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, int(mask.sum()))
    loss.backward()
    eos = 0
    for b, r in enumerate(ros):
        g = logp.grad[b, :len(r.ids)]
        forced = torch.tensor(r.forced)
        assert forced.any() and (g[forced] == 0).all()  # <Path>, </Parallel><Summary>, ...: no gradient
        assert (g[~forced] != 0).all()  # every sampled token is trained
        if r.stop_reason == "eos":
            assert r.ids[-1] == tokenizer.eos_token_id and not r.forced[-1] and g[-1] != 0
            eos += 1
    assert eos > 0

# -----------------------------------------------------------------------------
# train_rl.py, run as a user runs it


def rl(out, init, *extra, procs=1, check=True):
    args = ["--preset", "toy", "--init", str(init), "--out", str(out), "--prompts-per-step", "4", "--group-size", "4",
            "--max-new-tokens", "100", "--save-every", "100", "--stage", "easy", *extra]
    proc = run(ROOT / "train_rl.py", *args, procs=procs, check=check)
    if not check:
        return proc
    rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    return rows, proc.stdout + proc.stderr


def weights(path):
    return torch.cat([q.detach().flatten() for q in load(str(path))[0].state_dict().values()])


def test_a_step_does_not_depend_on_micro_batches_or_processes(sft_dir, tmp_path):
    """Two RL steps, unseen: one micro-batch, many small ones (a token budget of 200), and two real
    processes (torchrun) give the same rewards, losses and weights. The sampler's noise depends on the
    prompt seed alone, so every run samples the same rollouts."""
    common = ("--variant", "unseen", "--steps", "2", "--lr", "1e-3", "--weight-decay", "0")
    one, log1 = rl(tmp_path / "one", sft_dir, *common)
    small, _ = rl(tmp_path / "small", sft_dir, *common, "--micro-batch-tokens", "200")
    two, log2 = rl(tmp_path / "two", sft_dir, *common, procs=2)
    assert "1 process" in log1 and "2 processes" in log2  # what each run saw
    start = weights(sft_dir)
    w1 = weights(tmp_path / "one")
    assert (w1 - start).abs().max() > 3e-4  # the steps moved the weights (Adam: about lr per step)
    for rows, path in ((small, "small"), (two, "two")):
        for a, b in zip(one, rows, strict=True):
            assert (a["reward"], a["accuracy"], a["length"]) == (b["reward"], b["accuracy"], b["length"])
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        # Adam normalises each update, so summation-order noise in tiny gradients shows at ~1e-6 of
        # updates of ~1e-3: compare the updates to 1% of their size
        torch.testing.assert_close(weights(tmp_path / path) - start, w1 - start, atol=1e-5, rtol=0)


def test_old_policy_epochs_clip_and_match_the_sampler(sft_dir, tmp_path):
    """--ppo-epochs 2: the old log-probs come from the trainer before the update (their gap to the
    sampler's is ~0 for unseen), and the second epoch sees a moved policy: ratio != 1, tokens clipped."""
    rows, _ = rl(tmp_path / "ppo", sft_dir, "--variant", "unseen", "--steps", "2", "--ppo-epochs", "2", "--lr", "3e-3")
    assert all(r["logp_gap"] < 1e-4 for r in rows)
    assert abs(rows[-1]["ratio"] - 1) > 1e-3 and rows[-1]["clip_frac"] > 0  # step 2 has groups with a signal


def test_unseen_alternating_steps_follow_the_schedule(sft_dir, tmp_path):
    rows, _ = rl(tmp_path / "alt", sft_dir, "--variant", "unseen", "--stage", "hard", "--steps", "10", "--lr", "1e-3",
                 "--weight-decay", "0", "--eval-every", "5", "--eval-data", "toy-hard", "--eval-limit", "4",
                 "--eval-n", "2")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["reward_fn"] for r in rows] == ["r_acc"] * 8 + ["tiered_reward"] * 2  # the S2 recipe's default
    for r in rows:
        assert r["logp_gap"] < 1e-4  # unseen: the trainer reproduces the sampler on every token
        assert all(v == v for v in r.values() if isinstance(v, float))  # no NaN, zero-variance groups included
        assert r["latency_ratio"] >= 1 and r["critical_path"] <= r["length"]
    assert any(r["zero_adv_groups"] < 1 for r in rows)
    assert [r["step"] for r in rows if "eval_mean@2" in r] == [5, 10]  # the --eval-every hook ran
    assert (weights(tmp_path / "alt") - weights(sft_dir)).abs().max() > 0  # no weight decay: the policy gradient


def test_lora_steps_train_adapters_and_checkpoint_loads(sft_dir, tmp_path):
    rows, _ = rl(tmp_path / "lora", sft_dir, "--lora", "--lora-r", "4", "--steps", "2", "--lr", "1e-2",
                 "--reward", "tiered")
    assert len(rows) == 2 and all(r["reward_fn"] == "tiered_reward" for r in rows)
    assert any(r["zero_adv_groups"] < 1 for r in rows)  # some group had a learning signal
    before, after = load(sft_dir)[0].state_dict(), load(str(tmp_path / "lora"))[0].state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("proj" in k for k in moved)  # the merged adapters moved the projections, nothing else


def test_metrics_reach_tensorboard(sft_dir, tmp_path):
    """--report-to tensorboard: every number of every metrics.jsonl row, read back from the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    rows, _ = rl(tmp_path / "tb", sft_dir, "--steps", "2", "--report-to", "tensorboard")
    events = EventAccumulator(str(next((tmp_path / "tb" / "trackers").glob("events.out.tfevents.*"))))
    events.Reload()
    for key in ("reward", "accuracy", "parallel_rate", "blocks_per_rollout", "latency_ratio", "loss"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [r["step"] for r in rows]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 there
