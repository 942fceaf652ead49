"""The scripts as a user meets them: every bad input is one line `error: ...` with exit status 1
and leaves --out untouched; a genuine bug keeps its traceback; a run killed at any moment (inside a
checkpoint write too) and resumed ends exactly where the uninterrupted run ends."""

import json
import runpy
import sys

import pytest
import torch

from conftest import ROOT, run
from nanopr1 import toy
from nanopr1.model import load


def snapshot(path):
    """Every file under path with its bytes and mtime (None if the path does not exist)."""
    if not path.exists():
        return None
    return {str(f): (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(path.rglob("*")) if f.is_file()}


def main_of(script, argv, monkeypatch):
    """Run a script's __main__ in this process; returns SystemExit's code (a str exits with status 1)."""
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return e.value.code


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """An untrained toy model, a finished 2-step SFT run, and data files a user might get wrong."""
    d = tmp_path_factory.mktemp("cli")
    toy.init_dir(str(d / "init"))
    (d / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy.sft_corpus(32, seed=0)))
    run(ROOT / "train_sft.py", "--preset", "toy", "--data", str(d / "corpus.jsonl"), "--out", str(d / "sft"),
        "--batch-size", "8", "--max-steps", "2")
    (d / "no_response.jsonl").write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    (d / "table.csv").write_text("question,answer\nq,1\n")
    return d


RL = ["train_rl.py", "--preset", "toy", "--init", "{d}/init", "--out", "{out}", "--stage", "easy"]
SFT = ["train_sft.py", "--preset", "toy", "--data", "{d}/corpus.jsonl", "--out", "{out}", "--batch-size", "8"]
BAD = [  # (command, extra flags, the message: the whole stderr line after "error: ")
    (RL, ["--micro-batch-tokens", "0"], "--micro-batch-tokens must be 1 or more"),
    (RL, ["--mini-batches", "0"], "--ppo-epochs and --mini-batches must be 1 or more"),
    (RL, ["--ppo-epochs", "0"], "--ppo-epochs and --mini-batches must be 1 or more"),
    (RL, ["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (RL, ["--temperature", "-1"], "--temperature -1.0: RL samples, it must be above 0"),
    (RL, ["--temperature", "0"], "--temperature 0.0: RL samples, it must be above 0"),
    (RL, ["--group-size", "1"], "--group-size 1: GRPO compares a prompt's rollouts, 2 or more"),
    (RL, ["--num-paths", "1"], "--num-paths 1: a parallel block needs 2 or more paths"),
    (RL, ["--save-every", "0"], "--save-every 0: must be 1 or more"),
    (RL, ["--steps", "0"], "--prompts-per-step and --steps must be 1 or more"),
    (RL, ["--max-rows", "1"], "--max-rows: one rollout needs 2 rows"),
    (RL, ["--prompts-per-step", "30000"], "--prompts-per-step 30000: more than the 20000 problems of toy:easy, "
                                          "a step would repeat prompts"),
    (RL, ["--data", "toy-hard"], "--data toy-hard is the toy's held-out evaluation set; train on toy:hard"),
    (RL, ["--data", "{d}/table.csv"], "data file '{d}/table.csv': a .csv file; use JSONL (one JSON object a line), "
                                      "a JSON list or parquet"),
    (RL, ["--prompt-file", "{d}/missing.txt"], "prompt template '{d}/missing.txt' does not exist"),
    (RL, ["--init", "{d}/missing"], "model '{d}/missing': no such model directory (expected {d}/missing/config.json)"),
    (RL, ["--resume"], "--resume: no valid checkpoint in {out}: {out}/checkpoint: missing"),
    (RL, ["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (SFT, ["--batch-size", "0"], "--batch-size and --micro-batch-tokens must be 1 or more"),
    (SFT, ["--micro-batch-tokens", "0"], "--batch-size and --micro-batch-tokens must be 1 or more"),
    (SFT, ["--save-every", "0"], "--save-every 0: must be 1 or more"),
    (SFT, ["--warmup", "1.5"], "--lr must be above 0 and --warmup in [0, 1)"),
    (SFT, ["--data", "{d}/no_response.jsonl"], "{d}/no_response.jsonl: record 0 has no 'response' text"),
    (SFT, ["--batch-size", "64"], "32 examples is fewer than one batch of 64"),
]


@pytest.mark.parametrize("command, extra, message", BAD, ids=[" ".join(c[0:1] + e) for c, e, _ in BAD])
def test_bad_input_is_one_line_and_touches_nothing(dirs, tmp_path, monkeypatch, command, extra, message):
    out = tmp_path / "out"
    fill = lambda x: x.format(d=dirs, out=out)
    before = snapshot(out)
    code = main_of(command[0], [fill(a) for a in command[1:] + extra], monkeypatch)
    assert code == "error: " + fill(message)
    assert snapshot(out) == before


@pytest.mark.parametrize("extra, message", [
    ([], "{out} already holds a run (checkpoint, metrics.jsonl): --resume continues it, --overwrite starts over"),
    (["--resume", "--batch-size", "16"], "--resume: {out} holds another run: batch_size was 8, now 16 "
                                         "(--overwrite starts over; or choose another --out)"),
])
def test_a_finished_run_is_not_overwritten(dirs, monkeypatch, extra, message):
    out = dirs / "sft"
    before = snapshot(out)
    code = main_of("train_sft.py", [a.format(d=dirs, out=out) for a in SFT[1:]] + extra, monkeypatch)
    assert code == "error: " + message.format(out=out)
    assert snapshot(out) == before


def test_rl_cannot_resume_an_sft_run(dirs, monkeypatch):
    out = dirs / "sft"
    before = snapshot(out)
    code = main_of("train_rl.py", [a.format(d=dirs, out=out) for a in RL[1:]] + ["--resume"], monkeypatch)
    assert code == f"error: --resume: {out} holds another run: script was 'train_sft', now 'train_rl' " \
                   f"(--overwrite starts over; or choose another --out)"
    assert snapshot(out) == before


def test_the_exit_status_of_a_real_process(dirs, tmp_path):
    proc = run(ROOT / "train_rl.py", "--preset", "toy", "--init", str(dirs / "init"), "--out", str(tmp_path / "o"),
               "--group-size", "1", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --group-size 1: GRPO compares a prompt's rollouts, 2 or more"


def test_a_bug_keeps_its_traceback(dirs, tmp_path, monkeypatch):
    """A shape bug planted in the loss is raised as itself (with its traceback), not turned into one line."""
    import nanopr1.grpo

    def broken(*a, **kw):
        raise RuntimeError("The size of tensor a (19) must match the size of tensor b (20)")
    monkeypatch.setattr(nanopr1.grpo, "policy_loss", broken)
    monkeypatch.setattr(sys, "argv", ["train_rl.py", "--preset", "toy", "--init", str(dirs / "init"), "--out",
                                      str(tmp_path / "o"), "--prompts-per-step", "2", "--group-size", "2",
                                      "--max-new-tokens", "20", "--steps", "1"])
    with pytest.raises(RuntimeError, match="size of tensor a"):
        runpy.run_path(str(ROOT / "train_rl.py"), run_name="__main__")

# -----------------------------------------------------------------------------
# SIGKILL at any moment, then --resume


def killed_and_resumed(script, args, out, kill_after):
    """Run with a SIGKILL at the kill_after-th file a checkpoint save writes (0: never), then resume."""
    proc = run(ROOT / script, *args, "--out", str(out), check=False, env={"NANOPR1_KILL_AFTER": str(kill_after)})
    if kill_after:
        assert proc.returncode == -9, proc.stderr[-2000:]  # killed, not finished
        run(ROOT / script, *args, "--out", str(out), "--resume")
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in open(out / "metrics.jsonl")], load(str(out))[0].state_dict()


def kill_points(out, points):
    """The event numbers of `points` ((save, what) pairs) from the layout of a finished run's checkpoint:
    a save reports each of its F files, then the manifest, then (after the first) the old checkpoint
    renamed away, then the new one renamed into place."""
    F = sum(1 for f in (out / "checkpoint").rglob("*") if f.is_file() and f.name != "manifest.json")
    start = lambda k: 0 if k == 1 else (F + 2) + (k - 2) * (F + 3)  # events before save k
    at = {"first file": lambda k: 1, "middle": lambda k: F // 2, "last file": lambda k: F, "manifest": lambda k: F + 1,
          "swapped": lambda k: F + (2 if k == 1 else 3)}
    return [start(k) + at[what](k) for k, what in points]


@pytest.mark.parametrize("script, args, points", [
    ("train_sft.py", ["--preset", "toy", "--batch-size", "8", "--max-steps", "4", "--save-every", "1"],
     [(1, "first file"), (1, "manifest"), (2, "middle"), (3, "swapped")]),
    ("train_rl.py", ["--preset", "toy", "--stage", "easy", "--prompts-per-step", "2", "--group-size", "4",
                     "--max-new-tokens", "40", "--steps", "3", "--save-every", "1", "--lr", "1e-3"], [(2, "middle")]),
])
def test_killed_anywhere_and_resumed_equals_uninterrupted(dirs, tmp_path, script, args, points):
    """SIGKILL at chosen files of the checkpoint saves (inside the first save, in the middle of a later
    one, right after a swap), then --resume: the metrics rows (timings aside) and the final weights
    (and so the optimizer state that produced them) equal the uninterrupted run's."""
    args = args + (["--init", str(dirs / "init")] if script == "train_rl.py" else ["--data", str(dirs / "corpus.jsonl")])
    rows, weights = killed_and_resumed(script, args, tmp_path / "full", 0)
    untimed = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s") and k not in ("seconds", "tokens_per_s")}
                          for r in rs]
    for n in kill_points(tmp_path / "full", points):
        got_rows, got_weights = killed_and_resumed(script, args, tmp_path / f"kill{n}", n)
        assert untimed(got_rows) == untimed(rows)
        assert all(torch.equal(weights[k], got_weights[k]) for k in weights)
