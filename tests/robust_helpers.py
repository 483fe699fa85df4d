"""Running the real ``cascade`` command as a user would, and checking what it leaves behind (issue 11 tests).

Each run starts in a new session, so every process it starts (DataLoader workers) shares its process group; after
it ends, no member of that group may still be alive.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    """The test environment for a child ``cascade``: this checkout first, offline hubs, one thread per process."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
            "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


def unprivileged() -> list[str]:
    """A command prefix under which file permissions apply: none for a normal user; for root (who ignores them),
    ``unshare`` into a user namespace as an ordinary uid. Skips the test when neither is possible."""
    if os.geteuid() != 0:
        return []
    prefix = ["unshare", "--map-user=1000", "--map-group=1000"]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("running as root and cannot drop privileges (unshare): permissions would not apply")
    return prefix


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a zombie has exited; only its parent's reap is due)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (from /proc: field 5 of /proc/PID/stat)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/PID/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` every 50 ms for at most ``seconds``; its last value."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def start(args: Sequence[object], prefix: Sequence[str] = (), **kwargs: object) -> subprocess.Popen[str]:
    """Start ``cascade ARGS`` in its own session (so its process group holds everything it starts)."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "cascade", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env(), start_new_session=True, **kwargs,  # type: ignore[call-overload]
    )


def finish(proc: subprocess.Popen[str], args: Sequence[object], timeout: float) -> Result:
    """Wait for ``proc`` (killing its group and failing the test when it hangs) and check nothing outlives it."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"cascade {' '.join(map(str, args))} did not finish within {timeout} s")
    assert wait_until(lambda: not group_members(proc.pid), 5.0), (
        f"processes of cascade {args[0]} outlived it: {group_members(proc.pid)}"
    )
    return Result([str(a) for a in args], proc.returncode, out, err)


def cascade(args: Sequence[object], *, timeout: float = 120, prefix: Sequence[str] = (), **kwargs: object) -> Result:
    """Run ``cascade ARGS`` to its end."""
    return finish(start(args, prefix, **kwargs), args, timeout)


def assert_one_line_error(result: Result, *needles: str) -> str:
    """Exit 2, exactly one stderr line ``cascade <cmd>: error: …`` holding every needle, and no traceback."""
    command = result.args[0]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"cascade {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@dataclass(frozen=True)
class ServeProcess:
    """A ``cascade serve`` started by :func:`serve_process`: its address, pid and log."""

    base: str
    port: int
    pid: int
    log: Path


@contextlib.contextmanager
def serve_process(model: Path, folder: Path, *options: object) -> Iterator[ServeProcess]:
    """``cascade serve MODEL`` on a free loopback port in its own process (fp32 on torch, CPU), with ``options``;
    yields once ``/healthz`` answers 200 (the log in the failure otherwise); SIGTERM on exit, SIGKILL if it hangs."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = folder / "serve.log"
    args = ["serve", model, "--port", port, "--device", "cpu", "--backend", "torch", "--precision", "fp32", *options]
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cascade", *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=err, env=env(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return proc.poll() is not None or httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        assert wait_until(healthy, 90) and proc.poll() is None, log.read_text()[-3000:]
        yield ServeProcess(base, port, proc.pid, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
