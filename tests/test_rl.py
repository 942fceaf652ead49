"""Tests for the GRPO loop: the trainer's view of sampled rollouts (nanopr1.scoring on rollouts of
the toy model), and train_rl.py run for real: micro-batch splits, two real processes, the recipes,
LoRA, the schedule of rewards, the argument checks."""

import json
from pathlib import Path

import pytest
import torch

from conftest import init_toy_dir, run
from nanopr1 import UsageError, format, toy
from nanopr1.grpo import policy_loss
from nanopr1.format import tag_ids
from nanopr1.checkpoint import model_dir
from nanopr1.model import load_model
from nanopr1.sampler import sample
from nanopr1.scoring import rollout_logprobs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "init"
    init_toy_dir(str(path), seed=0)
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
    kw.setdefault("rules", "reserve")  # every rollout ends in its own time (official rules may cut a block)
    return sample(model, tokenizer, prompts, group, variant=variant, max_new_tokens=60, seed=seed,
                  force_block=0, **kw)


@pytest.mark.parametrize("variant", ["seen", "unseen"])
def test_trainer_logprobs_match_the_sampler(sft_dir, variant):
    """The logged sampler-trainer gap on rollouts with several blocks: ~0 for unseen on every sampled
    token; for seen on every sampled token except those of paths after the first."""
    model, tokenizer = load_model(model_dir(sft_dir))
    tags = tag_ids(tokenizer)
    ros = rollouts_for(model, tokenizer, variant, n_prompts=8, max_blocks=4)
    assert all(r.blocks for r in ros) and sum(len(r.blocks) >= 2 for r in ros) >= 2
    with torch.no_grad():
        logp, mask = rollout_logprobs(model, ros, tags, variant, 1.0, tokenizer.pad_token_id, "cpu")
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
    model, tokenizer = load_model(toy_dir)
    ros = rollouts_for(model, tokenizer, "unseen", max_blocks=1)
    logp, mask = rollout_logprobs(model, ros, tag_ids(tokenizer), "unseen", 1.0, tokenizer.pad_token_id, "cpu")
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
    return torch.cat([q.detach().flatten() for q in load_model(model_dir(path))[0].state_dict().values()])


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
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)  # (the second mini-batch: after a step)
        # Adam normalises each update, so summation-order noise in a near-zero gradient can move its weight
        # by a good part of lr: four optimizer steps of ~1e-3 each; all but a handful of the 1M weights agree
        # to 1e-5, and those to 1e-4
        diff = (weights(tmp_path / path) - start - (w1 - start)).abs()
        assert (diff > 1e-5).sum() <= 20 and diff.max() < 1e-4


def test_old_policy_epochs_clip_and_match_the_sampler(sft_dir, tmp_path):
    """--ppo-epochs 2: the old log-probs come from the trainer before the update (their gap to the
    sampler's is ~0 for unseen), and the second epoch sees a moved policy: ratio != 1, tokens clipped."""
    rows, _ = rl(tmp_path / "ppo", sft_dir, "--variant", "unseen", "--steps", "2", "--ppo-epochs", "2", "--lr", "3e-3",
                 "--mini-batches", "1", "--prompts-per-step", "8")
    assert all(r["logp_gap"] < 1e-4 for r in rows)
    assert all(abs(r["ratio"] - 1) > 1e-3 for r in rows) and sum(r["clip_frac"] for r in rows) > 0


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
    before = load_model(model_dir(sft_dir))[0].state_dict()
    after = load_model(model_dir(tmp_path / "lora"))[0].state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("proj" in k for k in moved)  # the merged adapters moved the projections, nothing else


def test_a_named_run_its_rollouts_kept_checkpoints_and_resume(sft_dir, tmp_path, capsys):
    """--report-to tensorboard --run-name X --log-rollouts 2 --keep-checkpoints 2: every number of every
    metrics.jsonl row read back from OUT/tensorboard/X, the kept rollouts as trees (sample.py --show),
    the two newest step checkpoints, and --resume from the newest."""
    import runpy
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    flags = ("--save-every", "1", "--report-to", "tensorboard", "--run-name", "X", "--log-rollouts", "2",
             "--keep-checkpoints", "2")
    rows, _ = rl(out, sft_dir, "--steps", "3", *flags)
    events = EventAccumulator(str(next((out / "tensorboard" / "X").glob("events.out.tfevents.*"))))
    events.Reload()
    for key in ("reward", "accuracy", "parallel_rate", "blocks_per_rollout", "latency_ratio", "loss", "clip_frac"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [r["step"] for r in rows]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 there
    assert any("rollouts" in tag for tag in events.Tags()["tensors"])  # the kept rollouts, as text
    kept = [json.loads(line) for line in open(out / "rollouts.jsonl")]
    assert [r["step"] for r in kept] == [1, 1, 2, 2, 3, 3]
    assert {"prompt", "response", "main", "blocks", "answer", "gold", "reward"} <= set(kept[0])
    runpy.run_path(str(ROOT / "sample.py"), run_name="not main")["main"](["--show", str(out / "rollouts.jsonl"),
                                                                          "--step", "2"])
    shown = capsys.readouterr().out
    assert shown.count("=== step 2, rollout") == 2 and "answer:" in shown and "gold:" in shown
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    resumed, log = rl(out, sft_dir, "--steps", "4", "--resume", *flags)
    assert "resuming" in log and "at step 3" in log and [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000003", "checkpoint-000004"]

def test_the_default_update_clips_and_the_kl_starts_at_zero(sft_dir, tmp_path):
    """The recipes' update: two optimizer steps per rollout batch (the official scripts), so the second
    mini-batch sees a moved policy and its clipped ratio acts. The KL reference is a copy in the policy's
    precision: with one on-policy update the k3 KL of step 1 is exactly 0 (a bf16 reference of an fp32
    policy gave ~1e-3 per token from the start)."""
    # (--rules reserve: at this test's 100 tokens the official cut leaves most groups without a signal)
    rows, _ = rl(tmp_path / "clip", sft_dir, "--steps", "3", "--lr", "3e-3", "--kl-coef", "0.1", "--prompts-per-step", "8",
                 "--rules", "reserve")
    moved = [r for r in rows if abs(r["ratio"] - 1) > 1e-3]  # a step whose first mini-batch had a learning signal
    assert moved and all(r["kl"] > 0 for r in moved)  # (a moved ratio need not leave [0.8, 1.2]: any, not all)
    assert any(r["clip_frac"] > 0 for r in moved)
    one, _ = rl(tmp_path / "one", sft_dir, "--steps", "1", "--mini-batches", "1", "--kl-coef", "0.1")
    assert one[0]["kl"] == 0 and one[0]["clip_frac"] == 0 and one[0]["ratio"] == 1  # on-policy, unmoved


def test_truncated_importance_weights_are_logged(sft_dir, tmp_path):
    """--tis-cap: each token's loss weighted by min(trainer / sampler probability, cap); on a CPU the fp32
    sampling copy is exact (weights ~1), so the run's numbers equal the run without it."""
    plain, _ = rl(tmp_path / "plain", sft_dir, "--steps", "1", "--variant", "unseen")
    tis, _ = rl(tmp_path / "tis", sft_dir, "--steps", "1", "--variant", "unseen", "--tis-cap", "2")
    assert tis[0]["tis_weight"] == pytest.approx(1, abs=1e-4) and tis[0]["tis_capped"] == 0
    assert tis[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-5) and "tis_weight" not in plain[0]


def test_lora_on_a_model_with_projection_biases(tmp_path):
    """Qwen2 has q/k/v biases: the LoRA sampling copy merges the adapters into the weights only (the old
    refresh added each delta to the bias too: a shape error), and the checkpoint loads."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    tokenizer = toy.build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    model.save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    rows, _ = rl(tmp_path / "lora", tmp_path / "qwen2", "--lora", "--lora-r", "4", "--steps", "1", "--lr", "1e-2")
    assert len(rows) == 1
    after = load_model(model_dir(tmp_path / "lora"))[0]
    assert torch.equal(after.model.layers[0].self_attn.q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)


def test_own_data_reward_and_grader(sft_dir, tmp_path):
    """A JSONL with other column names (--question-key, --answer-key), a custom reward and a custom grader
    (module:function, here files of tests/): the run uses them and names the reward in its metrics."""
    rows = [{"q": r["question"], "gold": r["answer"]} for r in toy.problems("easy", 40, seed=5)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    custom = ROOT / "tests" / "custom_rewards.py"
    got, _ = rl(tmp_path / "own", sft_dir, "--steps", "2", "--data", str(tmp_path / "mine.jsonl"), "--question-key", "q",
                "--answer-key", "gold", "--reward", f"{custom}:length_penalty", "--grader", f"{custom}:exact_match")
    assert [r["reward_fn"] for r in got] == ["length_penalty"] * 2
    assert all(r["reward"] < 2 * r["accuracy"] - 1 for r in got)  # R_acc minus a length penalty
    kept = [json.loads(line) for line in open(tmp_path / "own" / "rollouts.jsonl")]
    assert {r["gold"] for r in kept} <= {r["gold"] for r in rows}


def test_non_finite_updates_are_skipped_counted_and_stop_the_run(toy_dir, tmp_path):
    """A loss that turns NaN: no optimizer step takes it (the weights stay finite), the metrics count the
    skipped updates, and the third in a row stops the run with one line; the checkpoint before is kept."""
    import runpy
    from safetensors.torch import load_file
    g = runpy.run_path(str(ROOT / "train_rl.py"), run_name="not_main")["main"].__globals__  # the script's own
    loss_of = g["policy_loss"]
    g["policy_loss"] = lambda *a, **k: (lambda out: (out[0] * float("nan"), out[1]))(loss_of(*a, **k))
    out = tmp_path / "rl"
    args = g["parse_args"](["--preset", "toy", "--init", toy_dir, "--out", str(out), "--stage", "easy", "--steps", "3",
                            "--save-every", "1", "--prompts-per-step", "2", "--group-size", "2",
                            "--max-new-tokens", "40"])
    with pytest.raises(UsageError, match=r"^step 2: 4 updates in a row had a non-finite loss or gradient norm"):
        g["main"](args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and [r["skipped_updates"] for r in rows] == [2, 2]
    saved, first = load_file(str(out / "checkpoint-000001" / "model.safetensors")), load_file(
        str(Path(toy_dir) / "model.safetensors"))
    assert all(torch.isfinite(v).all() and torch.equal(v, first[k]) for k, v in saved.items())
