"""Label CSVs of the challenge (``ImageId,EncodedPixels``): reading every published variant, writing submissions.

Rows are numbered as lines of the file (the header, when there is one, is row 1), so an error message points at
the line an editor shows. Every RLE is syntax-checked at load; bounds are checked when a mask is decoded.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from cascade.data.rle import EMPTY, check_rle, parse_rle, rle_decode
from cascade.errors import LabelError
from cascade.storage.fileio import atomic_path, input_file

COLUMNS = ("ImageId", "EncodedPixels")
_BOM = "\ufeff"
_MAX_FIELD = 1 << 26  # the RLE of a large, ragged mask can exceed csv's default 128 KiB field limit
MAX_LINE = _MAX_FIELD + 4096
"""Longest line read from a label file (characters): a longer one is refused as soon as this much is read."""


@dataclass(frozen=True)
class LabelSummary:
    """Counts of a label file: images, positive images, annotations (non-empty RLE rows)."""

    images: int
    positives: int
    annotations: int

    def __str__(self) -> str:
        share = 100.0 * self.positives / self.images if self.images else 0.0
        return f"{self.images} images, {self.positives} positive ({share:.2f}%), {self.annotations} annotations"


@dataclass
class Labels:
    """The annotations of a label file: ImageId -> RLE strings (``[]`` for a negative image), file order kept.

    ``source`` names the file and ``rows`` gives the file row of each annotation, for error messages.
    """

    annotations: dict[str, list[str]]
    source: str = "<labels>"
    rows: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.annotations)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.annotations

    @property
    def image_ids(self) -> list[str]:
        """Every ImageId, in the order of first appearance in the file."""
        return list(self.annotations)

    @property
    def positives(self) -> list[str]:
        """ImageIds with at least one annotation, in file order."""
        return [image_id for image_id, rles in self.annotations.items() if rles]

    @property
    def summary(self) -> LabelSummary:
        return LabelSummary(
            images=len(self.annotations),
            positives=sum(1 for rles in self.annotations.values() if rles),
            annotations=sum(len(rles) for rles in self.annotations.values()),
        )

    def is_positive(self, image_id: str) -> bool:
        """Whether the image has at least one annotation."""
        return bool(self._annotations_of(image_id))

    def mask(self, image_id: str, height: int = 1024, width: int = 1024) -> np.ndarray:
        """The union of the image's annotations as a ``height`` x ``width`` bool mask."""
        decoded = (
            rle_decode(rle, height, width, where=self._where(image_id, i))
            for i, rle in enumerate(self._annotations_of(image_id))
        )
        mask = next(decoded, None)
        if mask is None:
            return np.zeros((height, width), dtype=bool)
        for other in decoded:
            mask |= other
        return mask

    def check_fits(self, image_id: str, height: int, width: int) -> None:
        """``LabelError`` if an annotation of the image runs past a ``height`` x ``width`` image (nothing decoded)."""
        for index, rle in enumerate(self._annotations_of(image_id)):
            where = self._where(image_id, index)
            starts, lengths = parse_rle(rle, where=where)
            if starts.size and int(starts[-1] + lengths[-1]) > height * width:
                end = int(starts[-1] + lengths[-1])
                raise LabelError(
                    f"{where}: RLE runs past the end of the {height}x{width} image (pixel {end} > {height * width})"
                )

    def _where(self, image_id: str, index: int) -> str:
        """``file:row N (ImageId X)`` of the image's ``index``-th annotation, for error messages."""
        rows = self.rows.get(image_id, [])
        row = f":row {rows[index]}" if index < len(rows) else ""
        return f"{self.source}{row} (ImageId {image_id})"

    def _annotations_of(self, image_id: str) -> list[str]:
        try:
            return self.annotations[image_id]
        except KeyError:
            raise LabelError(f"{self.source}: no labels for ImageId {image_id}") from None


def read_labels(source: str | os.PathLike[str] | TextIO) -> Labels:
    """Read a label CSV (a path, ``.gz`` allowed, or a text file object) in any of the challenge's variants.

    Accepted: header ``ImageId,EncodedPixels`` with or without spaces (extra columns are ignored), or no header at
    all (two columns); values with leading spaces; a UTF-8 BOM; CRLF or LF; no trailing newline; blank lines.
    Several rows of one ImageId are separate annotations; a ``-1`` row only marks the image as known.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        input_file(path, LabelError, what="label file")  # stat first: opening a FIFO would block
        try:
            opener = gzip.open if path.suffix.lower() == ".gz" else open
            with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
                return _parse(f, name)
        except FileNotFoundError:
            raise LabelError(f"{name}: no such label file") from None
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise LabelError(f"{name}: cannot read the label file ({err})") from None
    return _parse(source, str(getattr(source, "name", "<labels>")))


def _parse(f: TextIO, name: str) -> Labels:
    """Parse an open label file named ``name`` in error messages."""
    csv.field_size_limit(max(csv.field_size_limit(), _MAX_FIELD))
    reader = csv.reader(_bounded_lines(f, name), skipinitialspace=True, strict=True)
    try:
        return _parse_rows(((reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)), name)
    except csv.Error as err:
        raise LabelError(f"{name}:row {reader.line_num}: not a valid CSV row ({err})") from None


def _bounded_lines(f: TextIO, name: str) -> Iterator[str]:
    """The lines of ``f``, each read with a length limit: a 1 GB line is refused after ``MAX_LINE`` characters
    instead of being read whole into memory."""
    number = 0
    while line := f.readline(MAX_LINE + 1):
        number += 1
        if len(line) > MAX_LINE:
            raise LabelError(f"{name}:line {number}: longer than {MAX_LINE} characters; not a label file")
        yield line


def submission_id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot be a row of a submission CSV, or None when it can.

    The challenge's ImageIds are DICOM UIDs (digits and dots), and its scorer compares them as plain text, so an id
    that would need CSV quoting (comma, quote, line break), has leading or trailing spaces (which CSV readers
    strip: the row would name another image), is empty, or holds unprintable characters never matches an image
    and is refused rather than quoted (see docs/robustness.md).
    """
    if not image_id:
        return "is empty"
    if image_id != image_id.strip():
        return "has leading or trailing spaces"
    if any(c in image_id for c in ',"'):
        return "holds a comma or a quote"
    if not image_id.isprintable():
        return "holds a line break, control or undecodable character"
    return None


def _parse_rows(rows: Iterator[tuple[int, list[str]]], name: str) -> Labels:
    first = next(rows, None)
    if first is None:
        raise LabelError(f"{name}: empty label file")
    id_col, rle_col, exact, data = _layout(name, *first, rows)
    needed = max(id_col, rle_col) + 1
    annotations: dict[str, list[str]] = {}
    row_numbers: dict[str, list[int]] = {}
    for line, cells in data:
        if len(cells) < needed or (exact is not None and len(cells) != exact):
            raise LabelError(f"{name}:row {line}: {len(cells)} value(s) where ImageId,EncodedPixels are expected")
        image_id, rle = cells[id_col].strip(), cells[rle_col].strip()
        if not image_id:
            raise LabelError(f"{name}:row {line}: empty ImageId")
        check_rle(rle, where=f"{name}:row {line} (ImageId {image_id})")
        image_rles = annotations.setdefault(image_id, [])
        if rle != EMPTY:
            image_rles.append(rle)
            row_numbers.setdefault(image_id, []).append(line)
    if not annotations:
        raise LabelError(f"{name}: no label rows after the header")
    return Labels(annotations=annotations, source=name, rows=row_numbers)


def _layout(
    name: str, line: int, cells: list[str], rest: Iterator[tuple[int, list[str]]]
) -> tuple[int, int, int | None, Iterable[tuple[int, list[str]]]]:
    """From the first row: (ImageId column, EncodedPixels column, exact column count or None, data rows).

    The first row is a header if it names either column; otherwise the file has no header and exactly two columns.
    """
    header = [c.strip().lstrip(_BOM).strip().lower() for c in cells]
    wanted = [c.lower() for c in COLUMNS]
    if not any(c in wanted for c in header):
        return 0, 1, 2, itertools.chain([(line, [cells[0].lstrip(_BOM), *cells[1:]])], rest)
    for column in wanted:
        count = header.count(column)
        if count != 1:
            problem = "missing" if count == 0 else f"repeated {count} times"
            raise LabelError(f"{name}:row {line}: header column {COLUMNS[wanted.index(column)]} is {problem}")
    return header.index(wanted[0]), header.index(wanted[1]), None, rest


def write_labels(path: str | os.PathLike[str], rows: Mapping[str, str] | Iterable[tuple[str, str]]) -> None:
    """Write a submission ``ImageId,EncodedPixels`` atomically: one row per image, ``-1`` for an empty mask.

    ``rows`` maps (or pairs) each ImageId to its RLE. A repeated or empty ImageId, one that would need CSV quoting,
    a malformed RLE, or no rows at all raise LabelError before anything is written.
    """
    items = rows.items() if isinstance(rows, Mapping) else rows
    lines = [",".join(COLUMNS)]
    seen: set[str] = set()
    for image_id, rle in items:
        where = f"{path}: ImageId {image_id!r}"
        problem = submission_id_problem(image_id)
        if problem is not None:
            raise LabelError(f"{where} {problem}: it cannot be a submission row")
        if image_id in seen:
            raise LabelError(f"{where} appears twice: a submission has one row per image")
        seen.add(image_id)
        check_rle(rle, where=where)
        lines.append(f"{image_id},{' '.join(str(rle).split())}")
    if not seen:
        raise LabelError(f"{path}: no rows to write")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
