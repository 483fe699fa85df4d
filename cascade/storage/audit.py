"""An audit trail: append-only JSON lines, one record per event, each written, flushed and fsync'd before
:meth:`AuditLog.record` returns (a record the caller has seen written survives a power cut).

A record holds only what its caller gives plus ``time`` (UTC, ISO 8601). Callers name an instance by
:func:`instance_hash` of its SOP Instance UID, never by the UID itself nor by any header value. A process killed in
the middle of a write leaves a cut last line; the next :class:`AuditLog` on the file removes it (the record was never
acknowledged) so every line of the file stays one JSON object. ``cascade serve --audit-log`` writes one; the DICOM
node is to reuse it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from cascade.errors import ConfigError

TAIL = 1 << 20
"""How far back from the end a cut last line is looked for (a record is far shorter)."""


def instance_hash(uid: str | None) -> str | None:
    """sha256 (hex) of a SOP Instance UID: lets an operator find an instance's records without the log holding it."""
    return hashlib.sha256(uid.encode()).hexdigest() if uid else None


def utc_now() -> str:
    """The current time, UTC, ISO 8601 with microseconds (``2025-01-31T12:00:00.123456+00:00``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


class AuditLog:
    """Appends records to ``path`` (created with mode 0600); thread-safe."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as err:
            raise ConfigError(f"{self.path}: cannot open the audit log ({err.strerror})") from None
        try:
            _drop_cut_line(self._fd, self.path)
        except BaseException:
            os.close(self._fd)
            raise

    def record(self, **fields: Any) -> None:
        """Append one record: ``time`` then ``fields`` (JSON values), as one line, fsync'd before returning."""
        line = (json.dumps({"time": utc_now(), **fields}, separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_audit(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of an audit log, in order (a cut last line is left out)."""
    lines = Path(path).read_bytes().split(b"\n")
    return [json.loads(line) for line in lines[:-1] if line]


def _drop_cut_line(fd: int, path: Path) -> None:
    """Truncate a last line that has no newline (a write cut by a crash); ``ConfigError`` when no line end is
    found in the last :data:`TAIL` bytes (not an audit log)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - TAIL)
    tail = os.pread(fd, size - start, start)
    end = tail.rfind(b"\n")
    if end < 0 and start > 0:
        raise ConfigError(f"{path}: is not an audit log (no line end in its last {TAIL} bytes)")
    os.ftruncate(fd, start + end + 1)
    os.fsync(fd)
