"""The SIIM-ACR run-length encoding of masks.

Pixels are numbered column-major (flat index = col * height + row); a mask is written as whitespace-separated
pairs ``start length`` where each ``start`` counts the pixels skipped since the end of the previous run (the first
from pixel 0); an empty mask is ``-1``. Both directions are vectorised with numpy and cost O(foreground pixels +
runs) beyond allocating the mask, so small masks on large images stay cheap.
"""

from __future__ import annotations

import re

import numpy as np

from cascade.errors import LabelError

EMPTY = "-1"

_MAX_DIGITS = 10  # longer values describe no real image and could overflow the int64 running sums
_INTEGER = re.compile(r"-?[0-9]+")
_PAIR = rf"[0-9]{{1,{_MAX_DIGITS}}}\s+0*[1-9][0-9]{{0,{_MAX_DIGITS - 1}}}"  # start >= 0, length > 0
_PAIRS = re.compile(rf"{_PAIR}(?:\s+{_PAIR})*")


def check_rle(rle: str, *, where: str | None = None) -> None:
    """Check an RLE string's syntax (integer pairs, non-negative starts, positive lengths) with one regex.

    Cheap enough to run on every row of a label file at load time; bounds need the image size and are checked by
    ``rle_decode``. ``where`` (an image id, a file and row) prefixes any error message so a bad row can be found.
    """
    _checked_text(rle, where)


def parse_rle(rle: str, *, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check an RLE string's syntax and return its runs as absolute column-major ``(starts, lengths)``.

    ``-1`` gives two empty arrays. Bounds are not checked (they need the image size: see ``rle_decode``).
    """
    text = _checked_text(rle, where)
    if text == EMPTY:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    values = np.array(text.split(), dtype=np.int64)
    relative, lengths = values[0::2], values[1::2]
    ends_before = np.cumsum(lengths) - lengths
    return np.cumsum(relative) + ends_before, lengths


def _checked_text(rle: str, where: str | None) -> str:
    """The stripped RLE text if its syntax is valid, else a LabelError saying what is wrong and where."""
    text = str(rle).strip()
    if text == EMPTY or _PAIRS.fullmatch(text):
        return text
    prefix = f"{where}: " if where else ""
    raise LabelError(prefix + _syntax_problem(text))


def _syntax_problem(text: str) -> str:
    """Why ``text`` (already known to be invalid) is not an RLE string, naming the first offending value or run."""
    if not text:
        return "empty RLE string (an empty mask is written -1)"
    tokens = text.split()
    bad = next((t for t in tokens if not _INTEGER.fullmatch(t)), None)
    if bad is not None:
        return f"RLE value {bad[:20]!r} is not an integer"
    if len(tokens) % 2:
        return f"RLE has an odd number of values ({len(tokens)}): it must be start/length pairs"
    big = next((t for t in tokens if len(t.lstrip("-")) > _MAX_DIGITS), None)
    if big is not None:
        return f"RLE value {big[:20]!r} has over {_MAX_DIGITS} digits: too large for any image"
    run = next(i for i, t in enumerate(tokens[0::2]) if t.startswith("-") or int(tokens[2 * i + 1]) <= 0)
    if tokens[2 * run].startswith("-"):
        return f"RLE run {run + 1} has a negative start"
    return f"RLE run {run + 1} has a length that is not positive"


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (bool, 0/1 or 0/255) in the challenge's RLE; ``-1`` when it is empty.

    The mask is read in the order its memory holds: a column-major one (Fortran order, or a transposed view) is
    already in the RLE's order, so its foreground indices come out sorted; a row-major one (or any other view) is
    read row by row and its indices are sorted into column-major order. Either way only the band of rows (or
    columns) holding foreground is scanned past the first cheap ``any`` pass.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise LabelError(f"cannot encode a mask of shape {m.shape}: a 2-D height x width array is required")
    m = m if m.dtype == bool else m > 0  # an elementwise result keeps the input's memory order
    height, width = m.shape
    columns = m.T
    if columns.flags.c_contiguous:  # column-major memory: row c of the transpose is column c of the mask
        band = np.flatnonzero(columns.any(axis=1))
        if band.size == 0:
            return EMPTY
        first, last = int(band[0]), int(band[-1]) + 1
        flat = np.flatnonzero(columns[first:last]) + first * height
    else:
        band = np.flatnonzero(m.any(axis=1))
        if band.size == 0:
            return EMPTY
        first, last = int(band[0]), int(band[-1]) + 1
        rows, cols = np.divmod(np.flatnonzero(m[first:last]), width)
        flat = np.sort(cols * height + (rows + first))
    breaks = np.flatnonzero(np.diff(flat) != 1) + 1
    starts = flat[np.concatenate(([0], breaks))]
    ends = flat[np.concatenate((breaks - 1, [flat.size - 1]))] + 1
    pairs = np.empty(2 * starts.size, dtype=np.int64)
    pairs[0::2] = starts - np.concatenate(([0], ends[:-1]))
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


def rle_decode(rle: str, height: int = 1024, width: int = 1024, *, where: str | None = None) -> np.ndarray:
    """Decode a challenge RLE string into a ``height`` x ``width`` bool mask.

    ``where`` (an image id, a file and row) prefixes any error message so a bad row can be found.
    """
    starts, lengths = parse_rle(rle, where=where)
    mask = np.zeros((height, width), dtype=bool)
    if starts.size == 0:
        return mask
    end, n_pixels = int(starts[-1] + lengths[-1]), height * width
    if end > n_pixels:
        prefix = f"{where}: " if where else ""
        raise LabelError(f"{prefix}RLE runs past the end of a {height}x{width} image (pixel {end} > {n_pixels})")
    run_offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    cols, rows = np.divmod(np.arange(run_offsets.size) + run_offsets, height)
    mask[rows, cols] = True
    return mask
