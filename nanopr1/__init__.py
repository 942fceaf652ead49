"""nanopr1: Parallel-R1 (parallel thinking via RL) in compact, readable PyTorch."""


class UsageError(ValueError):
    """A mistake in the user's flags, files or directories. The scripts print it as one line
    (`error: ...`) and exit; every other exception keeps its traceback, so a bug is never
    mistaken for a usage message."""
