"""Run a script as `python script.py args...` would, and SIGKILL it at a chosen moment, from outside the library:

    python tests/kill.py N script.py args...         dies right after the N-th checkpoint._fsync (0: never)
    python tests/kill.py step=K script.py args...    dies right after the metrics row of step K is written

A save fsyncs every file and dir of checkpoint-NNNNNN.tmp/, then the manifest, the tmp dir, and OUT after the
rename: N picks a moment inside a save; step=K a moment between two saves (the row is in metrics.jsonl, the
checkpoint of step K perhaps not). The exit status is -9, as for any SIGKILL."""

import os
import runpy
import signal
import sys
from pathlib import Path

when, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv, sys.path[0] = [script, *argv], str(Path(script).resolve().parent)  # as `python script.py` sets them
from nanopr1 import checkpoint, logs  # noqa: E402

die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if when.startswith("step="):
    log_metrics, step = logs.log_metrics, int(when[5:])
    logs.log_metrics = lambda acc, out, row: (log_metrics(acc, out, row), row["step"] == step and die())
else:
    fsync, calls = checkpoint._fsync, [0]

    def _fsync(path):
        fsync(path)
        calls[0] += 1
        if calls[0] == int(when):
            die()
    checkpoint._fsync = _fsync
runpy.run_path(script, run_name="__main__")
