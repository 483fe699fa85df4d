"""Study-level triage: ``DIR/worklist.csv``, the reading order of the studies the node has analysed.

The node groups its findings by StudyInstanceUID. A study is ``HIGH`` when any of its images is positive, else
``ROUTINE``; a ROUTINE study that has waited longer than the cap (``--max-routine-wait`` minutes since its first
image was received) is **promoted**: it is listed as ``HIGH`` with ``promoted`` ``yes``. Triage that only reorders
would let negatives wait without bound behind a steady flow of positives; the cap bounds that wait.

One row per study (:data:`COLUMNS`): ``StudyInstanceUID``, ``priority`` (HIGH or ROUTINE, promotion included),
``images``, ``positives``, ``failed`` (images that could not be analysed: a person must look at those),
``first_received`` (UTC), ``waited_minutes`` (from the first image's receipt to when the file was written),
``promoted`` (yes/no). Sorted HIGH first, then by waiting time, longest first. The file is rewritten whole and
atomically (a temporary file renamed over it) after each batch of images and once a minute while the node is
idle, so a reader never sees half of it and promotions happen on time without new images.

Images without a StudyInstanceUID (a header without one, findings upgraded from a first-version findings.csv) are
not in the worklist; they keep their line in findings.csv.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cascade.apps.listen.findings import HIGH, ROUTINE
from cascade.storage.fileio import atomic_write_text

COLUMNS = ("StudyInstanceUID", "priority", "images", "positives", "failed", "first_received", "waited_minutes",
           "promoted")


@dataclass
class Study:
    uid: str
    first_received: float
    images: int = 0
    positives: int = 0
    failed: int = 0

    @property
    def priority(self) -> str:
        """The study's own priority (no promotion): HIGH when any image is positive."""
        return HIGH if self.positives else ROUTINE


@dataclass(frozen=True)
class Entry:
    """One row of the worklist at a given time."""

    study: Study
    waited_minutes: float
    promoted: bool

    @property
    def priority(self) -> str:
        return HIGH if self.promoted or self.study.positives else ROUTINE

    def row(self) -> list[str]:
        s = self.study
        received = datetime.fromtimestamp(s.first_received, timezone.utc).isoformat(timespec="seconds")
        return [s.uid, self.priority, str(s.images), str(s.positives), str(s.failed), received,
                f"{self.waited_minutes:.1f}", "yes" if self.promoted else "no"]


class Worklist:
    """The studies seen, by StudyInstanceUID; :meth:`add` each finding, :meth:`write` the file."""

    def __init__(self, path: str | os.PathLike[str], max_routine_wait: float | None = 60.0) -> None:
        if max_routine_wait is not None and not max_routine_wait > 0:
            raise ValueError("the waiting cap must be positive minutes (or None: no cap)")
        self.path = Path(path)
        self.max_routine_wait = max_routine_wait
        self.studies: dict[str, Study] = {}

    def add(self, study: str, received: float, positive: bool, failed: bool) -> Study | None:
        """Count one image of ``study`` (received at ``received``, seconds since the epoch); the study, or None
        when ``study`` is empty."""
        if not study:
            return None
        entry = self.studies.get(study)
        if entry is None:
            entry = self.studies[study] = Study(study, received)
        elif math.isnan(entry.first_received) or received < entry.first_received:
            entry.first_received = received
        entry.images += 1
        entry.positives += int(positive)
        entry.failed += int(failed)
        return entry

    def entries(self, now: float) -> list[Entry]:
        """The reading order at ``now``: HIGH (positive or promoted) first, then by waiting time, longest first."""
        rows = []
        for study in self.studies.values():
            waited = max(0.0, (now - study.first_received) / 60) if not math.isnan(study.first_received) else 0.0
            promoted = (not study.positives and self.max_routine_wait is not None
                        and waited > self.max_routine_wait)
            rows.append(Entry(study, waited, promoted))
        rows.sort(key=lambda e: (e.priority != HIGH, -e.waited_minutes, e.study.uid))
        return rows

    def render(self, now: float) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(e.row() for e in self.entries(now))
        return buffer.getvalue()

    def write(self, now: float) -> None:
        """Rewrite the file atomically (not flushed to the disk: it is a view, rebuilt from findings.csv at start)."""
        atomic_write_text(self.path, self.render(now))
