"""nanopr1: Parallel-R1 (parallel thinking via RL) in compact, readable PyTorch."""

import os
import sys


class UsageError(ValueError):
    """A mistake in the user's flags, files or directories. The scripts print it as one line
    (`error: ...`) and exit; every other exception keeps its traceback, so a bug is never
    mistaken for a usage message."""


def every_rank(acc, fn):
    """fn()'s result; a UsageError on any rank (a bad reward, a bad grader) stops every rank, so none
    waits for the others in a collective."""
    import torch
    try:
        result, error = fn(), None
    except UsageError as e:
        result, error = None, str(e)
    failed = acc.reduce(torch.tensor(error is not None, device=acc.device, dtype=torch.int32), "sum").item()
    if failed:
        raise UsageError(error or "another process stopped on an error (its line is above)")
    return result


def offline_if_unreachable():
    """An unreachable hub: offline mode, so a missing model fails at once, not after minutes."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True


def run_script(main, release=lambda: None):
    """A script's entry: main(); a UsageError is one line, `error: ...`, and exit status 1. Under several
    processes the process group is already down when main() returns: end here, without the interpreter's
    teardown, where a gloo thread's destructor has aborted a finished run (SIGABRT)."""
    try:
        main()
        status = 0
    except UsageError as e:
        status = f"error: {e}"
    finally:
        release()  # the script's OUT lock, before an exit that skips atexit (a refused run leaves OUT as found)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if status:
            print(status, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if status else 0)
    if status:
        sys.exit(status)
