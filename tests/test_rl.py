import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import train_rl
from nanopr1 import format, toy
from nanopr1.grpo import group_advantages
from nanopr1.model import load, tag_ids
from nanopr1.sampler import sample

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")


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
    cmd = [sys.executable, str(ROOT / "train_sft.py"), "--preset", "toy", "--data", str(out / "corpus.jsonl"),
           "--out", str(out / "model"), "--save-every", "1000"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=ENV, capture_output=True, timeout=900)
    return str(out / "model")


def rollouts_for(model, tokenizer, variant, n_prompts=3, group=4, seed=0, **kw):
    rows = toy.problems("easy", n_prompts, seed=seed)
    prompts = [format.chat_prompt_ids(tokenizer, toy.TEMPLATE, r["question"]) for r in rows]
    return sample(model, tokenizer, prompts, group, variant=variant, max_new_tokens=60, seed=seed,
                  force_block=0, **kw)


def args_for(variant, micro_batch=64):
    return train_rl.parse_args(["--preset", "toy", "--variant", variant, "--micro-batch", str(micro_batch)])


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_trainer_logprobs_match_the_sampler(toy_dir, variant):
    """The logged sampler-trainer gap: ~0 for unseen on every sampled token; for seen on
    every sampled token except those of paths after the first."""
    model, tokenizer = load(toy_dir)
    tags = tag_ids(tokenizer)
    ros = rollouts_for(model, tokenizer, variant)
    assert all(r.blocks for r in ros)  # force_block: every rollout has a block to check
    with torch.no_grad():
        logp, mask = train_rl.score(model, ros, tags, args_for(variant), tokenizer.pad_token_id, "cpu")
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
    logp, mask = train_rl.score(model, ros, tag_ids(tokenizer), args_for("unseen"), tokenizer.pad_token_id, "cpu")
    logp.retain_grad()
    adv = torch.randn(len(ros))
    loss, _ = train_rl.policy_loss(logp, logp.detach(), adv, mask, int(mask.sum()))
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


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_one_step_is_the_same_for_1_2_4_micro_batches(toy_dir, variant):
    model, tokenizer = load(toy_dir)
    ros = rollouts_for(model, tokenizer, variant)
    adv, _ = group_advantages(torch.randn(len(ros)).tolist(), 4)
    after = []
    for micro in (12, 6, 3):  # 1, 2 and 4 micro-batches
        model, _ = load(toy_dir)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stats = {"clipped_tokens": 0.0, "ratio_sum": 0.0, "tokens": 0.0, "gap_sum": 0.0, "gap_tokens": 0.0, "loss": 0.0}
        train_rl.update(model, opt, ros, list(range(len(ros))), adv, None, None, tag_ids(tokenizer),
                        args_for(variant, micro), tokenizer.pad_token_id, Accelerator(cpu=True), stats)
        after.append((torch.cat([q.detach().flatten() for q in model.parameters()]), stats["loss"], stats["ratio_sum"] / stats["tokens"]))
    start = torch.cat([q.flatten() for q in load(toy_dir)[0].parameters()])
    assert (after[0][0] - start).abs().max() > 1e-4  # the step did move the weights
    for params, loss, ratio in after[1:]:
        torch.testing.assert_close(params, after[0][0], atol=1e-6, rtol=1e-5)
        assert loss == pytest.approx(after[0][1], abs=1e-6)
    assert all(r == pytest.approx(1.0, abs=1e-6) for _, _, r in after)  # on-policy: the ratio is 1


def run_rl(out, *extra, procs=1):
    args = ["--preset", "toy", "--out", str(out), "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "48", "--save-every", "100", *extra]
    launch = [sys.executable, str(ROOT / "train_rl.py")] if procs == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs), "--cpu",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_rl.py")]
    proc = subprocess.run(launch + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def changed(a, b):
    pa, pb = load(a)[0].state_dict(), load(b)[0].state_dict()
    return sum(not torch.equal(pa[k], pb[k]) for k in pa)


def test_unseen_alternating_steps_follow_the_schedule(sft_dir, tmp_path):
    rows = run_rl(tmp_path / "alt", "--init", sft_dir, "--variant", "unseen", "--reward", "alternating",
                  "--steps", "10", "--lr", "1e-3", "--weight-decay", "0",
                  "--eval-every", "5", "--eval-data", "toy-hard", "--eval-limit", "4", "--eval-n", "2")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["reward_fn"] for r in rows] == ["r_acc"] * 8 + ["tiered_reward"] * 2
    for r in rows:
        assert r["ratio"] == pytest.approx(1.0, abs=1e-6) and r["clip_frac"] == 0  # one on-policy update
        assert r["logp_gap"] < 1e-4  # unseen: the trainer reproduces the sampler on every token
        assert all(v == v for v in r.values() if isinstance(v, float))  # no NaN, zero-variance groups included
    assert any(r["zero_adv_groups"] < 1 for r in rows)
    assert [r["step"] for r in rows if "eval_mean@2" in r] == [5, 10]  # the --eval-every hook ran eval.py's code
    assert changed(sft_dir, tmp_path / "alt") > 0  # no weight decay: only the policy gradient moves weights


def test_lora_steps_train_adapters_and_checkpoint_loads(sft_dir, tmp_path):
    rows = run_rl(tmp_path / "lora", "--init", sft_dir, "--lora", "--lora-r", "4", "--steps", "2", "--lr", "1e-2",
                  "--reward", "tiered", "--prompts-per-step", "4")
    assert len(rows) == 2 and all(r["reward_fn"] == "tiered_reward" for r in rows)
    assert any(r["zero_adv_groups"] < 1 for r in rows)  # some group had a learning signal
    before, after = load(sft_dir)[0].state_dict(), load(str(tmp_path / "lora"))[0].state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("proj" in k for k in moved)  # the merged adapters moved the projections, nothing else


def test_two_processes_and_resume(toy_dir, tmp_path):
    rows = run_rl(tmp_path / "two", "--init", toy_dir, "--stage", "easy", "--steps", "2", "--save-every", "1", procs=2)
    assert len(rows) == 2 and all(r["reward_fn"] == "parallel_reward" for r in rows)
    rows = run_rl(tmp_path / "two", "--init", toy_dir, "--stage", "easy", "--steps", "3", "--resume")
    assert [r["step"] for r in rows] == [1, 2, 3]  # resumed at step 2, no duplicated rows


def test_one_step_is_the_same_on_1_and_2_processes(toy_dir, tmp_path):
    """Same global batch of rollouts, split over 2 gloo processes: the same loss and weights."""
    model, tokenizer = load(toy_dir)
    ros = rollouts_for(model, tokenizer, "unseen", n_prompts=2, group=4)
    adv, _ = group_advantages(torch.randn(len(ros)).tolist(), 4)
    torch.save((ros, adv), tmp_path / "rollouts.pt")
    results = []
    for procs in (1, 2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs), "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "tests" / "dist_update.py"), toy_dir, str(tmp_path / "rollouts.pt"), str(tmp_path / f"{procs}.pt")]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(torch.load(tmp_path / f"{procs}.pt"))
    (p1, loss1), (p2, loss2) = results
    start = torch.cat([q.flatten() for q in model.parameters()]).detach()
    assert (p1 - start).abs().max() > 1e-4
    torch.testing.assert_close(p2, p1, atol=1e-6, rtol=1e-5)
    assert float(loss2) == pytest.approx(float(loss1), abs=1e-6)
