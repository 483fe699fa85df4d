"""The SIIM-ACR run-length encoding of masks.

Pixels are numbered column-major (flat index = col * height + row); a mask is written as whitespace-separated
pairs ``start length`` where each ``start`` counts the pixels skipped since the end of the previous run (the first
from pixel 0); an empty mask is ``-1``. Both directions are vectorised with numpy.
"""

from __future__ import annotations

import numpy as np

from cascade.errors import LabelError

EMPTY = "-1"


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (bool, 0/1 or 0/255) in the challenge's RLE; ``-1`` when it is empty."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise LabelError(f"cannot encode a mask of shape {m.shape}: a 2-D height x width array is required")
    flat = m.ravel(order="F") > 0
    padded = np.concatenate(([False], flat, [False])).view(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    if edges.size == 0:
        return EMPTY
    starts, ends = edges[0::2], edges[1::2]
    relative = starts - np.concatenate(([0], ends[:-1]))
    pairs = np.empty(2 * starts.size, dtype=np.int64)
    pairs[0::2] = relative
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


def rle_decode(rle: str, height: int = 1024, width: int = 1024, *, where: str | None = None) -> np.ndarray:
    """Decode a challenge RLE string into a ``height`` x ``width`` bool mask.

    ``where`` (an image id, a file and row) prefixes any error message so a bad row can be found.
    """
    prefix = f"{where}: " if where else ""
    text = str(rle).strip()
    n_pixels = height * width
    if text == EMPTY:
        return np.zeros((height, width), dtype=bool)
    if not text:
        raise LabelError(f"{prefix}empty RLE string (an empty mask is written -1)")
    tokens = text.split()
    if len(tokens) % 2:
        raise LabelError(f"{prefix}RLE has an odd number of values ({len(tokens)}): it must be start/length pairs")
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((t for t in tokens if not t.lstrip("-").isdigit()), None)
        reason = f"RLE value {bad!r} is not an integer" if bad is not None else "RLE value out of range"
        raise LabelError(f"{prefix}{reason}") from None
    relative, lengths = values[0::2], values[1::2]
    if (relative < 0).any():
        raise LabelError(f"{prefix}RLE run {int(np.argmax(relative < 0)) + 1} has a negative start")
    if (lengths <= 0).any():
        raise LabelError(f"{prefix}RLE run {int(np.argmax(lengths <= 0)) + 1} has a length that is not positive")
    starts = np.cumsum(relative) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    ends = starts + lengths
    if ends[-1] > n_pixels:
        raise LabelError(
            f"{prefix}RLE runs past the end of a {height}x{width} image (pixel {int(ends[-1])} > {n_pixels})"
        )
    edges = np.bincount(starts, minlength=n_pixels + 1) - np.bincount(ends, minlength=n_pixels + 1)
    flat = np.cumsum(edges[:n_pixels]) > 0
    return np.ascontiguousarray(flat.reshape(width, height).T)
