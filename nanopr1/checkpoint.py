"""A run's output dir: checkpoints that survive a kill at any moment, the guard on OUT, --resume,
the logs; `acc` is the script's Accelerator. The layout and why: docs/design.md, "Checkpoints"."""

import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

from nanopr1 import UsageError

LOGS = ("metrics.jsonl", "rollouts.jsonl", "eval_rollouts.jsonl")  # a row per step or rollout
Found = namedtuple("Found", "path step")  # latest(): the newest valid checkpoint


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
    """Every rank: write OUT's checkpoint of `step` (`write(dir)`: the model files), keep `keep`."""
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
        found = sorted(tmp.rglob("*"))
        for f in found:  # durable before the manifest vouches for them
            _fsync(f)
        files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in found if f.is_file()}
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=1))
        _fsync(tmp / "manifest.json")
        _fsync(tmp)
        shutil.rmtree(path, ignore_errors=True)  # this step's checkpoint of a run not resumed
        tmp.rename(path)
        _fsync(out)  # the rename itself durable
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return path


def checkpoints(out):
    """[(step, path)] of OUT's checkpoint dirs, oldest first, valid or not (a .tmp dir is none)."""
    return sorted((int(p.name.rsplit("-", 1)[1]), p) for p in Path(out).glob("checkpoint-*")
                  if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit())


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
    """Found(path, step) of OUT's newest valid checkpoint, or None."""
    return next((Found(p, s) for s, p in reversed(checkpoints(out)) if validate(p) is None), None)


def _latest(out, what=""):
    """latest(out), or a UsageError saying why OUT has no valid checkpoint."""
    found = latest(out)
    if found is None:
        reasons = "; ".join(validate(path) for _, path in checkpoints(out)) or "no checkpoint-* dir"
        raise UsageError(f"{what}no valid checkpoint in {out}: {reasons}")
    return found


def model_dir(path):
    """The dir model.load reads: a model dir itself, a run dir its newest valid checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file() or not checkpoints(path):
        return path
    return _latest(path).path


def load_state(out, acc):
    """--resume: load OUT's newest valid checkpoint, cut the logs back to it; returns its step."""
    found = _latest(out, "--resume: ")
    acc.load_state(str(found.path / "state"))
    if acc.is_main_process:
        for name in LOGS:
            trim_rows(Path(out) / name, found.step)
    return found.step


def plain(args):
    """The run's flags as JSON gives them back (so they compare), without private attributes."""
    flags = json.loads(json.dumps(vars(args), default=str))
    return {k: v for k, v in flags.items() if not k.startswith("_")}


def prepare_out(out, args, acc, resume=False, overwrite=False, refuse=(), apply=()):
    """Check OUT before a run; a note to print. --resume: a `refuse` flag typed anew is an error."""
    out, now = Path(out), plain(args)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    logs = [name for name in (*LOGS, "tensorboard") if (out / name).exists()]
    held = sorted({p.name for p in out.glob("checkpoint-*")} | set(logs))  # this project's only
    if not resume:
        if held and not overwrite:
            raise UsageError(f"{out} already holds a run ({', '.join(held)}): "
                             "--resume continues it, --overwrite starts over")
        if acc.is_main_process:
            for name in held:
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
                else:
                    (out / name).unlink()
        acc.wait_for_everyone()
        return f"--overwrite: removed {', '.join(held)} from {out}" if held else ""
    if not checkpoints(out) and held:  # killed before its first checkpoint
        if acc.is_main_process:
            for name in LOGS:
                trim_rows(out / name, 0)
        return f"--resume: {out} has no checkpoint yet: starting from step 0"
    found = _latest(out, "--resume: ")
    saved, typed, changed = _json(found.path / "args.json"), getattr(args, "_typed", set()), []
    for k in (*refuse, *apply):
        if k not in typed:  # the run's value: a stored value is never replaced by a default
            setattr(args, k, saved.get(k, getattr(args, k)))
        elif saved.get(k, now[k]) != now[k] and k in refuse:
            flag = "--" + k.replace("_", "-")
            raise UsageError(f"--resume: {out} was run with {flag} {saved.get(k)!r}, not "
                             f"{now[k]!r}: a resumed run keeps it (--overwrite starts over; "
                             "or choose another --out)")
        elif saved.get(k, now[k]) != now[k]:
            changed.append(f"{k} {saved.get(k)!r} -> {now[k]!r}")
    with_changes = f" with {', '.join(changed)}" if changed else ""
    return f"resuming {out} at step {found.step}{with_changes}"


def start_trackers(acc, args):
    """--report-to: start the tracker with the run's flags (wandb: --project, --run-name)."""
    if args.report_to != "none":
        flags = {k: v for k, v in plain(args).items() if isinstance(v, (int, float, str, bool))}
        name = args.project if args.report_to == "wandb" else args.run_name
        acc.init_trackers(name, config=flags, init_kwargs={"wandb": {"name": args.run_name}})


def log_metrics(acc, out, row):
    """One step's row: appended to OUT/metrics.jsonl, and its numbers to the trackers if any."""
    append_rows(acc, Path(out) / "metrics.jsonl", [row])
    if acc.log_with:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        acc.log(numbers, step=row["step"])


def log_rollouts(acc, path, rows):
    """A step's kept rollouts: appended to `path`, and to the trackers (a table or text)."""
    append_rows(acc, path, rows)
    for tracker in acc.trackers if rows else []:
        if hasattr(tracker, "log_table"):
            table = [[str(v) for v in r.values()] for r in rows]
            tracker.log_table("rollouts", columns=list(rows[0]), data=table, step=rows[0]["step"])
        elif tracker.name == "tensorboard":
            text = "\n\n".join(f"    {r['response']}" for r in rows)  # indented: markdown code
            tracker.tracker.add_text("rollouts", text, rows[0]["step"])


def append_rows(acc, path, rows):
    """Append `rows` to the JSONL file `path` (the main process writes)."""
    if acc.is_main_process:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def trim_rows(path, step):
    """Keep a log's rows up to `step` (torn lines dropped), written aside and renamed: kill-safe."""
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
    """Set --lr after load_state restored the saved one (under a LambdaLR: the base lr)."""
    sched = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps it
    if sched is None:
        for g in optimizer.param_groups:
            g["lr"] = lr
        return
    sched.base_lrs = [lr] * len(sched.base_lrs)
    for g, f in zip(optimizer.param_groups, sched.lr_lambdas):
        g["initial_lr"], g["lr"] = lr, lr * f(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
