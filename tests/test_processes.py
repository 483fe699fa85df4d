"""DataLoader workers die with the process that made their loader, even when it was killed while they started."""

from __future__ import annotations

import multiprocessing
import os
from functools import partial

from cascade.common.processes import _die_with_parent, worker_init


def _run_in_child(init, worker_id: int = 3) -> int:
    """Run a worker_init_fn in a forked child (as a DataLoader worker is); its exit code."""
    child = multiprocessing.get_context("fork").Process(target=init, args=(worker_id,))
    child.start()
    child.join(30)
    return child.exitcode


def _exit_with_worker_id(worker_id: int) -> None:
    os._exit(40 + worker_id)


def test_a_worker_whose_loader_process_is_alive_runs_its_init() -> None:
    assert _run_in_child(worker_init(_exit_with_worker_id)) == 43


def test_a_worker_started_after_its_loader_process_died_exits_at_once() -> None:
    # The loader was made by a process that is gone: a worker reading its parent only now would see init (pid 1)
    # and keep running; the pid taken when the loader was made tells it to leave (exit status 1, nothing run).
    gone = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    gone.start()
    gone.join()
    assert _run_in_child(partial(_die_with_parent, gone.pid, _exit_with_worker_id)) == 1
