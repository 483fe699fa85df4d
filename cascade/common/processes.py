"""Child processes never outlive the command: DataLoader workers die with their parent, even after ``kill -9``.

PyTorch's workers notice a dead parent only on their next idle poll (seconds, after finishing queued work). Here
each worker asks the Linux kernel to send it SIGKILL the moment its parent dies (``PR_SET_PDEATHSIG``), and goes
back to the default action for SIGTERM, so a terminal's or a service manager's signal to the whole process group
ends it quietly instead of through the parent's Python handler.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def worker_init(then: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` that makes the worker die with the process creating the loader now, then
    runs ``then(worker_id)``. The parent's pid is taken here, before the fork: read inside the worker, a parent
    killed while the worker starts (a loader is made every epoch) would already be init's pid, and the worker
    would live on holding the command's output pipes."""
    return functools.partial(_die_with_parent, os.getpid(), then)


def _die_with_parent(parent: int, then: Callable[[int], None] | None, worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (unusual libc): PyTorch's own parent check still applies
            pass
        else:
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(1)
    if then is not None:
        then(worker_id)
