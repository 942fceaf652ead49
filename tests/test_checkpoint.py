"""Checkpoints: a save/resume round trip with a real Accelerator (the weights written once, LoRA too), a
kill after every fsync of a save, --keep-checkpoints, damaged checkpoints (sizes and content), no checkpoint
of non-finite weights, the output-dir guard (--resume's flag rules) and its lock, log trimming, a changed
--lr on resume, and model_dir (what model.load_model reads) / the toy preset on run dirs."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import ENV, ROOT, init_toy_dir, run
from nanopr1 import UsageError, checkpoint, recipes
from nanopr1.checkpoint import (LOGS, apply_lr, checkpoints, latest, load_state, lock, model_dir, prepare_out,
                                release, save, save_checkpoint, trim_logs, validate)
from nanopr1.model import apply_lora, load_model, save_model

LR = 1e-3


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return init_toy_dir(tmp_path_factory.mktemp("toy") / "init")


@pytest.fixture(autouse=True)
def no_lock_left():
    """Each test lets go of the output dirs its prepare_out calls locked (a run does at exit)."""
    yield
    release()


def trainer(toy_dir, lr=LR, schedule=True):
    """The toy model with AdamW (and a LambdaLR) through a real CPU Accelerator."""
    acc = Accelerator(cpu=True)
    model, tokenizer = load_model(toy_dir)
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


def ckpt(out, step):
    return Path(out) / f"checkpoint-{step:06d}"


def names(d):
    return sorted(p.name for p in Path(d).iterdir())


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


def rows(path):
    return [json.loads(line)["step"] for line in Path(path).read_text().splitlines()]


def fake_model(d):
    (d / "config.json").write_text("{}")

# -----------------------------------------------------------------------------
# round trip, model_dir on run dirs and step dirs, the toy preset


def test_round_trip_restores_weights_optimizer_rng_step_and_logs(tmp_path, toy_dir):
    t, out = trainer(toy_dir), tmp_path / "run"
    train(t, 2)
    assert save(out, 2, t.acc, writer(t), args={"lr": LR, "stage": "easy"}).path == ckpt(out, 2)
    assert names(ckpt(out, 2) / "state") == ["optimizer.bin", "random_states_0.pkl", "scheduler.bin"]  # no weights
    saved_w, saved_opt, saved_lr = weights(t), t.opt.state_dict(), t.sched.get_last_lr()
    saved_opt = json.loads(json.dumps(saved_opt, default=lambda x: x.tolist()))  # a deep copy
    draws = (torch.rand(4), random.random())
    for name in LOGS:  # rows of steps 1..3, then a line torn by a kill
        (out / name).write_text("".join(json.dumps({"step": s, "x": name}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    train(t, 3)  # everything moves on: load_state reads the weights back from the model dir
    torch.rand(9)
    random.random()
    assert not equal(weights(t), saved_w)

    assert load_state(out, t.acc) == 2
    assert equal(weights(t), saved_w)
    assert equal(json.loads(json.dumps(t.opt.state_dict(), default=lambda x: x.tolist())), saved_opt)
    assert t.sched.get_last_lr() == saved_lr
    assert torch.equal(torch.rand(4), draws[0]) and random.random() == draws[1]
    for name in LOGS:  # rows after the checkpoint and the torn line are dropped, from every log
        assert rows(out / name) == [1, 2]
    assert names(out) == sorted([ckpt(out, 2).name, *LOGS])  # no .tmp left by the trimming
    assert json.loads((ckpt(out, 2) / "args.json").read_text()) == {"lr": LR, "stage": "easy"}
    assert json.loads((ckpt(out, 2) / "step.json").read_text()) == {"step": 2}
    assert checkpoints(out) == [(2, ckpt(out, 2))] and validate(ckpt(out, 2)) is None

    assert model_dir(out) == ckpt(out, 2)  # the run dir loads as its newest checkpoint
    loaded = load_model(model_dir(out))[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved_w.items() if k in loaded)


def test_model_dir_resolves_run_dirs_and_step_dirs(tmp_path, toy_dir):
    """A plain model dir and a step checkpoint dir load as themselves; a run dir loads its newest valid
    checkpoint (an older one when the newest is damaged; never a .tmp); a run dir with nothing valid is
    a one-line error naming the damaged file."""
    t, out = trainer(toy_dir), tmp_path / "run"
    assert Path(model_dir(toy_dir)) == Path(toy_dir)
    save(out, 1, t.acc, writer(t), keep=2)
    w1 = load_model(model_dir(out))[0].state_dict()
    train(t, 1)
    save(out, 2, t.acc, writer(t), keep=2)
    w2 = load_model(model_dir(out))[0].state_dict()
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)
    assert model_dir(out) == ckpt(out, 2)
    assert model_dir(ckpt(out, 1)) == ckpt(out, 1)  # a step dir: itself
    step1 = load_model(model_dir(ckpt(out, 1)))[0].state_dict()
    assert all(torch.equal(step1[k], w1[k]) for k in w1)
    shutil.copytree(ckpt(out, 2), out / "checkpoint-000003.tmp")  # a killed save's leftovers: never read
    assert model_dir(out) == ckpt(out, 2)
    (ckpt(out, 2) / "config.json").write_text("{}")  # damaged: the older one is the run's model
    assert model_dir(out) == ckpt(out, 1)
    assert all(torch.equal(v, w1[k]) for k, v in load_model(model_dir(out))[0].state_dict().items())
    (ckpt(out, 1) / "model.safetensors").unlink()
    with pytest.raises(UsageError) as e:
        model_dir(out)
    said = str(e.value)
    assert said.startswith(f"no valid checkpoint in {out}: ") and "\n" not in said
    assert f"{ckpt(out, 2) / 'config.json'}: 2 bytes, the manifest says" in said
    assert f"{ckpt(out, 1) / 'model.safetensors'}: missing" in said
    empty = tmp_path / "empty"  # neither a model nor a run: load says what it expected
    empty.mkdir()
    assert Path(model_dir(empty)) == Path(empty)
    with pytest.raises(UsageError, match="no such model directory"):
        load_model(model_dir(empty))


def test_the_toy_preset_finds_the_newest_run_dir(tmp_path, toy_dir, monkeypatch):
    """sample.py --preset toy without --model loads the newest stage the toy curriculum wrote: a run dir
    with a valid checkpoint, or a plain model dir; a stage that has only started (nothing saved, a killed
    save's .tmp, a damaged checkpoint) is passed over."""
    monkeypatch.chdir(tmp_path)
    assert recipes.latest_toy_model() is None
    shutil.copytree(toy_dir, "out/toy-sft")  # a plain model dir
    assert recipes.latest_toy_model() == "out/toy-sft"
    copy = lambda d: shutil.copytree(toy_dir, d, dirs_exist_ok=True)
    save(Path("out/toy-easy"), 1, trainer(toy_dir).acc, copy)
    assert recipes.latest_toy_model() == "out/toy-easy"
    Path("out/toy-hard/checkpoint-000025.tmp").mkdir(parents=True)  # started, killed in its first save
    assert recipes.latest_toy_model() == "out/toy-easy"
    save(Path("out/toy-hard"), 5, trainer(toy_dir).acc, copy)
    (ckpt("out/toy-hard", 5) / "step.json").unlink()
    assert recipes.latest_toy_model() == "out/toy-easy"
    save(Path("out/toy-hard"), 6, trainer(toy_dir).acc, copy, keep=2)
    assert recipes.latest_toy_model() == "out/toy-hard"
    assert model_dir("out/toy-hard") == ckpt("out/toy-hard", 6)

# -----------------------------------------------------------------------------
# the weights written once (a full fine-tune, LoRA), never a checkpoint of NaN or inf


def nbytes(d):
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def test_a_checkpoint_holds_the_weights_once(tmp_path, toy_dir, capsys):
    """AdamW on the toy model: the weights (model dir) and the two moments make 3x the fp32 weights; the
    optimizer state is not a copy more. save_checkpoint says the size in one line and returns it; --resume
    reads the weights from the model dir, exactly."""
    t, out = trainer(toy_dir), tmp_path / "run"
    train(t, 1)
    capsys.readouterr()
    saved = save_checkpoint(out, 1, t.acc, t.model, t.tokenizer, Namespace(lr=LR, _typed=set()))
    fp32 = sum(q.numel() * 4 for q in t.model.parameters())  # (the tied head counted once)
    assert saved.path == ckpt(out, 1) and nbytes(saved.path) <= 3.1 * fp32
    assert saved.checkpoint_gb == pytest.approx(nbytes(saved.path) / 1e9, rel=0.01)
    assert capsys.readouterr().out == f"checkpoint-000001: {saved.checkpoint_gb:.3g} GB\n"
    saved_w, saved_opt = weights(t), json.loads(json.dumps(t.opt.state_dict(), default=lambda x: x.tolist()))
    train(t, 2)
    assert load_state(out, t.acc) == 1 and equal(weights(t), saved_w)
    assert equal(json.loads(json.dumps(t.opt.state_dict(), default=lambda x: x.tolist())), saved_opt)


def lora_trainer(toy_dir):
    """The toy model in bf16 with LoRA adapters (fp32, as peft makes them) and AdamW on them."""
    acc = Accelerator(cpu=True)
    model, tokenizer = load_model(toy_dir, "bfloat16")
    model = apply_lora(model, r=4, alpha=8)
    with torch.no_grad():  # lora_B starts at 0: make the adapters count
        for name, q in model.named_parameters():
            if "lora_B" in name:
                q.normal_(0, 0.05)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR)
    model, opt = acc.prepare(model, opt)
    return SimpleNamespace(acc=acc, model=model, tokenizer=tokenizer, opt=opt, sched=None)


def test_a_lora_checkpoint_keeps_the_adapters_and_resumes(tmp_path, toy_dir):
    """A LoRA checkpoint: the merged model dir, and in state/ only the trained adapters (not the base again);
    --resume restores the adapters and their optimizer state exactly, the frozen base untouched."""
    t, out = lora_trainer(toy_dir), tmp_path / "run"
    train(t, 1)
    saved = save_checkpoint(out, 1, t.acc, t.model, t.tokenizer, Namespace(lr=LR, _typed=set()))
    trained = {n for n, q in t.model.named_parameters() if q.requires_grad}
    assert set(load_file(saved.path / "state" / "model.safetensors")) == trained
    adapters = sum(q.numel() * q.element_size() for q in t.model.parameters() if q.requires_grad)
    assert nbytes(saved.path / "state") <= 4 * adapters  # the adapters, two moments, the RNG: not the base
    saved_w, saved_opt = weights(t), json.loads(json.dumps(t.opt.state_dict(), default=lambda x: x.tolist()))
    train(t, 2)
    assert not equal(weights(t), saved_w)
    assert load_state(out, t.acc) == 1 and equal(weights(t), saved_w)
    assert equal(json.loads(json.dumps(t.opt.state_dict(), default=lambda x: x.tolist())), saved_opt)


def test_a_lora_checkpoint_keeps_the_base_dtype(tmp_path, toy_dir):
    """The merged weights of a bf16 base stay bf16 in the model dir (adapted projections too), and equal
    W + B A * scaling computed in fp32, rounded once."""
    t, out = lora_trainer(toy_dir), tmp_path / "run"
    saved = save_checkpoint(out, 1, t.acc, t.model, t.tokenizer, Namespace(lr=LR, _typed=set()))
    merged = load_file(saved.path / "model.safetensors")
    assert {str(w.dtype) for w in merged.values()} == {"torch.bfloat16"}
    layer = t.model.base_model.model.model.layers[0].self_attn.q_proj
    want = layer.base_layer.weight.float() + layer.lora_B["default"].weight @ layer.lora_A["default"].weight * 2
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], want.to(torch.bfloat16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_no_checkpoint_of_non_finite_weights(tmp_path, toy_dir, bad):
    """A NaN or inf in the weights: the save is refused in one line before anything is written, and the last
    good checkpoint stays, also with --keep-checkpoints 1."""
    t, out, args = trainer(toy_dir), tmp_path / "run", Namespace(lr=LR, _typed=set())
    save_checkpoint(out, 1, t.acc, t.model, t.tokenizer, args, keep=1)
    before = snapshot(out)
    with torch.no_grad():
        t.model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    with pytest.raises(UsageError) as e:
        save_checkpoint(out, 2, t.acc, t.model, t.tokenizer, args, keep=1)
    said = str(e.value)
    assert said == f"step 2: 1 weight tensor(s) hold NaN or inf: checkpoint not written (the newest in {out} is " \
                   "older; a lower --lr?)"
    assert snapshot(out) == before and latest(out) == (ckpt(out, 1), 1)

# -----------------------------------------------------------------------------
# a kill after any fsync of a save, --keep-checkpoints, damaged checkpoints


class Killed(Exception):
    pass


@pytest.mark.parametrize("torn", [False, True])
def test_a_kill_after_any_fsync_of_a_save_leaves_a_complete_checkpoint(tmp_path, toy_dir, monkeypatch, torn):
    """Die after the 1st, 2nd, ... fsync a save makes (torn: with the file just synced cut in half, as a kill
    in the middle of writing it): the previous checkpoint stays valid (or the new one is complete), and the
    next save completes, removes the .tmp and keeps only the newest."""
    t = trainer(toy_dir)
    train(t, 1)
    save(tmp_path / "base", 1, t.acc, writer(t), args={"lr": LR})
    before = contents(ckpt(tmp_path / "base", 1))
    train(t, 1)
    save(tmp_path / "ref", 2, t.acc, writer(t), args={"lr": LR})  # what an uninterrupted save writes
    after = contents(ckpt(tmp_path / "ref", 2))
    assert before != after
    real, kill, found_steps = checkpoint._fsync, 0, set()
    while True:  # kill at the 1st, 2nd, ... fsync, until a save finishes
        out = tmp_path / f"kill{kill}"
        shutil.copytree(tmp_path / "base", out)
        seen = []

        def die(path):
            real(path)
            seen.append(Path(path))
            if len(seen) > kill:
                path = Path(path)
                if torn and path.is_file() and path.relative_to(out).parts[0].endswith(".tmp"):
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                raise Killed(path)
        monkeypatch.setattr(checkpoint, "_fsync", die)
        try:
            save(out, 2, t.acc, writer(t), args={"lr": LR})
        except Killed:
            monkeypatch.setattr(checkpoint, "_fsync", real)
            found = latest(out)
            assert found is not None, f"nothing valid after a kill at {seen[-1]}"
            assert (found[1], contents(found[0])) in ((1, before), (2, after)), seen[-1]
            assert model_dir(out) == found[0] and found[0] == ckpt(out, found[1])
            found_steps.add(found[1])
            save(out, 2, t.acc, writer(t), args={"lr": LR})  # the next save cleans up and completes
        monkeypatch.setattr(checkpoint, "_fsync", real)
        assert latest(out) == (ckpt(out, 2), 2) and contents(ckpt(out, 2)) == after
        assert names(out) == [ckpt(out, 2).name]
        if len(seen) <= kill:  # the save ran to the end
            break
        kill += 1
    entries = sum(1 for _ in ckpt(out, 2).rglob("*")) - 1  # every file and dir but the manifest
    assert kill == entries + 3  # each of them, the manifest, the tmp dir, OUT
    assert seen[-3:] == [ckpt(out, 2).with_name(ckpt(out, 2).name + ".tmp") / "manifest.json",
                         ckpt(out, 2).with_name(ckpt(out, 2).name + ".tmp"), out]
    assert found_steps == {1, 2}  # killed before the rename: the previous one; after it: the new one


@pytest.mark.parametrize("keep", [1, 2, 3, 9])
def test_keep_checkpoints_keeps_the_newest_k(tmp_path, toy_dir, keep):
    acc, out = Accelerator(cpu=True), tmp_path / "run"
    for step in (5, 10, 15, 20, 25):
        save(out, step, acc, fake_model, args={"step": step}, keep=keep)
        kept = [s for s in (5, 10, 15, 20, 25) if s <= step][-keep:]
        assert checkpoints(out) == [(s, ckpt(out, s)) for s in kept]
        assert names(out) == [ckpt(out, s).name for s in kept]  # nothing else, no .tmp
        assert all(validate(p) is None for _, p in checkpoints(out))
        assert latest(out) == (ckpt(out, step), step)


def truncate(f):
    f.write_bytes(f.read_bytes()[:100])


def scribble(at):
    """Overwrite 64 bytes in place from `at` (a fraction of the file): the size stays, the content does not."""
    def damage(f):
        data = bytearray(f.read_bytes())
        start = int(at * len(data))
        data[start:start + 64] = bytes(255 - b for b in data[start:start + 64])
        f.write_bytes(bytes(data))
    return damage


SHA256 = "not the content the manifest vouches for (sha256)"
DAMAGE = [  # (file of the checkpoint, damage, what the reason says)
    ("model.safetensors", truncate, "bytes, the manifest says"),
    ("model.safetensors", scribble(0), SHA256),  # the safetensors header: its length and JSON
    ("state/optimizer.bin", scribble(0.5), SHA256),  # the optimizer's moments
    ("state/optimizer.bin", truncate, "bytes, the manifest says"),
    ("state/random_states_0.pkl", lambda f: f.unlink(), "missing"),
    ("args.json", lambda f: f.write_text("{}"), "2 bytes, the manifest says"),
    ("step.json", lambda f: f.write_text(""), "0 bytes, the manifest says"),
    ("step.json", lambda f: f.write_text(" " * f.stat().st_size), "not JSON (Expecting value"),
    ("step.json", lambda f: f.write_text("[" + " " * (f.stat().st_size - 2) + "]"), "not the manifest's step 2"),
    ("manifest.json", lambda f: f.unlink(), "missing"),
    ("manifest.json", lambda f: f.write_text("[]"), "not a manifest"),
]


@pytest.mark.parametrize("name,damage,says", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_the_previous_one_used(tmp_path, toy_dir, capsys, name, damage, says):
    """Damaged in size, in content at the same size, missing: every loader (model.load, --resume, sample.py's
    and eval.py's model_dir) uses the previous checkpoint with a one-line note; none valid: a one-line error."""
    t, out, args = trainer(toy_dir), tmp_path / "run", {"lr": LR, "stage": "easy"}
    save(out, 1, t.acc, writer(t), args=args, keep=2)
    w1 = weights(t)
    train(t, 1)
    save(out, 2, t.acc, writer(t), args=args, keep=2)
    shutil.copytree(out, tmp_path / "alone")
    shutil.rmtree(ckpt(tmp_path / "alone", 1))  # the same run with no older checkpoint
    for d in (out, tmp_path / "alone"):
        damage(ckpt(d, 2) / name)
    reason = validate(ckpt(out, 2))
    assert reason.startswith(f"{ckpt(out, 2) / name}: ") and says in reason and "\n" not in reason
    # the previous valid checkpoint is the run's model and where --resume starts, said in one line
    capsys.readouterr()
    assert latest(out) == (ckpt(out, 1), 1) and model_dir(out) == ckpt(out, 1)
    assert capsys.readouterr().err == f"note: checkpoint-000001 is used: {reason}\n"
    assert all(torch.equal(v, w1[k]) for k, v in load_model(model_dir(out))[0].state_dict().items() if k in w1)
    typed = Namespace(lr=LR, stage="easy", _typed=set())
    said = prepare_out(out, typed, t.acc, resume=True, refuse=("stage",), apply=("lr",))
    assert said.split("\n") == [f"--resume: checkpoint-000001 is used: {reason}", f"resuming {out} at step 1"]
    assert load_state(out, t.acc) == 1 and equal(weights(t), w1)
    # nothing valid: every reader says why in one line
    alone = tmp_path / "alone"
    reason = validate(ckpt(alone, 2))
    for call in (lambda: load_state(alone, t.acc), lambda: model_dir(alone),
                 lambda: prepare_out(alone, Namespace(lr=LR, stage="easy", _typed=set()), t.acc, resume=True)):
        with pytest.raises(UsageError) as e:
            call()
        assert reason in str(e.value) and "\n" not in str(e.value)

# -----------------------------------------------------------------------------
# the output-dir guard and --resume's flag rules


SAVED = {"stage": "easy", "data": "gsm8k", "group_size": 5, "lr": 1e-6, "steps": 35, "script": "train_rl"}
REFUSE, APPLY = ("stage", "data", "group_size", "script"), ("lr", "steps")
NEW_DEFAULTS = {"stage": "hard", "data": "dapo", "group_size": 8, "lr": 5e-5, "steps": 40, "script": "train_rl"}
WAS = "--resume: {out} was run with "
KEEPS = ": a resumed run keeps it (--overwrite starts over; or choose another --out)"
GUARD = [  # (dir holds, new args, typed, flags, refused because (the whole message) / note (the whole note), args after)
    ("nothing", SAVED, (), {}, None, "", SAVED),
    ("no dir", SAVED, (), {}, None, "", SAVED),
    ("run", SAVED, (), {}, "{out} already holds a run (checkpoint-000012, metrics.jsonl): --resume continues it, "
                           "--overwrite starts over", None, None),
    ("metrics", SAVED, (), {}, "{out} already holds a run (metrics.jsonl): --resume continues it, --overwrite starts "
                               "over", None, None),
    ("tmp", SAVED, (), {}, "{out} already holds a run (checkpoint-000012.tmp, metrics.jsonl): --resume continues it, "
                           "--overwrite starts over", None, None),
    ("run", {**SAVED, "lr": 5e-6}, {"lr"}, {"overwrite": True}, None,
     "--overwrite: removed checkpoint-000012, metrics.jsonl from {out}", {**SAVED, "lr": 5e-6}),
    ("run", {**SAVED, "stage": "hard"}, {"stage"}, {"resume": True}, WAS + "--stage 'easy', not 'hard'" + KEEPS, None, None),
    ("run", {**SAVED, "group_size": 8}, {"group_size", "lr"}, {"resume": True}, WAS + "--group-size 5, not 8" + KEEPS,
     None, None),
    ("sft run", SAVED, {"script"}, {"resume": True}, WAS + "--script 'train_sft', not 'train_rl'" + KEEPS, None, None),
    ("run", SAVED, {"stage", "data", "group_size"}, {"resume": True}, None, "resuming {out} at step 12", SAVED),
    ("run", {**SAVED, "lr": 2e-6, "steps": 50}, {"lr", "steps"}, {"resume": True}, None,
     "resuming {out} at step 12 with lr 1e-06 -> 2e-06, steps 35 -> 50", {**SAVED, "lr": 2e-6, "steps": 50}),
    ("run", NEW_DEFAULTS, (), {"resume": True}, None, "resuming {out} at step 12", SAVED),  # untyped: the run's
    ("run", {**NEW_DEFAULTS, "steps": 50}, {"steps"}, {"resume": True}, None,
     "resuming {out} at step 12 with steps 35 -> 50", {**SAVED, "steps": 50}),
    ("metrics", SAVED, (), {"resume": True}, None, "--resume: {out} has no checkpoint yet: starting from step 0", SAVED),
    ("tmp", SAVED, (), {"resume": True}, None, "--resume: {out} has no checkpoint yet: starting from step 0", SAVED),
    ("nothing", SAVED, (), {"resume": True}, "--resume: no valid checkpoint in {out}: no checkpoint-* dir", None, None),
    ("no dir", SAVED, (), {"resume": True}, "--resume: no valid checkpoint in {out}: no checkpoint-* dir", None, None),
    ("damaged", SAVED, (), {"resume": True},
     "--resume: no valid checkpoint in {out}: {out}/checkpoint-000012/manifest.json: missing", None, None),
    ("run", SAVED, (), {"resume": True, "overwrite": True}, "--resume and --overwrite exclude each other", None, None),
]


@pytest.mark.parametrize("holds,new,typed,flags,refused,note,after", GUARD)
def test_output_dir_guard(tmp_path, holds, new, typed, flags, refused, note, after):
    acc, out = Accelerator(cpu=True), tmp_path / "out"
    if holds != "no dir":
        out.mkdir()
        (out / "notes.txt").write_text("the user's, not ours")
    if holds in ("run", "sft run", "damaged"):
        save(out, 12, acc, fake_model, args={**SAVED, "script": "train_sft"} if holds == "sft run" else SAVED)
    if holds == "damaged":
        (ckpt(out, 12) / "manifest.json").unlink()
    if holds == "tmp":  # killed in its first save
        (out / "checkpoint-000012.tmp").mkdir()
        fake_model(out / "checkpoint-000012.tmp")
    if holds in ("run", "sft run", "metrics", "tmp"):
        (out / "metrics.jsonl").write_text(json.dumps({"step": 12}) + "\n")
    before = snapshot(out) if out.exists() else None
    args = Namespace(**new, _typed=set(typed))
    if refused:
        with pytest.raises(UsageError) as e:
            prepare_out(out, args, acc, refuse=REFUSE, apply=APPLY, **flags)
        assert str(e.value) == refused.format(out=out)
        assert (snapshot(out) if out.exists() else None) == before  # not a byte, not an mtime
        return
    said = prepare_out(out, args, acc, refuse=REFUSE, apply=APPLY, **flags)
    assert said == note.format(out=out)
    assert {k: v for k, v in vars(args).items() if k != "_typed"} == after
    assert (out / ".lock").is_file()  # the run holds OUT...
    release(out)  # ...until it ends: the lock goes, and OUT if the lock made it
    left = names(out) if out.exists() else []
    if holds in ("metrics", "tmp"):  # restarted: the rows of the steps that never got a checkpoint are gone
        assert (out / "metrics.jsonl").read_text() == ""
    elif flags.get("overwrite") or holds in ("nothing", "no dir"):
        assert left == ([] if holds == "no dir" else ["notes.txt"])
    else:
        assert snapshot(out) == before  # resuming changes nothing yet

# -----------------------------------------------------------------------------
# the lock on OUT: one run at a time, whatever its flags; a killed run's lock does not block


def a_run(out):
    save(out, 12, Accelerator(cpu=True), fake_model, args=SAVED)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 12}) + "\n")
    return out


def refused(out, holder, **flags):
    """prepare_out on OUT, locked by `holder` (a pid): the one line, and not a byte or an mtime moved."""
    before = snapshot(out)
    with pytest.raises(UsageError) as e:
        prepare_out(out, Namespace(**SAVED, _typed=set()), Accelerator(cpu=True), refuse=REFUSE, apply=APPLY,
                    **flags)
    said = str(e.value)
    assert said.startswith(f"{out.resolve()} is in use by process {holder} on {os.uname().nodename} since ")
    assert said.endswith(": wait for it, or choose another --out") and "\n" not in said
    assert snapshot(out) == before
    return said


def test_a_second_run_on_a_locked_dir_is_one_line(tmp_path):
    """A run holds OUT from its prepare_out to its end: a second one is refused in one line, with --overwrite
    and with --resume too, and touches nothing; once the first has ended, the second may start."""
    out, acc = a_run(tmp_path / "out"), Accelerator(cpu=True)
    assert prepare_out(out, Namespace(**SAVED, _typed=set()), acc, resume=True) == f"resuming {out} at step 12"
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        refused(out, os.getpid(), **flags)
    release(out)
    assert not (out / ".lock").exists()
    said = prepare_out(out, Namespace(**SAVED, _typed=set()), acc, overwrite=True)
    assert said == f"--overwrite: removed checkpoint-000012, metrics.jsonl from {out}"


def test_a_killed_runs_lock_does_not_block(tmp_path):
    """A process that took the lock blocks another (named by its pid); SIGKILLed (no exit handler runs, its
    lock file stays), its lock is taken over by the next run with a one-line note."""
    out = a_run(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nanopr1.checkpoint import lock; "
                               "lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(out)],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        refused(out, holder.pid, overwrite=True)
        record = (out / ".lock").read_text()
    finally:
        holder.send_signal(signal.SIGKILL)
    assert holder.wait() == -signal.SIGKILL and (out / ".lock").read_text() == record
    said = prepare_out(out, Namespace(**SAVED, _typed=set()), Accelerator(cpu=True), overwrite=True)
    assert said.split("\n") == [f"{out.resolve()}: the lock of a run that is gone ({record}) is taken over",
                                 f"--overwrite: removed checkpoint-000012, metrics.jsonl from {out}"]
    assert (out / ".lock").read_text().startswith(f"process {os.getpid()} on ")


DIST_LOCK = """import json, sys
from argparse import Namespace
from pathlib import Path
from accelerate import Accelerator
from nanopr1 import UsageError, checkpoint
acc, (held, free, results) = Accelerator(cpu=True), sys.argv[1:]
try:
    checkpoint.prepare_out(held, Namespace(), acc)
except UsageError as e:
    said = str(e)
note = checkpoint.prepare_out(free, Namespace(), acc)
mine = [str(p) for p in checkpoint._locks]
Path(results, f"rank{acc.process_index}.json").write_text(json.dumps([acc.num_processes, said, note, mine]))
"""


def test_only_the_main_process_holds_the_lock(tmp_path):
    """On two processes (torchrun, gloo): rank 0 locks OUT and rank 1 does not refuse its own run's lock;
    a dir another run holds stops both ranks with the same line (none waits for the other)."""
    held, free = tmp_path / "held", tmp_path / "free"
    lock(held)
    (tmp_path / "dist_lock.py").write_text(DIST_LOCK)
    run(tmp_path / "dist_lock.py", str(held), str(free), str(tmp_path), procs=2, env={"PYTHONPATH": str(ROOT)})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    said = f"{held.resolve()} is in use by process {os.getpid()} on "
    assert [r[0] for r in ranks] == [2, 2] and all(r[1].startswith(said) for r in ranks)
    assert [r[2:] for r in ranks] == [["", [str(free.resolve())]], ["", []]]
    assert not free.exists()  # rank 0 let go at exit, and of the dir its lock made (nothing was written)

# -----------------------------------------------------------------------------
# log trimming, a new --lr on resume


@pytest.mark.parametrize("text,step,kept", [
    ('{"step": 1}\n{"step": 2}\n{"step": 3}\n', 2, [1, 2]),
    ('{"step": 1}\n{"step": 2}\n{"step": 3, "lo', 5, [1, 2]),  # torn by a kill mid-write
    ('{"step": 1}\n\n{"step": 2}\n', 2, [1, 2]),
    ('{"step": 1}\n[1, 2]\n{"step": 2}\n', 2, [1, 2]),  # not a row
    ('{"step": 2, "i": 0}\n{"step": 2, "i": 1}\n{"step": 3, "i": 0}\n', 2, [2, 2]),  # rollouts: rows per step
    ('{"step": 3}\n', 0, []),
])
def test_trim_logs(tmp_path, text, step, kept):
    (tmp_path / "metrics.jsonl").write_text(text)
    trim_logs(tmp_path, step)  # (rollouts.jsonl, eval_rollouts.jsonl: no log yet, nothing to do, nothing made)
    assert rows(tmp_path / "metrics.jsonl") == kept and names(tmp_path) == ["metrics.jsonl"]


@pytest.mark.parametrize("schedule", [True, False])
def test_a_new_lr_applies_after_load_state(tmp_path, toy_dir, schedule):
    t = trainer(toy_dir, schedule=schedule)
    train(t, 3)
    save(tmp_path, 3, t.acc, writer(t))
    t = trainer(toy_dir, lr=4 * LR, schedule=schedule)  # the resumed run, with --lr 4e-3
    assert load_state(tmp_path, t.acc) == 3
    factor = (lambda s: 1 / (s + 1)) if schedule else (lambda s: 1)
    assert [g["lr"] for g in t.opt.param_groups] == [pytest.approx(LR * factor(3))]  # the saved lr came back
    apply_lr(t.opt, 4 * LR, t.sched)
    assert [g["lr"] for g in t.opt.param_groups] == [pytest.approx(4 * LR * factor(3))]
    train(t, 1)  # the schedule goes on from the new base
    assert [g["lr"] for g in t.opt.param_groups] == [pytest.approx(4 * LR * factor(4))]
    if schedule:
        assert t.sched.get_last_lr() == [pytest.approx(4 * LR * factor(4))]
