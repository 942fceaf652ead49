"""A run's output dir: checkpoints that survive a kill at any moment, the lock and guard on OUT, --resume
(which cuts the logs back to its step); `acc` is the script's Accelerator. The layout and why: docs/design.md, "Checkpoints"."""

import atexit
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections import namedtuple
from pathlib import Path

import torch
from accelerate.utils import DistributedType, broadcast_object_list, extract_model_from_parallel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanopr1 import UsageError, data
from nanopr1.model import save_model, whole

LOGS = ("metrics.jsonl", "rollouts.jsonl", "eval_rollouts.jsonl")  # a row per step or rollout
Found = namedtuple("Found", "path step")  # latest(): the newest valid checkpoint
Saved = namedtuple("Saved", "path checkpoint_gb")  # save(): the checkpoint, its size (main process)
_locks = {}  # OUT -> (fd of OUT/.lock, flocked while the run writes OUT; whether the lock made OUT)
_hashes = {}  # (file, size, mtime) -> its sha256


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)  # a dir too: makes the names in it durable
    os.fsync(fd)
    os.close(fd)


def _json(path):  # the parsed file; a ValueError naming it if it is missing or not JSON
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def _sha256(f):  # once per version of a file (a resume checks a checkpoint more than once)
    key = (str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns)
    if key not in _hashes:
        with open(f, "rb") as stream:  # streamed
            _hashes[key] = hashlib.file_digest(stream, "sha256").hexdigest()
    return _hashes[key]


# writing a checkpoint: into a .tmp dir, every file fsynced, a manifest, then one rename
def save_checkpoint(out, step, acc, model, tokenizer, args, keep=1):
    """save() of a training script's model and flags (every rank calls this); refused if a weight is NaN or inf."""
    # never a checkpoint of non-finite weights: each rank checks its own (FSDP: its shard of each) weight
    local = lambda q: q.to_local() if hasattr(q, "to_local") else q
    bad = sum(int(not torch.isfinite(local(q).detach()).all()) for q in model.parameters())
    bad = acc.reduce(torch.tensor(bad, device=acc.device), "sum").item()
    if bad:
        raise UsageError(f"step {step}: {bad} weight tensor(s) hold NaN or inf: checkpoint not written (the "
                         f"newest in {out} is older; a lower --lr?)")
    write = lambda path: save_model(acc.unwrap_model(model), tokenizer, path, state_dict=acc.get_state_dict(model),
                                    is_main=acc.is_main_process)
    return save(out, step, acc, write, args=plain(args), keep=keep)


def save(out, step, acc, write, args=None, keep=1):
    """Every rank: write OUT's checkpoint of `step` (`write(dir)`: the model dir), keep `keep`."""
    path = Path(out) / f"checkpoint-{step:06d}"
    tmp, gb = path.with_name(path.name + ".tmp"), None
    if acc.is_main_process:
        for stale in Path(out).glob("checkpoint-*.tmp"):  # killed saves' leftovers
            shutil.rmtree(stale)
        (tmp / "state").mkdir(parents=True)
    acc.wait_for_everyone()
    write(tmp)
    _state(acc, tmp / "state", save=True)
    acc.wait_for_everyone()  # every rank's files are in tmp
    if acc.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        if args is not None:
            (tmp / "args.json").write_text(json.dumps(args, indent=1, default=str))
        found = sorted(tmp.rglob("*"))
        for f in found:  # durable before the manifest vouches for them
            _fsync(f)
        # the manifest: each file's size (checked at every look) and sha256 (when a checkpoint is chosen)
        files = {f.relative_to(tmp).as_posix(): f for f in found if f.is_file()}
        manifest = {"step": step, "files": {name: f.stat().st_size for name, f in files.items()},
                    "sha256": {name: _sha256(f) for name, f in files.items()}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / "manifest.json")
        _fsync(tmp)
        shutil.rmtree(path, ignore_errors=True)  # this step's checkpoint of a run not resumed
        tmp.rename(path)
        _fsync(out)  # the rename itself durable
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
        gb = sum(manifest["files"].values()) / 1e9
        print(f"{path.name}: {gb:.3g} GB", flush=True)
    acc.wait_for_everyone()
    return Saved(path, gb)


def _state(acc, path, save):
    """Save or load accelerate's state (optimizer, schedule, RNG) without the weights: the model dir holds
    them (LoRA's merged: its trained weights go to state/). Under FSDP the optimizer's shards are done here."""
    fsdp = acc.distributed_type == DistributedType.FSDP
    models, opts = acc._models[:], acc._optimizers[:]
    module = extract_model_from_parallel(models[0]) if models else None  # (the scripts prepare one model)
    peft = hasattr(module, "get_base_model")
    if save and peft:
        # LoRA: the trained weights (adapters, token rows), each gathered from its shards under FSDP
        trained = {n: whole(q).detach().cpu() for n, q in module.named_parameters() if q.requires_grad}
        if acc.is_main_process:
            save_file(trained, path / "model.safetensors", metadata={"format": "pt"})
    elif module is not None and not save:
        _load_weights(acc, module, path, peft, fsdp)
    # under FSDP the optimizer's shards, by accelerate's own helpers (loaded after the weights they belong to)
    for i, opt in enumerate(opts if fsdp else []):
        from accelerate.utils.fsdp_utils import load_fsdp_optimizer, save_fsdp_optimizer  # (FSDP only: slow)
        move = save_fsdp_optimizer if save else load_fsdp_optimizer
        move(acc.state.fsdp_plugin, acc, opt, models[0], str(path), i)
    # the rest by accelerate, the model (and under FSDP the optimizer) taken out of its lists for the call
    acc._models[:] = []
    acc._optimizers[:] = [] if fsdp else opts
    try:
        acc.save_state(str(path)) if save else acc.load_state(str(path))
    finally:
        acc._models[:], acc._optimizers[:] = models, opts


def _load_weights(acc, module, path, peft, fsdp):
    """The checkpoint's weights into `module`: the model dir's (LoRA: the trained ones, from state/). Under
    FSDP the main process reads them and each weight is sent into every rank's shards."""
    files = [path / "model.safetensors"] if peft else sorted(path.parent.glob("*.safetensors"))
    # another model's weights are refused before any is loaded (a tied weight is stored once: not missing)
    names = set()
    for f in files:
        with safe_open(f, "pt") as stored:
            names |= set(stored.keys())
    unexpected = names - set(module.state_dict())
    missing = {n for n, q in module.named_parameters() if q.requires_grad} - names
    if unexpected or missing:
        raise ValueError(f"{path}: not this model's weights: {sorted(unexpected or missing)[:2]}")
    reads = not fsdp or acc.is_main_process
    weights = {k: t for f in files if reads for k, t in load_file(f).items()}
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # (slow)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(module, weights, options=options)
    else:
        module.load_state_dict(weights, strict=False)


def checkpoints(out):
    """[(step, path)] of OUT's checkpoint dirs, oldest first, valid or not (a .tmp dir is none)."""
    return sorted((int(p.name.rsplit("-", 1)[1]), p) for p in Path(out).glob("checkpoint-*")
                  if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit())


def validate(path):
    """None if `path` is a complete checkpoint (sizes, then sha256 if the manifest has them), else why."""
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
        for name, sha256 in manifest.get("sha256", {}).items():
            if _sha256(path / name) != sha256:
                return f"{path / name}: not the content the manifest vouches for (sha256)"
    except ValueError as e:
        return str(e)
    except (KeyError, TypeError, AttributeError):
        return f"{path / 'manifest.json'}: not a manifest"
    return None


def latest(out, passed=None):
    """Found(path, step) of OUT's newest valid checkpoint, or None; why each newer one is not: in `passed`."""
    for step, path in reversed(checkpoints(out)):
        if (reason := validate(path)) is None:
            return Found(path, step)
        (passed if passed is not None else []).append(reason)


def _latest(out, what=""):
    """(latest(out), a one-line note on the newer ones passed over, or ""); a UsageError if there is none."""
    passed = []
    if (found := latest(out, passed)) is None:
        raise UsageError(f"{what}no valid checkpoint in {out}: {'; '.join(passed) or 'no checkpoint-* dir'}")
    return found, f"{what}{found.path.name} is used: {'; '.join(passed)}" if passed else ""


def model_dir(name):
    """What model.load_model reads: a run dir's newest valid checkpoint, else `name` (a model dir, a hub id)."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file() or not checkpoints(path):
        return name  # as given: load_model tells "./x" (a dir) from "owner/x" (a hub id)
    found, note = _latest(path)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return found.path


def load_state(out, acc):
    """--resume: load OUT's newest valid checkpoint, cut the logs back to it; returns its step."""
    found, _ = _latest(out, "--resume: ")  # (prepare_out's note said what it passed over)
    _state(acc, found.path / "state", save=False)  # the weights from the model dir
    if acc.is_main_process:
        trim_logs(out, found.step)
    return found.step


# before a run: one run in OUT at a time, never over another run's files, --resume's flags
def lock(out):
    """Hold OUT/.lock until release() or exit (a flock: a killed run's is let go); a UsageError if held."""
    out, made = Path(out).resolve(), not Path(out).exists()
    out.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:  # held by a live run (or a file system without locks)
            owner = os.read(fd, 1000).decode(errors="replace") or "a run starting"
            os.close(fd)
            if not isinstance(e, BlockingIOError):
                return f"{out} could not be locked ({e.strerror}): make sure no other run writes it"
            raise UsageError(f"{out} is in use by {owner}: wait for it, or choose another --out") from None
        # the file we locked is still OUT/.lock: ours (else its holder let go and removed it: lock the new one)
        if (out / ".lock").exists() and os.path.samestat(os.fstat(fd), os.stat(out / ".lock")):
            gone = os.read(fd, 1000).decode(errors="replace")  # a run killed while it held the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {os.uname().nodename} since {time.ctime()}".encode(), 0)
            _locks[out] = fd, made
            return f"{out}: the lock of a run that is gone ({gone}) is taken over" if gone else ""
        os.close(fd)


@atexit.register
def release(out=None):
    """Let go of OUT's lock (all, if None: at exit); and of OUT if the lock made it and it is empty."""
    for key in [k for k in list(_locks) if out is None or k == Path(out).resolve()]:
        fd, made = _locks.pop(key)
        (key / ".lock").unlink(missing_ok=True)  # removed while held: ours, never a new run's
        os.close(fd)
        if made and not any(key.iterdir()):
            key.rmdir()


def prepare_out(out, args, acc, resume=False, overwrite=False, refuse=(), apply=()):
    """Lock and check OUT before a run; a note to print. --resume: resume_args again, for its note."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    try:  # locked before anything is written: one run in OUT at a time, --overwrite or not
        note, error = (lock(out) if acc.is_main_process else ""), None
    except UsageError as e:
        note, error = "", str(e)
    if acc.num_processes > 1:  # every rank stops on its main process's refusal: none waits for it
        error = broadcast_object_list([error])[0]
    if error:
        raise UsageError(error)
    out = Path(out)
    try:
        # this project's files only: its checkpoints and logs
        held = sorted({p.name for p in out.glob("checkpoint-*")} |
                      {name for name in (*LOGS, "tensorboard") if (out / name).exists()})
        if not resume and held and not overwrite:
            raise UsageError(f"{out} already holds a run ({', '.join(held)}): "
                             "--resume continues it, --overwrite starts over")
        if not resume:
            if acc.is_main_process:
                for name in held:
                    shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
            acc.wait_for_everyone()
            said = f"--overwrite: removed {', '.join(held)} from {out}" if held else ""
        elif not checkpoints(out) and held:  # killed before its first checkpoint
            if acc.is_main_process:
                trim_logs(out, 0)
            said = f"--resume: {out} has no checkpoint yet: starting from step 0"
        else:  # (nothing to resume: _latest raises its one line)
            said = resume_args(out, args, refuse, apply) or _latest(out, "--resume: ")
    except BaseException:
        release(out)
        raise
    return "\n".join(filter(None, (note, said)))


def resume_args(out, args, refuse=(), apply=()):
    """--resume: each flag not typed again (args._typed) takes the run's value; one of `refuse` typed anew is an
    error, one of `apply` is applied. The note to print (prepare_out calls this again, for it)."""
    if not checkpoints(out):
        return ""  # prepare_out says why (nothing to resume, or a run killed before its first checkpoint)
    found, passed = _latest(out, "--resume: ")
    saved, now, changed = _json(found.path / "args.json"), plain(args), []
    typed = getattr(args, "_typed", set()) | {"script"}  # the script: always compared
    for k in (*refuse, *apply):
        if k not in typed:  # the run's value: a stored value is never replaced by a default
            setattr(args, k, saved.get(k, getattr(args, k)))
        elif saved.get(k, now[k]) != now[k] and k in refuse:
            raise UsageError(f"--resume: {out} was run with --{k.replace('_', '-')} {saved.get(k)!r}, not {now[k]!r}: "
                             "a resumed run keeps it (--overwrite starts over; or choose another --out)")
        elif saved.get(k, now[k]) != now[k]:
            changed.append(f"{k} {saved.get(k)!r} -> {now[k]!r}")
    resuming = f"resuming {out} at step {found.step}" + (f" with {', '.join(changed)}" if changed else "")
    return "\n".join(filter(None, [passed, resuming]))


def plain(args):
    """The run's flags as JSON gives them back (so they compare), without private attributes."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if not k.startswith("_")}, default=str))


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


def trim_logs(out, step):
    """Keep the rows of OUT's logs up to `step` (torn lines dropped), each written aside and renamed: kill-safe."""
    for path in [Path(out) / name for name in LOGS if (Path(out) / name).is_file()]:
        kept = [r for r in data.read_rows(path) if isinstance(r, dict) and r.get("step", 0) <= step]
        data.write_rows(path, kept)
