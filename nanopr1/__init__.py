"""nanopr1: Parallel-R1 (parallel thinking via RL) in compact, readable PyTorch."""

import os


class UsageError(ValueError):
    """A mistake in the user's flags, files or directories. The scripts print it as one line
    (`error: ...`) and exit; every other exception keeps its traceback, so a bug is never
    mistaken for a usage message."""


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
