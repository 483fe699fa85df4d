"""A folder of DICOM files named by SOP Instance UID, written durably: what the node holds until it is done with it.

``DIR/incoming/`` holds each received image from the moment it is acknowledged until its finding is written;
``DIR/outbox/`` holds each SEG until the destination has stored it. Both survive a crash or a kill: at the next
start, what is left in them is taken up again.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydicom.uid import UID

from cascade.storage.fileio import durable_write_bytes, sync_folder

SUFFIX = ".dcm"


def valid_uid(text: str) -> bool:
    """A DICOM UID (digits and dots, at most 64 characters): safe as a file name, never a path."""
    return bool(text) and UID(text).is_valid


class Spool:
    """``<uid>.dcm`` files in one folder; writes are atomic and flushed to the disk before they return."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):  # a write cut short by a crash, never acknowledged
            stale.unlink(missing_ok=True)

    def path(self, uid: str) -> Path:
        if not valid_uid(uid):
            raise ValueError(f"not a DICOM UID: {uid!r}")
        return self.folder / f"{uid}{SUFFIX}"

    def put(self, uid: str, data: bytes) -> Path:
        """Store ``data`` as ``<uid>.dcm`` (replacing an older copy) and flush it to the disk."""
        return durable_write_bytes(self.path(uid), data)

    def link(self, uid: str, source: Path) -> Path:
        """Make ``<uid>.dcm`` a hard link to ``source`` (same file system, no copy), atomically and durably."""
        target = self.path(uid)
        tmp = self.folder / f".{target.name}.link.tmp"
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, target)
        sync_folder(self.folder)
        return target

    def uids(self) -> list[str]:
        """The UIDs held, oldest file first (the order they arrived in)."""
        files = [p for p in self.folder.glob(f"*{SUFFIX}") if valid_uid(p.stem)]
        return [p.stem for p in sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))]

    def remove(self, uid: str) -> None:
        """Forget ``uid`` (not flushed: if a crash brings the file back, the node sees it is done and drops it)."""
        self.path(uid).unlink(missing_ok=True)
