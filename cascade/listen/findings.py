"""``DIR/findings.csv``: one line per received image, appended and flushed to the disk as each result is known.

Columns: ``ImageId`` (the SOP Instance UID), ``probability`` (the classifier's), ``positive`` (1/0), ``priority``
(``HIGH`` for a positive, ``ROUTINE`` otherwise: sorted ascending, the images to read first come first),
``EncodedPixels`` (the mask as the challenge's RLE, ``-1`` when empty), ``received`` and ``finished`` (UTC, ISO
8601 with milliseconds), ``seg`` (the DICOM SEG written, relative to DIR) and ``error`` (why an image could not be
analysed, or its SEG not written). A failed image has empty ``probability`` and ``positive``.

Each line is written with one ``write`` to a file opened for appending, then flushed; a line cut short by a crash
is removed at the next start (its image is still in ``incoming/`` and is analysed again), so every image ends
with exactly one line.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cascade.errors import ConfigError

COLUMNS = ("ImageId", "probability", "positive", "priority", "EncodedPixels", "received", "finished", "seg", "error")
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

    @property
    def failed(self) -> bool:
        return math.isnan(self.probability)

    @property
    def priority(self) -> str:
        return HIGH if self.positive else ROUTINE

    def row(self) -> list[str]:
        return [
            self.image_id,
            "" if self.failed else f"{self.probability:.6f}",
            "" if self.failed else str(int(self.positive)),
            self.priority,
            self.rle,
            _utc(self.received),
            _utc(self.finished),
            self.seg,
            self.error,
        ]


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


class FindingsLog:
    """The findings file and the set of ImageIds it already holds (read at start, kept up to date)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._ids = self._recover()

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def append(self, finding: Finding) -> None:
        """Append one line and flush it to the disk (not thread-safe: the node's one worker calls it)."""
        self._write_line(finding.row())
        self._ids.add(finding.image_id)

    def _write_line(self, fields: list[str] | tuple[str, ...]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(fields)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, buffer.getvalue().encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _recover(self) -> set[str]:
        """Create the file with its header, or drop a line cut short by a crash and read the ImageIds present.

        A file that is not a findings file of this version is refused, never changed.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        complete = data[: data.rfind(b"\n") + 1]
        try:
            rows = list(csv.reader(io.StringIO(complete.decode("utf-8"))))
        except (UnicodeDecodeError, csv.Error):
            rows = [["?"]]
        header = ",".join(COLUMNS).encode()
        if (rows and tuple(rows[0]) != COLUMNS) or (not rows and not header.startswith(data)):
            raise ConfigError(f"{self.path}: not a findings file of this version; choose another --out folder")
        if complete != data:
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        if not rows:
            self._write_line(COLUMNS)
        return {row[0] for row in rows[1:] if row}
