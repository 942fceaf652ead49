"""Checkpoints: a save/resume round trip with a real Accelerator, a kill after every file
of a save, the crash between the two renames, damaged files, the output-dir guard,
metrics trimming, a changed --lr on resume, and model.load / the toy preset on a run dir."""

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from nanopr1 import UsageError, checkpoint, toy
from nanopr1.checkpoint import RUN_FILES, apply_lr, latest, load_state, model_dir, prepare_out, save, trim_metrics, validate
from nanopr1.model import load
from nanopr1.model import save as save_model

LR = 1e-3


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return toy.init_dir(tmp_path_factory.mktemp("toy") / "init")


def trainer(toy_dir, lr=LR, schedule=True):
    """The toy model with AdamW (and a LambdaLR) through a real CPU Accelerator."""
    acc = Accelerator(cpu=True)
    model, tokenizer = load(toy_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1)) if schedule else None
    model, opt, sched = acc.prepare(model, opt, sched) if schedule else (*acc.prepare(model, opt), None)
    return SimpleNamespace(acc=acc, model=model, tokenizer=tokenizer, opt=opt, sched=sched)


def train(t, steps):
    for _ in range(steps):
        ids = torch.randint(0, len(t.tokenizer), (2, 12))
        t.acc.backward(t.model(input_ids=ids, labels=ids).loss)
        t.opt.step()
        if t.sched:
            t.sched.step()
        t.opt.zero_grad()


def writer(t):
    """The `write` callback the scripts pass: the model dir that model.load reads."""
    return lambda d: save_model(t.acc.unwrap_model(t.model), t.tokenizer, d,
                                state_dict=t.acc.get_state_dict(t.model), is_main=t.acc.is_main_process)


def contents(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def snapshot(d):
    return {p.relative_to(d).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def weights(t):
    return {k: v.detach().clone() for k, v in t.acc.unwrap_model(t.model).state_dict().items()}


def equal(a, b):
    """Exact equality of nested dicts / lists of tensors (optimizer state dicts)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(equal, a, b))
    return a == b


def rows(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]

# -----------------------------------------------------------------------------
# (a) round trip, (f) model.load on a run dir


def test_round_trip_restores_weights_optimizer_rng_step_and_metrics(tmp_path, toy_dir):
    t, out = trainer(toy_dir), tmp_path / "run"
    train(t, 2)
    save(out, 2, t.acc, writer(t), args={"lr": LR, "stage": "easy"})
    saved_w, saved_opt, saved_lr = weights(t), t.opt.state_dict(), t.sched.get_last_lr()
    saved_opt = json.loads(json.dumps(saved_opt, default=lambda x: x.tolist()))  # a deep copy
    draws = (torch.rand(4), random.random())
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    train(t, 3)  # everything moves on
    torch.rand(9)
    random.random()
    assert not equal(weights(t), saved_w)

    step, args = load_state(out, t.acc)
    assert (step, args) == (2, {"lr": LR, "stage": "easy"})
    assert equal(weights(t), saved_w)
    assert equal(json.loads(json.dumps(t.opt.state_dict(), default=lambda x: x.tolist())), saved_opt)
    assert t.sched.get_last_lr() == saved_lr
    assert torch.equal(torch.rand(4), draws[0]) and random.random() == draws[1]
    assert rows(out) == [1, 2]  # rows after the checkpoint and the torn line are dropped

    loaded = load(str(out))[0].state_dict()  # (f) the run dir loads as its checkpoint
    assert model_dir(out) == out / "checkpoint"
    assert all(torch.equal(loaded[k], v) for k, v in saved_w.items() if k in loaded)


def test_model_load_resolves_run_dirs(tmp_path, toy_dir):
    """A plain model dir loads as before; a run dir loads its checkpoint, or checkpoint.old
    after a kill mid-swap; a run dir with nothing valid is a one-line error naming the file."""
    t, out = trainer(toy_dir), tmp_path / "run"
    save(out, 1, t.acc, writer(t))
    assert model_dir(toy_dir) == Path(toy_dir)
    (out / "checkpoint").rename(out / "checkpoint.old")
    assert model_dir(out) == out / "checkpoint.old"
    load(str(out))
    (out / "checkpoint.old" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="checkpoint.old/config.json: 2 bytes") as e:
        load(str(out))
    assert "\n" not in str(e.value)


def test_the_toy_preset_finds_the_newest_run_dir(tmp_path, toy_dir, monkeypatch):
    """sample.py --preset toy without --model loads the newest stage the toy curriculum wrote: run dirs
    (a checkpoint inside), and a plain model dir too."""
    monkeypatch.chdir(tmp_path)
    assert toy.latest_model() is None
    shutil.copytree(toy_dir, "out/toy-sft")  # a plain model dir
    assert toy.latest_model() == "out/toy-sft"
    save(Path("out/toy-easy"), 1, trainer(toy_dir).acc, lambda d: shutil.copytree(toy_dir, d, dirs_exist_ok=True))
    assert toy.latest_model() == "out/toy-easy"
    Path("out/toy-hard").mkdir()  # started, nothing saved yet
    assert toy.latest_model() == "out/toy-easy"

# -----------------------------------------------------------------------------
# (b) a kill after any file, (c) between the renames, (d) damaged files


class Killed(Exception):
    pass


def test_a_kill_after_any_file_of_a_save_leaves_a_complete_checkpoint(tmp_path, toy_dir, monkeypatch):
    t = trainer(toy_dir)
    train(t, 1)
    save(tmp_path / "base", 1, t.acc, writer(t))
    before = contents(tmp_path / "base" / "checkpoint")
    train(t, 1)
    save(tmp_path / "ref", 2, t.acc, writer(t))  # what an uninterrupted save writes
    after = contents(tmp_path / "ref" / "checkpoint")
    assert before != after
    kill = 0
    while True:  # kill after the 1st, 2nd, ... file the save writes or renames, until one finishes
        out = tmp_path / f"kill{kill}"
        shutil.copytree(tmp_path / "base", out)
        seen = []

        def die(path):
            seen.append(path)
            if len(seen) > kill:
                if path.is_file() and "checkpoint.tmp" in path.parts:
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # torn, as a kill mid-write
                raise Killed(path)
        monkeypatch.setattr(checkpoint, "_after_file", die)
        try:
            save(out, 2, t.acc, writer(t))
        except Killed:
            found = latest(out)
            assert found is not None, f"nothing valid after a kill at {seen[-1]}"
            assert (found[1], contents(found[0])) in ((1, before), (2, after)), seen[-1]
            assert model_dir(out) == found[0]
            monkeypatch.setattr(checkpoint, "_after_file", None)  # the next save cleans up and completes
            save(out, 2, t.acc, writer(t))
        monkeypatch.setattr(checkpoint, "_after_file", None)
        assert latest(out) == (out / "checkpoint", 2) and contents(out / "checkpoint") == after
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]
        if len(seen) <= kill:  # the save ran to the end
            break
        kill += 1
    assert kill > len(after)  # every file, then the renames


@pytest.mark.parametrize("left", [("checkpoint.old", "checkpoint.tmp"), ("checkpoint.old",)])
def test_a_crash_between_the_renames_is_recovered(tmp_path, toy_dir, left):
    t, out = trainer(toy_dir), tmp_path / "run"
    train(t, 1)
    save(out, 1, t.acc, writer(t))
    w1 = weights(t)
    train(t, 1)
    save(tmp_path / "new", 2, t.acc, writer(t))
    (out / "checkpoint").rename(out / "checkpoint.old")  # killed after the first rename
    if "checkpoint.tmp" in left:
        (tmp_path / "new" / "checkpoint").rename(out / "checkpoint.tmp")
    assert sorted(p.name for p in out.iterdir()) == sorted(left)
    assert latest(out) == (out / "checkpoint.old", 1)
    assert load_state(out, t.acc)[0] == 1 and equal(weights(t), w1)
    save(out, 3, t.acc, writer(t))
    assert latest(out) == (out / "checkpoint", 3) and sorted(p.name for p in out.iterdir()) == ["checkpoint"]


def truncate(f):
    f.write_bytes(f.read_bytes()[:100])


DAMAGE = [  # (file of the checkpoint, damage, what the reason says)
    ("model.safetensors", truncate, "bytes, the manifest says"),
    ("state/model.safetensors", truncate, "bytes, the manifest says"),
    ("state/optimizer.bin", lambda f: f.unlink(), "missing"),
    ("step.json", lambda f: f.write_text(""), "0 bytes, the manifest says"),
    ("step.json", lambda f: f.write_text(" " * f.stat().st_size), "not JSON (Expecting value"),
    ("step.json", lambda f: f.write_text("[" + " " * (f.stat().st_size - 2) + "]"), "not the manifest's step 2"),
    ("manifest.json", lambda f: f.unlink(), "missing"),
    ("manifest.json", lambda f: f.write_text("[]"), "not a manifest"),
]


@pytest.mark.parametrize("name,damage,says", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_the_previous_one_used(tmp_path, toy_dir, name, damage, says):
    t = trainer(toy_dir)
    save(tmp_path / "a", 1, t.acc, writer(t))
    train(t, 1)
    out = tmp_path / "run"
    save(out, 2, t.acc, writer(t))
    damage(out / "checkpoint" / name)
    reason = validate(out / "checkpoint")
    assert reason.startswith(f"{out / 'checkpoint' / name}: ") and says in reason and "\n" not in reason
    for call in (lambda: load_state(out, t.acc), lambda: prepare_out(out, {}, t.acc, resume=True), lambda: load(str(out))):
        with pytest.raises(UsageError) as e:
            call()
        assert reason in str(e.value) and "\n" not in str(e.value)
    shutil.copytree(tmp_path / "a" / "checkpoint", out / "checkpoint.old")  # a previous, valid one
    assert latest(out) == (out / "checkpoint.old", 1) and load_state(out, t.acc)[0] == 1

# -----------------------------------------------------------------------------
# (e) the output-dir guard


SAVED = {"stage": "easy", "data": "gsm8k", "group_size": 5, "lr": 1e-6, "steps": 35}
SFT = {"data": "out/parallel_gsm8k.jsonl", "lr": 1e-5, "steps": 0}
SAME, MAY_CHANGE = ("stage", "data", "group_size"), ("lr", "steps")
GUARD = [  # (dir holds, new args, flags, refused because / note says)
    ("nothing", SAVED, {}, None, ""),
    ("no dir", SAVED, {}, None, ""),
    ("run", SAVED, {}, "already holds a run (checkpoint, metrics.jsonl): --resume continues it, --overwrite starts over", None),
    ("metrics", SAVED, {}, "already holds a run (metrics.jsonl)", None),
    ("run", {**SAVED, "lr": 5e-6}, {"overwrite": True}, None, "--overwrite: removed checkpoint, metrics.jsonl"),
    ("run", {**SAVED, "stage": "hard"}, {"resume": True}, "holds another run: stage was 'easy', now 'hard'", None),
    ("run", {**SAVED, "data": "dapo"}, {"resume": True}, "data was 'gsm8k', now 'dapo'", None),
    ("sft run", SAVED, {"resume": True}, "stage was unset, now 'easy'", None),
    ("run", {**SAVED, "lr": 2e-6, "steps": 50}, {"resume": True}, None, "at step 12 with lr 1e-06 -> 2e-06, steps 35 -> 50"),
    ("run", SAVED, {"resume": True}, None, "at step 12"),
    ("metrics", SAVED, {"resume": True}, None, "has no checkpoint yet: starting from step 0"),  # killed before one
    ("nothing", SAVED, {"resume": True}, "checkpoint: missing", None),
    ("run", SAVED, {"resume": True, "overwrite": True}, "--resume and --overwrite exclude each other", None),
    ("old layout", SAVED, {"resume": True}, "state is an older nanopr1's checkpoint and cannot be resumed", None),
    ("old layout", SAVED, {}, "already holds a run (args.json, state)", None),
    ("old layout", SAVED, {"overwrite": True}, None, "--overwrite: removed args.json, state"),
]


@pytest.mark.parametrize("holds,args,flags,refused,note", GUARD)
def test_output_dir_guard(tmp_path, holds, args, flags, refused, note):
    acc, out = Accelerator(cpu=True), tmp_path / "out"
    if holds != "no dir":
        out.mkdir()
        (out / "notes.txt").write_text("the user's, not ours")
    if holds in ("run", "sft run"):
        save(out, 12, acc, lambda d: (d / "config.json").write_text("{}"), args=SFT if holds == "sft run" else SAVED)
    if holds == "old layout":  # the model and its state/ directly in OUT
        (out / "state").mkdir()
        (out / "state" / "step.json").write_text('{"step": 12}')
        (out / "args.json").write_text(json.dumps(SAVED))
    if holds in ("run", "sft run", "metrics"):
        (out / "metrics.jsonl").write_text(json.dumps({"step": 12}) + "\n")
    before = snapshot(out) if out.exists() else None
    if refused:
        with pytest.raises(UsageError) as e:
            prepare_out(out, args, acc, same=SAME, may_change=MAY_CHANGE, **flags)
        assert refused in str(e.value) and "\n" not in str(e.value)
        assert (snapshot(out) if out.exists() else None) == before  # not a byte, not an mtime
        return
    saved, said = prepare_out(out, args, acc, same=SAME, may_change=MAY_CHANGE, **flags)
    assert note in said and (said == "") == (note == "")
    assert saved == (SAVED if flags.get("resume") and holds != "metrics" else None)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []  # a fresh run makes OUT when it writes
    if holds == "metrics":  # restarted: the rows of the steps that never got a checkpoint are gone
        assert (out / "metrics.jsonl").read_text() == ""
    elif flags.get("overwrite") or holds in ("nothing", "no dir"):
        assert not set(left) & set(RUN_FILES) and left == ([] if holds == "no dir" else ["notes.txt"])
    else:
        assert snapshot(out) == before  # resuming changes nothing yet

# -----------------------------------------------------------------------------
# metrics trimming, a new --lr on resume


@pytest.mark.parametrize("text,step,kept", [
    ('{"step": 1}\n{"step": 2}\n{"step": 3}\n', 2, [1, 2]),
    ('{"step": 1}\n{"step": 2}\n{"step": 3, "lo', 5, [1, 2]),  # torn by a kill mid-write
    ('{"step": 1}\n\n{"step": 2}\n', 2, [1, 2]),
    ('{"step": 3}\n', 0, []),
])
def test_trim_metrics(tmp_path, text, step, kept):
    (tmp_path / "metrics.jsonl").write_text(text)
    trim_metrics(tmp_path, step)
    assert rows(tmp_path) == kept and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("schedule", [True, False])
def test_a_new_lr_applies_after_load_state(tmp_path, toy_dir, schedule):
    t = trainer(toy_dir, schedule=schedule)
    train(t, 3)
    save(tmp_path, 3, t.acc, writer(t))
    t = trainer(toy_dir, lr=4 * LR, schedule=schedule)  # the resumed run, with --lr 4e-3
    load_state(tmp_path, t.acc)
    factor = (lambda s: 1 / (s + 1)) if schedule else (lambda s: 1)
    assert [g["lr"] for g in t.opt.param_groups] == [pytest.approx(LR * factor(3))]  # the saved lr came back
    apply_lr(t.opt, 4 * LR, t.sched)
    assert [g["lr"] for g in t.opt.param_groups] == [pytest.approx(4 * LR * factor(3))]
    train(t, 1)  # the schedule goes on from the new base
    assert [g["lr"] for g in t.opt.param_groups] == [pytest.approx(4 * LR * factor(4))]
    if schedule:
        assert t.sched.get_last_lr() == [pytest.approx(4 * LR * factor(4))]
