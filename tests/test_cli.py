"""The scripts as a user meets them: every bad input is one line `error: ...` with exit status 1
and leaves --out untouched; a genuine bug keeps its traceback; every flag has its --resume rule; a
run killed at any moment (inside a checkpoint write too, by tests/kill.py) and resumed ends exactly
where the uninterrupted run ends."""

import json
import runpy
import shutil
import sys

import pytest
import torch

from conftest import ROOT, init_toy_dir, run
from nanopr1 import toy
from nanopr1.checkpoint import model_dir, validate
from nanopr1.model import load_model


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
    init_toy_dir(str(d / "init"))
    (d / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy.sft_corpus(32, seed=0)))
    run(ROOT / "train_sft.py", "--preset", "toy", "--data", str(d / "corpus.jsonl"), "--out", str(d / "sft"),
        "--batch-size", "8", "--max-steps", "2")
    (d / "no_response.jsonl").write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    (d / "table.csv").write_text("question,answer\nq,1\n")
    return d


RL = ["train_rl.py", "--preset", "toy", "--init", "{d}/init", "--out", "{out}", "--stage", "easy"]
SFT = ["train_sft.py", "--preset", "toy", "--data", "{d}/corpus.jsonl", "--out", "{out}", "--batch-size", "8"]
BAD = [  # (command, extra flags, the message: the whole stderr line after "error: ")
    (RL, ["--micro-batch-tokens", "0"], "--micro-batch-tokens 0: must be 1 or more"),
    (RL, ["--mini-batches", "0"], "--mini-batches 0: must be 1 or more"),
    (RL, ["--ppo-epochs", "0"], "--ppo-epochs 0: must be 1 or more"),
    (RL, ["--top-p", "0"], "--top-p 0.0: must be above 0.0"),
    (RL, ["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (RL, ["--temperature", "-1"], "--temperature -1.0: must be above 0.0 (RL samples)"),
    (RL, ["--temperature", "0"], "--temperature 0.0: must be above 0.0 (RL samples)"),
    (RL, ["--lr", "-1e-4"], "--lr -0.0001: must be above 0.0"),
    (RL, ["--clip-high", "-0.2"], "--clip-high -0.2: must be 0 or more"),
    (RL, ["--group-size", "1"], "--group-size 1: must be 2 or more (GRPO compares a prompt's rollouts)"),
    (RL, ["--num-paths", "1"], "--num-paths 1: must be 2 or more (a block has 2 or more paths)"),
    (RL, ["--save-every", "0"], "--save-every 0: must be 1 or more"),
    (RL, ["--keep-checkpoints", "0"], "--keep-checkpoints 0: must be 1 or more"),
    (RL, ["--steps", "0"], "--steps 0: must be 1 or more"),
    (RL, ["--max-rows", "1"], "--max-rows 1: must be 2 or more (one rollout's paths)"),
    (RL, ["--answer-reserve", "8"], "--answer-reserve needs --rules reserve"),
    (RL, ["--grader", "nope"], "unknown grader 'nope': use one of is_equiv, dapo, gsm8k or module:function"),
    (RL, ["--out", "{d}/corpus.jsonl"], "--out {d}/corpus.jsonl: {d}/corpus.jsonl is a file, not a directory: "
                                        "choose another --out"),
    (RL, ["--prompts-per-step", "30000"], "--prompts-per-step 30000: more than the 20000 problems of toy:easy"),
    (RL, ["--data", "toy-hard"], "--data toy-hard is the toy's held-out evaluation set; train on toy:hard"),
    (RL, ["--data", "{d}/table.csv"], "data file '{d}/table.csv': a .csv file; use JSONL (one JSON object a line), "
                                      "a JSON list or parquet"),
    (RL, ["--prompt-file", "{d}/missing.txt"], "prompt template '{d}/missing.txt' does not exist"),
    (RL, ["--init", "{d}/missing"], "model '{d}/missing': no such model directory (expected {d}/missing/config.json)"),
    (RL, ["--resume"], "--resume: no valid checkpoint in {out}: no checkpoint-* dir"),
    (RL, ["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (SFT, ["--batch-size", "0"], "--batch-size 0: must be 1 or more"),
    (SFT, ["--micro-batch-tokens", "0"], "--micro-batch-tokens 0: must be 1 or more"),
    (SFT, ["--save-every", "0"], "--save-every 0: must be 1 or more"),
    (SFT, ["--keep-checkpoints", "0"], "--keep-checkpoints 0: must be 1 or more"),
    (SFT, ["--warmup", "1.5"], "--warmup 1.5: must be in [0, 1)"),
    (SFT, ["--lr", "-1e-5"], "--lr -1e-05: must be above 0.0"),
    (SFT, ["--out", "{d}/corpus.jsonl/sub"], "--out {d}/corpus.jsonl/sub: {d}/corpus.jsonl is a file, not a "
                                             "directory: choose another --out"),
    (SFT, ["--data", "{d}/no_response.jsonl"], "{d}/no_response.jsonl: record 0 has no response column (looked for "
                                               "response, messages, completion; found: question, answer): pass "
                                               "--response-key"),
    (SFT, ["--batch-size", "64"], "32 examples is fewer than one batch of 64"),
]


@pytest.mark.parametrize("script", ["train_rl.py", "train_sft.py"])
def test_every_numeric_flag_refuses_a_negative_value(dirs, tmp_path, monkeypatch, script):
    """Each int/float flag of the parser, walked one by one: -5 is one line naming that flag."""
    parser = runpy.run_path(str(ROOT / script), run_name="not_main")["parser"]
    base = [a.format(d=dirs, out=tmp_path / "out") for a in (RL if script == "train_rl.py" else SFT)[1:]]
    flags = [a.option_strings[0] for a in parser._actions if a.type in (int, float)]
    assert len(flags) >= (30 if script == "train_rl.py" else 15)
    for flag in flags:
        code = main_of(script, base + [flag, "-5"], monkeypatch)
        assert isinstance(code, str) and code.startswith(f"error: {flag} -5") and "\n" not in code, (flag, code)


@pytest.mark.parametrize("command", [RL, SFT])
def test_a_tracker_that_is_not_installed_is_refused_before_loading(dirs, tmp_path, monkeypatch, command):
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    code = main_of(command[0], [a.format(d=dirs, out=tmp_path / "o") for a in command[1:]] +
                   ["--report-to", "wandb"], monkeypatch)
    assert code == "error: --report-to wandb: wandb is not installed (pip install wandb)"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("body, says", [("return float('nan')", "returned nan"), ("return None", "returned None"),
                                         ("return 'no'", "returned 'no'")])
def test_a_reward_that_is_not_a_finite_number_stops_the_run_in_one_line(dirs, tmp_path, monkeypatch, body, says):
    """A reward of NaN (or None, or a string) for a rollout: one line naming the function, exit status 1, and no
    checkpoint written (the run had none yet: OUT is left as it was found)."""
    (tmp_path / "my_rewards.py").write_text(f"def bad(rollout, gold, step, info):\n    {body}\n")
    argv = [a.format(d=dirs, out=tmp_path / "o") for a in RL[1:]] + [
        "--reward", f"{tmp_path / 'my_rewards.py'}:bad", "--steps", "1", "--prompts-per-step", "2", "--group-size", "2"]
    code = main_of("train_rl.py", argv, monkeypatch)
    assert isinstance(code, str) and code.startswith("error: reward ") and "bad" in code and says in code, code
    assert "\n" not in code and not list((tmp_path / "o").glob("checkpoint-*"))


@pytest.mark.parametrize("command, extra, message", BAD, ids=[" ".join(c[0:1] + e) for c, e, _ in BAD])
def test_bad_input_is_one_line_and_touches_nothing(dirs, tmp_path, monkeypatch, command, extra, message):
    out = tmp_path / "out"
    fill = lambda x: x.format(d=dirs, out=out)
    before = snapshot(out)
    code = main_of(command[0], [fill(a) for a in command[1:] + extra], monkeypatch)
    assert code == "error: " + fill(message)
    assert snapshot(out) == before


@pytest.mark.parametrize("extra, message", [
    ([], "{out} already holds a run (checkpoint-000002, metrics.jsonl): --resume continues it, --overwrite starts over"),
    (["--resume", "--batch-size", "16"], "--resume: {out} was run with --batch-size 8, not 16: a resumed run keeps it "
                                         "(--overwrite starts over; or choose another --out)"),
])
def test_a_finished_run_is_not_overwritten(dirs, monkeypatch, extra, message):
    out = dirs / "sft"
    before = snapshot(out)
    code = main_of("train_sft.py", [a.format(d=dirs, out=out) for a in SFT[1:]] + extra, monkeypatch)
    assert code == "error: " + message.format(out=out)
    assert snapshot(out) == before


def test_rl_cannot_resume_an_sft_run(dirs, monkeypatch):
    """The script is a flag nobody types: it is compared all the same (one line naming both scripts)."""
    out = dirs / "sft"
    before = snapshot(out)
    code = main_of("train_rl.py", [a.format(d=dirs, out=out) for a in RL[1:]] + ["--resume"], monkeypatch)
    assert isinstance(code, str) and code.startswith(f"error: --resume: {out} was run with "), code
    assert "'train_sft'" in code and "'train_rl'" in code and "\n" not in code
    assert snapshot(out) == before


def test_the_exit_status_of_a_real_process(dirs, tmp_path):
    proc = run(ROOT / "train_rl.py", "--preset", "toy", "--init", str(dirs / "init"), "--out", str(tmp_path / "o"),
               "--group-size", "1", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --group-size 1: must be 2 or more (GRPO compares a prompt's rollouts)"


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
# --resume: every flag has its rule; a refused flag is one line; an untyped flag keeps the run's value


@pytest.mark.parametrize("script", ["train_rl.py", "train_sft.py"])
def test_every_flag_has_one_resume_rule(script):
    """Each dest of the parser is in exactly one of APPLY (a new value is used), LOCAL (this invocation's
    only) and REFUSE (a new value is an error); APPLY and LOCAL name real flags."""
    g = runpy.run_path(str(ROOT / script), run_name="not_main")
    dests = {a.dest for a in g["parser"]._actions} - {"help"}
    rules = {"APPLY": g["APPLY"], "LOCAL": g["LOCAL"], "REFUSE": g["REFUSE"]}
    named = [d for names in rules.values() for d in names]
    assert sorted(dests - set(named)) == [], "flags with no --resume rule"
    assert sorted({d for d in named if named.count(d) > 1}) == [], "flags with two rules"
    for rule in ("APPLY", "LOCAL"):
        assert sorted(set(rules[rule]) - dests) == [], f"{rule} names no flag"
    assert sorted(set(g["REFUSE"]) - dests) == ["script"]  # the one value parse adds: which script ran
    assert {"lr", "save_every", "keep_checkpoints"} <= set(g["APPLY"]) and {"resume", "out"} <= set(g["LOCAL"])
    assert {"variant", "seed", "lora"} <= set(g["REFUSE"])


RL_SHORT = ["--preset", "toy", "--stage", "easy", "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "20", "--save-every", "1"]


@pytest.fixture(scope="module")
def rl_run(dirs):
    """A finished 1-step RL run started with --mini-batches 1 --lr 1e-3 (neither the default)."""
    out = dirs / "rl"
    run(ROOT / "train_rl.py", *RL_SHORT, "--init", str(dirs / "init"), "--out", str(out), "--steps", "1",
        "--mini-batches", "1", "--lr", "1e-3")
    return out


@pytest.mark.parametrize("extra, was", [
    (["--kl-coef", "0.1"], "--kl-coef 0.0, not 0.1"),
    (["--temperature", "0.5"], "--temperature 1.0, not 0.5"),
    (["--max-prompt-tokens", "30"], "--max-prompt-tokens 64, not 30"),
    (["--steps", "3", "--variant", "unseen", "--lr", "1e-4"], "--variant 'seen', not 'unseen'"),
])
def test_resuming_with_a_refused_flag_changed_is_one_line(dirs, rl_run, monkeypatch, extra, was):
    before = snapshot(rl_run)
    argv = [*RL_SHORT, "--init", str(dirs / "init"), "--out", str(rl_run), "--resume", *extra]
    code = main_of("train_rl.py", argv, monkeypatch)
    assert code == f"error: --resume: {rl_run} was run with {was}: a resumed run keeps it (--overwrite starts over; " \
                   f"or choose another --out)"
    assert snapshot(rl_run) == before


def test_resuming_keeps_the_flags_not_typed_again(dirs, rl_run, tmp_path):
    """--resume with --steps 2 (a flag resume may change) and without --mini-batches 1 --lr 1e-3: the run goes
    on with the values it was started with, not the defaults, and says what changed."""
    out = tmp_path / "rl"
    shutil.copytree(rl_run, out)
    log = run(ROOT / "train_rl.py", *RL_SHORT, "--init", str(dirs / "init"), "--out", str(out), "--resume",
              "--steps", "2").stdout
    stored = json.loads((out / "checkpoint-000002" / "args.json").read_text())
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl"))] == [1, 2]
    assert (stored["mini_batches"], stored["steps"]) == (1, 2)
    assert f"resuming {out} at step 1 with steps 1 -> 2\n" in log
    assert stored["lr"] == 1e-3

def another_value(action, value):
    """A valid value of a flag other than `value` (a resumed run must come back with it)."""
    if action.choices:
        return next(c for c in action.choices if c != value)
    if action.dest in ("reward", "grader"):
        return {"reward": "tiered", "grader": "is_equiv"}[action.dest] if value != "tiered" else "accuracy"
    if action.type is int:
        return 3 if value is None else value + 1
    if action.type is float:
        return 2.0 if not value else value / 2
    if action.nargs == 0 or isinstance(value, bool):  # store_true, --x/--no-x
        return not value
    return f"{value}-x" if value else "x"


@pytest.mark.parametrize("script", ["train_rl.py", "train_sft.py"])
def test_resume_keeps_every_flag_of_the_run(tmp_path, script):
    """Every flag --resume keeps (all but the invocation's own), walked together: a run saved with a value
    other than the default for each comes back with all of them when resumed with --resume alone."""
    from accelerate import Accelerator
    from nanopr1 import checkpoint
    g = runpy.run_path(str(ROOT / script), run_name="not_main")
    out = tmp_path / "run"
    args = g["parse_args"](["--out", str(out)])
    actions = {a.dest: a for a in g["parser"]._actions}
    kept = [k for k in g["REFUSE"] + g["APPLY"] if k in actions]
    assert len(kept) >= (40 if script == "train_rl.py" else 25)
    saved = {k: another_value(actions[k], getattr(args, k)) for k in kept}
    if script == "train_rl.py":
        saved.update(max_rows=8, answer_reserve=3, rules="reserve")  # (a reserve needs its rule)
    for k, v in saved.items():
        setattr(args, k, v)
    checkpoint.save(out, 1, Accelerator(cpu=True), lambda d: (d / "w.txt").write_text("w"), checkpoint.plain(args))
    resumed = g["parse_args"](["--out", str(out), "--resume"])
    assert {k: getattr(resumed, k) for k in saved} == saved


# -----------------------------------------------------------------------------
# SIGKILL at any moment (tests/kill.py), then --resume


def killed_and_resumed(script, args, out, kill):
    """Run under tests/kill.py (`kill`: N, die after the N-th fsync; step=K, after the metrics row of step K;
    "0": never), then --resume if killed. The checkpoint dirs the kill left (valid ones, or .tmp), the metrics
    rows, the rollout rows (RL) and the final weights."""
    proc = run(ROOT / "tests" / "kill.py", kill, script, *args, "--out", str(out), check=False)
    left = sorted(p.name for p in out.glob("checkpoint-*") if p.name.endswith(".tmp") or validate(p) is None)
    if kill != "0":
        assert proc.returncode == -9, proc.stderr[-2000:]  # killed, not finished
        run(ROOT / script, *args, "--out", str(out), "--resume")
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
    read = lambda name: [json.loads(line) for line in open(out / name)] if (out / name).exists() else None
    return left, read("metrics.jsonl"), read("rollouts.jsonl"), load_model(model_dir(out))[0].state_dict()


def kill_points(out, points):
    """(kill, the checkpoint dirs it leaves) for each point: a (save, moment) pair, or step=K (after the row
    of step K, before its save). The fsync numbers come from the layout of a finished run's checkpoint: a
    save fsyncs the E files and dirs under checkpoint-NNNNNN.tmp/ (all but the manifest), then the manifest,
    the tmp dir, and OUT once the tmp dir is renamed into place (the older checkpoint not yet deleted).
    Every step is saved (--save-every 1): save k is step k's."""
    last, = out.glob("checkpoint-*")  # --keep-checkpoints 1: the last step's
    E = sum(1 for _ in last.rglob("*")) - 1
    at = {"first file": 1, "middle": E // 2, "last file": E, "manifest": E + 1, "tmp dir": E + 2, "renamed": E + 3}
    name = lambda k, tail="": [f"checkpoint-{k:06d}{tail}"] if k else []
    return [(point, name(int(point[5:]) - 1)) if isinstance(point, str) else
            (str((point[0] - 1) * (E + 3) + at[point[1]]),
             name(point[0] - 1) + name(point[0], "" if point[1] == "renamed" else ".tmp")) for point in points]


@pytest.mark.parametrize("script, args, points", [
    ("train_sft.py", ["--preset", "toy", "--batch-size", "8", "--max-steps", "4", "--save-every", "1"],
     [(1, "first file"), (1, "manifest"), (2, "middle"), (3, "renamed")]),
    ("train_rl.py", ["--preset", "toy", "--stage", "easy", "--prompts-per-step", "2", "--group-size", "4",
                     "--max-new-tokens", "40", "--steps", "3", "--save-every", "1", "--lr", "1e-3"],
     [(2, "middle"), (2, "renamed"), "step=2"]),
])
def test_killed_anywhere_and_resumed_equals_uninterrupted(dirs, tmp_path, script, args, points):
    """SIGKILL at chosen fsyncs of the checkpoint saves (inside the first save, in the middle of a later one,
    right after a rename, before the older checkpoint is deleted) or right after a step's metrics row, then
    --resume: the metrics rows (timings and what this process captured aside), the rollout rows and the
    final weights (and so the optimizer state that produced them) equal the uninterrupted run's."""
    args = args + (["--init", str(dirs / "init")] if script == "train_rl.py" else ["--data", str(dirs / "corpus.jsonl")])
    _, rows, rollouts, weights = killed_and_resumed(script, args, tmp_path / "full", "0")
    assert len(rows) == (4 if script == "train_sft.py" else 3) and (rollouts is None) == (script == "train_sft.py")
    local = ("seconds", "tokens_per_s", "graphs", "graph_pool_gb", "capture_s")  # times, this process's captures
    untimed = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s") and k not in local} for r in rs]
    for kill, left in kill_points(tmp_path / "full", points):
        out = tmp_path / f"kill{kill.replace('=', '')}"
        got_left, got_rows, got_rollouts, got_weights = killed_and_resumed(script, args, out, kill)
        assert got_left == left, kill  # the kill came where it was aimed
        assert untimed(got_rows) == untimed(rows), kill
        assert got_rollouts == rollouts, kill
        assert weights.keys() == got_weights.keys() and all(torch.equal(weights[k], got_weights[k]) for k in weights), kill
        assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-%06d" % len(rows)], kill  # keep 1, no .tmp

# -----------------------------------------------------------------------------
# sample.py


def test_sample_show_into_a_closed_pipe_is_quiet(tmp_path):
    """`sample.py --show FILE | head`: when the reader goes, the script ends quietly (status 0, no traceback)."""
    import os
    import subprocess
    block = {"paths": ["3*7=21 vs 56 no", "8*7=56 vs 56 yes"], "summary": "x=8"}
    row = {"step": 1, "prompt": "Find x in 3 5 8 9 with x*7=56.", "main": ["", "\nFinal Answer: 8"],
           "blocks": [block], "tokens": 40, "stop_reason": "eos", "answer": "8", "gold": "8", "reward": 1.0}
    (tmp_path / "rollouts.jsonl").write_text((json.dumps(row) + "\n") * 3000)  # far more than a pipe holds
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--show", str(tmp_path / "rollouts.jsonl")],
                            cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"=== step 1, rollout 1/3000")
    proc.stdout.close()  # what `head` does once it has its lines
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err.decode()) == (0, "")
