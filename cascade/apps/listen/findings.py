"""``DIR/findings.csv``: one line per received image, appended and flushed to the disk as each result is known.

Columns (:data:`COLUMNS`): ``ImageId`` (the SOP Instance UID), ``StudyInstanceUID`` (empty when the header has
none), ``probability`` (the classifier's), ``positive`` (1/0), ``priority`` (the image's: ``HIGH`` for a positive,
``ROUTINE`` otherwise), ``study_priority`` (the study's when the line was written: ``HIGH`` once any of its images
so far is positive; ``worklist.csv`` has the study's current priority), ``EncodedPixels`` (the mask as the
challenge's RLE, ``-1`` when empty), ``received`` and ``finished`` (UTC, ISO 8601 with milliseconds), ``seg``,
``sr`` and ``sc`` (the DICOM SEG, SR and Secondary Capture written, relative to DIR), ``model`` (the weights digest
of the model that made the finding) and ``error`` (why an image could not be analysed, or a result not written).
A failed image has empty ``probability`` and ``positive``.

Each line is written with one ``write`` to a file opened for appending, then flushed; a line cut short by a crash
is removed at the next start (its image is still in ``incoming/`` and is analysed again), so every image ends
with exactly one line.

A findings file of the first version (:data:`COLUMNS_V1`: no study, SR, SC or model columns) is upgraded at start:
rewritten whole into a temporary file with the new columns (empty where the old file had nothing to say; the
study priority is the image's), flushed, then renamed over the old one — a kill leaves either file, never half of
one. Any other header is refused, never changed.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cascade.errors import ConfigError
from cascade.storage.fileio import durable_write_bytes

log = logging.getLogger("cascade.listen")

COLUMNS = (
    "ImageId", "StudyInstanceUID", "probability", "positive", "priority", "study_priority", "EncodedPixels",
    "received", "finished", "seg", "sr", "sc", "model", "error",
)
COLUMNS_V1 = ("ImageId", "probability", "positive", "priority", "EncodedPixels", "received", "finished", "seg",
              "error")
"""The columns of the first version (cascade listen before the study columns and the SR): upgraded at start."""
HIGH, ROUTINE = "HIGH", "ROUTINE"


@dataclass(frozen=True)
class Finding:
    """The node's result for one image."""

    image_id: str
    probability: float
    """NaN when the image could not be analysed."""
    positive: bool
    rle: str
    received: float
    """Seconds since the epoch: when the image was safely on disk and acknowledged."""
    finished: float
    seg: str = ""
    error: str = ""
    study: str = ""
    study_priority: str = ""
    sr: str = ""
    sc: str = ""
    model: str = ""

    @property
    def failed(self) -> bool:
        return math.isnan(self.probability)

    @property
    def priority(self) -> str:
        return HIGH if self.positive else ROUTINE

    def row(self) -> list[str]:
        return [
            self.image_id,
            self.study,
            "" if self.failed else f"{self.probability:.6f}",
            "" if self.failed else str(int(self.positive)),
            self.priority,
            self.study_priority or self.priority,
            self.rle,
            _utc(self.received),
            _utc(self.finished),
            self.seg,
            self.sr,
            self.sc,
            self.model,
            self.error,
        ]


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def parse_utc(text: str) -> float:
    """Seconds since the epoch of a ``received``/``finished`` value (NaN when it is not one)."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return math.nan


class FindingsLog:
    """The findings file and the rows it already holds (read at start, kept up to date), by ImageId."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict[str, str]] = self._recover()
        """Every finding recorded, as the column → value mapping of its line."""

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, finding: Finding) -> None:
        """Append one line and flush it to the disk (not thread-safe: the node's one worker calls it)."""
        fields = finding.row()
        self._write_line(fields)
        self.rows[finding.image_id] = dict(zip(COLUMNS, fields))

    def _write_line(self, fields: list[str] | tuple[str, ...]) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, _csv_line(fields))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _recover(self) -> dict[str, dict[str, str]]:
        """Create the file with its header, or drop a line cut short by a crash (upgrading a first-version file)
        and read the rows present. A file that is not a findings file is refused, never changed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        complete = data[: data.rfind(b"\n") + 1]
        try:
            rows = list(csv.reader(io.StringIO(complete.decode("utf-8"))))
        except (UnicodeDecodeError, csv.Error):
            rows = [["?"]]
        header = ",".join(COLUMNS).encode()
        old_header = ",".join(COLUMNS_V1).encode()
        if rows and tuple(rows[0]) == COLUMNS_V1:
            rows = self._upgrade(rows)
        elif (rows and tuple(rows[0]) != COLUMNS) or (
            not rows and not header.startswith(data) and not old_header.startswith(data)
        ):
            raise ConfigError(
                f"{self.path}: not a findings file of cascade listen (its header is not {','.join(COLUMNS)}); "
                "choose another --out folder, or move this file away"
            )
        elif complete != data:
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        if not rows:
            self.path.unlink(missing_ok=True)  # a header cut short
            self._write_line(COLUMNS)
            rows = [list(COLUMNS)]
        return {row[0]: dict(zip(COLUMNS, row)) for row in rows[1:] if row}

    def _upgrade(self, rows: list[list[str]]) -> list[list[str]]:
        """Rewrite a first-version file with :data:`COLUMNS` (atomically, flushed); the new rows."""
        upgraded = [list(COLUMNS)]
        for row in rows[1:]:
            if len(row) != len(COLUMNS_V1):
                continue
            old = dict(zip(COLUMNS_V1, row))
            new = {**dict.fromkeys(COLUMNS, ""), **old, "study_priority": old["priority"]}
            upgraded.append([new[c] for c in COLUMNS])
        durable_write_bytes(self.path, b"".join(_csv_line(r) for r in upgraded))
        log.info("%s upgraded to the current columns (%d finding(s) kept)", self.path.name, len(upgraded) - 1)
        return upgraded


def _csv_line(fields: list[str] | tuple[str, ...]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(fields)
    return buffer.getvalue().encode("utf-8")
