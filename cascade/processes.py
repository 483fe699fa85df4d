"""Child processes never outlive the command: DataLoader workers die with their parent, even after ``kill -9``.

PyTorch's workers notice a dead parent only on their next idle poll (seconds, after finishing queued work). Here
each worker asks the Linux kernel to send it SIGKILL the moment its parent dies (``PR_SET_PDEATHSIG``), and goes
back to the default action for SIGTERM, so a terminal's or a service manager's signal to the whole process group
ends it quietly instead of through the parent's Python handler.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(worker_id: int = 0) -> None:
    """``worker_init_fn`` for every DataLoader cascade starts (``worker_id`` is unused)."""
    del worker_id
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl (unusual libc): PyTorch's own parent check still applies
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
