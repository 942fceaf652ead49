"""
Checkpoints that survive a kill at any moment, and the guard that keeps a run's
output dir from being overwritten, or resumed by a different run.

A run dir OUT holds metrics.jsonl and one checkpoint, everything of one step:

    OUT/checkpoint/   config.json, model.safetensors, tokenizer files   what model.load reads
                      args.json       the run's flags
                      step.json       {"step": 12}; also the data position (batches are a function of the step)
                      state/          accelerate's optimizer, scheduler and per-rank RNG files
                      manifest.json   the step and every file's size, written last

A save writes all of it to OUT/checkpoint.tmp/ (every rank: FSDP gathers collectively
and accelerate writes one RNG file per rank), fsyncs it, writes the manifest and swaps
the dirs with two renames: checkpoint -> checkpoint.old, checkpoint.tmp -> checkpoint.
A kill leaves a complete checkpoint, new or previous; between the renames the previous
one is checkpoint.old, which `latest` falls back to. The manifest catches what renames
cannot: a file truncated or deleted afterwards. Simplification: sizes, not hashes
(hashing gigabytes per save is slow), so a file damaged in place at its size passes.

The package never imports accelerate: `acc` is whatever the script made.
"""

import json
import os
import shutil
import signal
from argparse import Namespace
from pathlib import Path

import torch

from nanopr1 import UsageError

MANIFEST = "manifest.json"
CHECKPOINTS = ("checkpoint", "checkpoint.old")  # in the order `latest` tries them
RUN_FILES = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "trackers",
             "args.json", "state")  # what --overwrite removes; args.json and state/: the older layout
_after_file = None  # tests: called with each path a save has just written or renamed, to inject a kill
_kill_after = [int(os.environ.get("NANOPR1_KILL_AFTER", 0))]  # tests of the scripts: SIGKILL at the N-th such path


def _done(path):
    if _after_file is not None:
        _after_file(path)
    _kill_after[0] -= 1
    if _kill_after[0] == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)  # a dir too: makes the names in it durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json(path):
    """The parsed file; a ValueError naming it if it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def save(out, step, acc, write, args=None):
    """Write the checkpoint of `step` in OUT, replacing the previous one only once complete.
    Every rank calls it: `write(tmpdir)` writes the model files (each rank runs it, for
    FSDP's collective gather), then accelerate's state goes to tmpdir/state."""
    out = Path(out)
    tmp, new, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    write(tmp)
    acc.save_state(str(tmp / "state"))
    acc.wait_for_everyone()  # every rank's files are in tmp
    if acc.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        if args is not None:
            (tmp / "args.json").write_text(json.dumps(_plain(args), indent=1))
        files = {}
        for f in sorted(tmp.rglob("*")):  # durable before the manifest vouches for them
            _fsync(f)
            if f.is_file():
                files[f.relative_to(tmp).as_posix()] = f.stat().st_size
                _done(f)
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        _done(tmp / MANIFEST)
        if validate(new) is None:  # keep the previous checkpoint until the new one is in place
            shutil.rmtree(old, ignore_errors=True)  # stale: `new` is complete
            new.rename(old)
            _done(old)
        else:  # damaged or absent: checkpoint.old, if any, stays the fallback
            shutil.rmtree(new, ignore_errors=True)
        tmp.rename(new)
        _fsync(out)  # the renames themselves durable
        _done(new)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return new


def save_run(out, step, acc, model, tokenizer, args):
    """A training script's checkpoint: the model dir model.load reads (LoRA merged, FSDP gathered: every
    rank calls this), accelerate's state, the step and the run's flags, as one unit (`save`)."""
    from nanopr1.model import save as save_model
    write = lambda d: save_model(acc.unwrap_model(model), tokenizer, d, state_dict=acc.get_state_dict(model),
                                 is_main=acc.is_main_process)
    return save(out, step, acc, write, args=vars(args))


def validate(path):
    """None if `path` is a complete checkpoint, else the reason in one line, naming the file."""
    path = Path(path)
    if not path.is_dir():
        return f"{path}: missing"
    try:
        manifest = _json(path / MANIFEST)
        for name, size in manifest["files"].items():
            f = path / name
            if not f.is_file():
                return f"{f}: missing"
            if f.stat().st_size != size:
                return f"{f}: {f.stat().st_size} bytes, the manifest says {size}"
        saved = _json(path / "step.json")
        if not isinstance(saved, dict) or saved.get("step") != manifest["step"]:
            return f"{path / 'step.json'}: not the manifest's step {manifest['step']}"
        if (path / "args.json").is_file():
            _json(path / "args.json")
    except ValueError as e:
        return str(e)
    except (KeyError, TypeError, AttributeError):
        return f"{path / MANIFEST}: not a manifest"
    return None


def latest(out):
    """(path, step) of OUT's valid checkpoint (checkpoint, else checkpoint.old), or None."""
    for path in (Path(out) / name for name in CHECKPOINTS):
        if validate(path) is None:
            return path, _json(path / "step.json")["step"]
    return None


def _why(out):
    """Why OUT has no valid checkpoint, in one line."""
    reasons = [validate(Path(out) / n) for n in CHECKPOINTS if (Path(out) / n).exists()]
    if (Path(out) / "state").is_dir():
        reasons.append(f"{Path(out) / 'state'} is an older nanopr1's checkpoint and cannot be resumed")
    return f"no valid checkpoint in {out}: " + ("; ".join(reasons) or f"{Path(out) / 'checkpoint'}: missing")


def model_dir(path):
    """The dir model.load reads for `path`: a run dir's checkpoint, else `path` itself.
    Users pass a run dir (out/rl-easy) to sample.py, eval.py and the next stage's --init."""
    path = Path(path)
    found = latest(path)
    if found:
        return found[0]
    if not (path / "config.json").is_file() and any((path / n).exists() for n in CHECKPOINTS):
        raise UsageError(_why(path))
    return path


def load_state(out, acc):
    """--resume: restore accelerate's state from OUT's valid checkpoint and drop the metrics
    rows logged after it. Returns (step, the saved args)."""
    found = latest(out)
    if found is None:
        raise UsageError(f"--resume: {_why(out)}")
    path, step = found
    acc.load_state(str(path / "state"))
    if acc.is_main_process:
        trim_metrics(out, step)
    return step, _json(path / "args.json") if (path / "args.json").is_file() else {}


def start_trackers(acc, args):
    """--report-to tensorboard|wandb: accelerate's trackers get the run's flags (they log what
    metrics.jsonl holds, see log_metrics); tensorboard writes under OUT/trackers."""
    if args.report_to != "none":
        flags = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        acc.init_trackers("trackers", config=flags)


def log_metrics(acc, out, row):
    """One step's row: appended to OUT/metrics.jsonl, and its numbers to the trackers if any."""
    if acc.is_main_process:
        with open(Path(out) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    if acc.log_with:
        acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])


def trim_metrics(out, step):
    """Keep the metrics.jsonl rows up to `step`, so a resumed run appends without repeating
    steps; a line torn by a kill is dropped. Replaced whole, so a kill here loses nothing."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # torn
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line + "\n")
    tmp = path.with_name("metrics.jsonl.tmp")
    tmp.write_text("".join(keep))
    _fsync(tmp)
    os.replace(tmp, path)


def _plain(args):
    """args as JSON would give them back (a Path as str, a tuple as list), so they compare."""
    return json.loads(json.dumps(vars(args) if isinstance(args, Namespace) else args, default=str))


def _show(d, k):
    return repr(d[k]) if k in d else "unset"


def prepare_out(out, args, acc, resume=False, overwrite=False, same=(), may_change=()):
    """Check OUT before a run writes to it; returns (saved args or None when fresh, a note to print).

    A dir holding a run is refused unless --resume or --overwrite. --overwrite removes this
    project's files only (RUN_FILES). --resume needs a valid checkpoint whose args agree on
    every key of `same`; the keys of `may_change` that differ are listed in the note."""
    out, args = Path(out), _plain(args)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if resume:
        found = latest(out)
        started = [n for n in ("metrics.jsonl", "checkpoint.tmp") if (out / n).exists()]
        if found is None and started and not any((out / n).exists() for n in CHECKPOINTS):
            if acc.is_main_process:  # killed before its first checkpoint: nothing to keep, start again
                trim_metrics(out, 0)
            return None, f"--resume: {out} has no checkpoint yet: starting from step 0"
        if found is None:
            raise UsageError(f"--resume: {_why(out)}")
        saved = _json(found[0] / "args.json") if (found[0] / "args.json").is_file() else {}
        for k in same:
            if saved.get(k, ...) != args.get(k, ...):
                raise UsageError(f"--resume: {out} holds another run: {k} was {_show(saved, k)}, now {_show(args, k)} "
                                 f"(--overwrite starts over; or choose another --out)")
        changed = [f"{k} {_show(saved, k)} -> {_show(args, k)}" for k in may_change if saved.get(k, ...) != args.get(k, ...)]
        return saved, f"resuming {out} at step {found[1]}" + (f" with {', '.join(changed)}" if changed else "")
    held = [n for n in RUN_FILES if (out / n).exists()]
    if held and not overwrite:
        raise UsageError(f"{out} already holds a run ({', '.join(held)}): --resume continues it, --overwrite starts over")
    if acc.is_main_process:
        for n in held:
            if (out / n).is_dir():
                shutil.rmtree(out / n)
            else:
                (out / n).unlink()
    acc.wait_for_everyone()
    return None, f"--overwrite: removed {', '.join(held)} from {out}" if held else ""


def apply_lr(optimizer, lr, scheduler=None):
    """Use a new --lr after load_state, which restored the saved one (it lives in the
    optimizer's param groups). Under a LambdaLR the base lr changes and the schedule
    keeps its place."""
    sched = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps it
    if sched is None:
        for g in optimizer.param_groups:
            g["lr"] = lr
        return
    if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"apply_lr knows LambdaLR only, not {type(sched).__name__}")
    sched.base_lrs = [lr] * len(sched.base_lrs)
    for g, f in zip(optimizer.param_groups, sched.lr_lambdas):
        g["initial_lr"], g["lr"] = lr, lr * f(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
