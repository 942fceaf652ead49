"""
Checkpoints that survive a kill at any moment; the guard that keeps a run's output dir from being
overwritten, or resumed by another run; the run's logs.

    OUT/checkpoint-000040/   config.json, model.safetensors, tokenizer files   (what model.load reads)
                             args.json, step.json, state/ (accelerate: optimizer, scheduler, RNG per rank)
                             manifest.json: every file's size, written last
    OUT/metrics.jsonl        a row per step        OUT/rollouts.jsonl   rollouts kept per step (--log-rollouts)

A save writes checkpoint-NNNNNN.tmp/, makes it durable, writes the manifest and renames the dir into
place; only then are checkpoints beyond the newest `keep` deleted. A kill leaves complete checkpoints
and perhaps a .tmp dir, which nothing reads. The newest valid checkpoint is the run's model and where
--resume starts. Simplification: the manifest holds sizes, not hashes (hashing gigabytes per save is
slow), so a file damaged in place at its size passes.

The package never imports accelerate: `acc` is whatever the script made.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from nanopr1 import UsageError

LOGS = ("metrics.jsonl", "rollouts.jsonl", "eval_rollouts.jsonl")  # a row per step (or per rollout) each


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


def save(out, step, acc, write, args=None, keep=1):
    """Write the checkpoint of `step` in OUT; then keep only the newest `keep`. Every rank calls it: `write(dir)`
    writes the model files (each rank runs it, for FSDP's collective gather), then accelerate's state."""
    path = Path(out) / f"checkpoint-{step:06d}"
    tmp = path.with_name(path.name + ".tmp")
    if acc.is_main_process:
        for stale in Path(out).glob("checkpoint-*.tmp"):  # killed saves' leftovers
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    write(tmp)
    acc.save_state(str(tmp / "state"))
    acc.wait_for_everyone()  # every rank's files are in tmp
    if acc.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        if args is not None:
            (tmp / "args.json").write_text(json.dumps(args, indent=1, default=str))
        files = {}
        for f in sorted(tmp.rglob("*")):  # durable before the manifest vouches for them
            _fsync(f)
            if f.is_file():
                files[f.relative_to(tmp).as_posix()] = f.stat().st_size
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=1))
        _fsync(tmp / "manifest.json")
        _fsync(tmp)
        shutil.rmtree(path, ignore_errors=True)  # a checkpoint of this step from a run that was not resumed
        tmp.rename(path)
        _fsync(out)  # the rename itself durable
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return path


def save_run(out, step, acc, model, tokenizer, args, keep=1):
    """A training script's checkpoint: the model dir model.load reads (LoRA merged, FSDP gathered: every
    rank calls this), accelerate's state, the step and the run's flags, as one unit (`save`)."""
    from nanopr1.model import save as save_model
    write = lambda d: save_model(acc.unwrap_model(model), tokenizer, d, state_dict=acc.get_state_dict(model),
                                 is_main=acc.is_main_process)
    return save(out, step, acc, write, args=plain(args), keep=keep)


def checkpoints(out):
    """[(step, path)] of OUT's checkpoint dirs, oldest first (valid or not; .tmp dirs are not checkpoints)."""
    found = [(int(p.name.rsplit("-", 1)[1]), p) for p in Path(out).glob("checkpoint-*")
             if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found)


def validate(path):
    """None if `path` is a complete checkpoint, else the reason in one line, naming the file."""
    path = Path(path)
    try:
        manifest = _json(path / "manifest.json")
        for name, size in manifest["files"].items():
            f = path / name
            if not f.is_file():
                return f"{f}: missing"
            if f.stat().st_size != size:
                return f"{f}: {f.stat().st_size} bytes, the manifest says {size}"
        if _json(path / "step.json") != {"step": manifest["step"]}:
            return f"{path / 'step.json'}: not the manifest's step {manifest['step']}"
    except ValueError as e:
        return str(e)
    except (KeyError, TypeError, AttributeError):
        return f"{path / 'manifest.json'}: not a manifest"
    return None


def latest(out):
    """(path, step) of OUT's newest valid checkpoint, or None."""
    return next(((path, step) for step, path in reversed(checkpoints(out)) if validate(path) is None), None)


def _why(out):
    """Why OUT has no valid checkpoint, in one line."""
    reasons = [validate(path) for _, path in checkpoints(out)]
    return f"no valid checkpoint in {out}: " + ("; ".join(reasons) or "no checkpoint-* dir")


def model_dir(path):
    """The dir model.load reads for `path`: a model dir (a step checkpoint too) itself, a run dir its
    newest valid checkpoint. Users pass run dirs to sample.py, eval.py and the next stage's --init."""
    path = Path(path)
    if (path / "config.json").is_file() or not checkpoints(path):
        return path
    found = latest(path)
    if found is None:
        raise UsageError(_why(path))
    return found[0]


def load_state(out, acc):
    """--resume: restore accelerate's state from OUT's newest valid checkpoint and drop the log rows
    written after it. Returns its step."""
    found = latest(out)
    if found is None:
        raise UsageError(f"--resume: {_why(out)}")
    path, step = found
    acc.load_state(str(path / "state"))
    if acc.is_main_process:
        for name in LOGS:
            trim_rows(Path(out) / name, step)
    return step


def plain(args):
    """The run's flags as JSON gives them back (a Path as str, a tuple as list), so they compare; private
    attributes (`_typed`, the flags typed on this command line) are not the run's."""
    return {k: v for k, v in json.loads(json.dumps(vars(args), default=str)).items() if not k.startswith("_")}


def prepare_out(out, args, acc, resume=False, overwrite=False, refuse=(), apply=()):
    """Check OUT before a run writes to it; returns a note to print.

    A dir holding a run is refused unless --resume or --overwrite; --overwrite removes this project's
    files only. --resume takes the run's stored flags for every flag of `refuse` and `apply` not typed
    again (args is updated in place: a stored value is never replaced by a default); a typed flag of
    `refuse` that differs is an error, one of `apply` is used and listed in the note."""
    out, now = Path(out), plain(args)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    held = sorted({p.name for p in out.glob("checkpoint-*")} | {n for n in (*LOGS, "tensorboard") if (out / n).exists()})
    if not resume:
        if held and not overwrite:
            raise UsageError(f"{out} already holds a run ({', '.join(held)}): --resume continues it, --overwrite "
                             f"starts over")
        if acc.is_main_process:
            for name in held:
                shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        acc.wait_for_everyone()
        return f"--overwrite: removed {', '.join(held)} from {out}" if held else ""
    found = latest(out)
    if found is None and not checkpoints(out) and held:  # killed before its first checkpoint: start again
        if acc.is_main_process:
            for name in LOGS:
                trim_rows(out / name, 0)
        return f"--resume: {out} has no checkpoint yet: starting from step 0"
    if found is None:
        raise UsageError(f"--resume: {_why(out)}")
    saved, typed, changed = _json(found[0] / "args.json"), getattr(args, "_typed", set()), []
    for k in (*refuse, *apply):
        if k not in typed:
            setattr(args, k, saved.get(k, getattr(args, k)))
        elif saved.get(k, now[k]) != now[k] and k in refuse:
            raise UsageError(f"--resume: {out} was run with --{k.replace('_', '-')} {saved.get(k)!r}, not "
                             f"{now[k]!r}: a resumed run keeps it (--overwrite starts over; or choose another --out)")
        elif saved.get(k, now[k]) != now[k]:
            changed.append(f"{k} {saved.get(k)!r} -> {now[k]!r}")
    return f"resuming {out} at step {found[1]}" + (f" with {', '.join(changed)}" if changed else "")


def start_trackers(acc, args):
    """--report-to: accelerate's tracker gets the run's flags; tensorboard writes OUT/tensorboard/<run name>,
    wandb logs to project --project as run --run-name. They log what metrics.jsonl holds (log_metrics)."""
    if args.report_to != "none":
        flags = {k: v for k, v in plain(args).items() if isinstance(v, (int, float, str, bool))}
        acc.init_trackers(args.project if args.report_to == "wandb" else args.run_name, config=flags,
                          init_kwargs={"wandb": {"name": args.run_name}})


def log_metrics(acc, out, row):
    """One step's row: appended to OUT/metrics.jsonl, and its numbers to the trackers if any."""
    append_rows(acc, Path(out) / "metrics.jsonl", [row])
    if acc.log_with:
        acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])


def log_rollouts(acc, path, rows):
    """A step's kept rollouts (rollout.rollout_row): appended to OUT/rollouts.jsonl, and to the tracker as a
    table (wandb) or as text (tensorboard)."""
    append_rows(acc, path, rows)
    for tracker in acc.trackers if rows else []:
        if hasattr(tracker, "log_table"):
            tracker.log_table("rollouts", columns=list(rows[0]), data=[[str(v) for v in r.values()] for r in rows],
                              step=rows[0]["step"])
        elif tracker.name == "tensorboard":
            tracker.tracker.add_text("rollouts", "\n\n".join(f"    {r['response']}" for r in rows), rows[0]["step"])


def append_rows(acc, path, rows):
    if acc.is_main_process:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def trim_rows(path, step):
    """Keep the rows of a log up to `step`, so a resumed run appends without repeating steps; a line torn
    by a kill is dropped. Replaced whole (written aside, renamed), so a kill here loses nothing."""
    if not Path(path).is_file():
        return
    keep = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # torn
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line + "\n")
    tmp = Path(f"{path}.tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)


def apply_lr(optimizer, lr, scheduler=None):
    """Use a new --lr after load_state, which restored the saved one (it lives in the optimizer's param
    groups). Under a LambdaLR the base lr changes and the schedule keeps its place."""
    sched = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps it
    if sched is None:
        for g in optimizer.param_groups:
            g["lr"] = lr
        return
    sched.base_lrs = [lr] * len(sched.base_lrs)
    for g, f in zip(optimizer.param_groups, sched.lr_lambdas):
        g["initial_lr"], g["lr"] = lr, lr * f(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
