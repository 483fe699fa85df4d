"""Batch prediction of files, as ``cascade predict``, the demo and the benchmarks run it: :func:`predict_files`.

Inputs are collected once (:func:`collect_inputs`: folders searched recursively, one file per ImageId, notes for
what was passed over), split across ``torchrun`` ranks (:mod:`cascade.inference.sharding`), predicted by a loaded
:class:`cascade.Cascade`, handed to the writers (:mod:`cascade.outputs.writers`) on each rank, gathered in input
order, and the submission CSV written by rank 0. Nothing is printed: warnings come back as lines, with the failures
and counts, in a :class:`PredictSummary` for the caller to show.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cascade.errors import CascadeWarning, ConfigError

if TYPE_CHECKING:
    from cascade.inference.pipeline import Cascade, Prediction
    from cascade.inference.sharding import Shard
    from cascade.outputs.writers import Writer, Written

Source = str | os.PathLike[str]


@dataclass(frozen=True)
class InputFiles:
    """The DICOM files to predict, in ImageId order, and what the search noted (duplicates, unreadable
    sub-folders, ``*.dcm`` entries that are not regular files)."""

    roots: tuple[str, ...]
    paths: list[Path]
    notes: list[str] = field(default_factory=list)

    @property
    def folder_unreadable(self) -> bool:
        """A sub-folder could not be read: the run is incomplete whatever it predicted."""
        from cascade.data.index import UNREADABLE_FOLDERS

        return any(UNREADABLE_FOLDERS in note for note in self.notes)


def collect_inputs(inputs: Sequence[Source]) -> InputFiles:
    """The files named and the ``*.dcm`` files under the folders named (recursively), one per ImageId.

    A file named explicitly is taken whatever its extension; if it cannot be read, prediction reports it like any
    other bad file. Several files with one ImageId would give repeated submission rows: the first is kept.
    """
    from cascade.data.index import scan_dicoms

    index = scan_dicoms(*inputs)
    notes = [
        f"ImageId {image_id} found more than once; kept {index.paths[image_id]}, skipped {', '.join(map(str, extra))}"
        for image_id, extra in sorted(index.duplicates.items())
    ] + index.warnings()
    return InputFiles(tuple(map(str, inputs)), [index.paths[k] for k in sorted(index.paths)], notes)


@contextlib.contextmanager
def caught_warnings() -> Iterator[list[str]]:
    """Catch the warnings of the block as one-line messages, filled into the list yielded when the block ends
    (cascade's own every time, other libraries' as their filters say): a command prints them its way."""
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CascadeWarning)
        yield lines
    lines.extend(str(w.message) for w in caught)


@dataclass
class PredictSummary:
    """What :func:`predict_files` did, over every rank (in input order)."""

    written: list[Written]
    """Per image: the prediction without its arrays, the outputs that wrote for it, their failures."""
    seconds: float
    warnings: list[str] = field(default_factory=list)
    """Warnings raised while predicting (this rank's), as lines."""
    submission: Path | None = None
    """The CSV written (None: not asked for, not rank 0, or no image readable)."""

    @property
    def predictions(self) -> list[Prediction]:
        return [w.prediction for w in self.written]

    @property
    def failures(self) -> list[str]:
        """One line per failed image, then one per failed output."""
        errors = [p.error for p in self.predictions if p.error is not None]
        return errors + [f for w in self.written for f in w.failures]

    @property
    def rows(self) -> int:
        """Images predicted (the submission's rows)."""
        return sum(p.ok for p in self.predictions)

    @property
    def positives(self) -> int:
        return sum(p.positive for p in self.predictions)

    def count(self, output: str) -> int:
        """Images the output named ``output`` wrote something for."""
        return sum(output in w.wrote for w in self.written)

    @property
    def images_per_second(self) -> float:
        return len(self.written) / max(self.seconds, 1e-9)


def predict_files(
    cascade: Cascade,
    files: InputFiles,
    writers: Mapping[str, Writer],
    *,
    submission: Source | None = None,
    shard: Shard | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    progress: bool = True,
) -> PredictSummary:
    """Predict ``files`` with ``cascade``, hand every prediction to ``writers`` (by name; each rank its share of the
    images) and, on rank 0, write the ``submission`` CSV of every rank's predictions (when one was readable).

    An image whose ImageId cannot be a CSV row fails (the rest are still written). ``shard`` (default: this
    process's, :func:`cascade.inference.sharding.current_shard`) splits the files across ``torchrun`` ranks; every rank
    returns the gathered summary. Raises a ``ConfigError`` when there are no files.
    """
    from cascade.common.progress import progress_bar
    from cascade.inference.sharding import current_shard, gather_in_order, process_group
    from cascade.outputs.writers import SubmissionWriter, write_all

    if not files.paths:
        raise ConfigError(f"no DICOM files (*.dcm) found in {', '.join(files.roots)}")
    shard = shard or current_shard()
    start = time.perf_counter()
    with process_group(shard), caught_warnings() as lines:
        mine = shard.take(files.paths)
        predictions = cascade.predict_many(mine, batch_size=batch_size, workers=workers,
                                           keep_image=any(w.needs_image for w in writers.values()))
        shown = progress_bar(predictions, total=len(mine), unit="img", desc="predict",
                             disable=not (progress and shard.main))
        written = gather_in_order(write_all(_as_submission_rows(shown), writers), shard)
    summary = PredictSummary(written, time.perf_counter() - start, lines)
    if submission is not None and shard.main and summary.rows:
        write_all(summary.predictions, {"submission": SubmissionWriter(submission)})
        summary.submission = Path(submission)
    return summary


def _as_submission_rows(predictions: Iterable[Prediction]) -> Iterator[Prediction]:
    """Each prediction, failed if its ImageId cannot be a submission row (docs/robustness.md)."""
    from cascade.data.labels import submission_id_problem

    for pred in predictions:
        problem = submission_id_problem(pred.image_id)
        yield pred if problem is None else dataclasses.replace(
            pred, error=f"{pred.source}: ImageId {pred.image_id!r} {problem}: it cannot be a submission row",
            positive=False,
        )
