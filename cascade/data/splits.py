"""K-fold splits stratified by positive/negative and grouped by patient, and the ``split.csv`` that records them.

``make_folds`` is pure and deterministic: the same ids, labels, groups, k and seed give the same folds in any input
order. Groups (patients) are shuffled with the seed, then placed largest first, each into the fold whose positive
and negative counts are furthest below their targets, weighted by the group's own positives and negatives. This
greedy step is what minimises the summed squared deviation from the target counts, so fold sizes and positive
rates end up within about one group of each other.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cascade.errors import ConfigError, DicomError, LabelError
from cascade.storage.fileio import atomic_write_text, input_file

SPLIT_COLUMNS = ("ImageId", "fold", "positive")

log = logging.getLogger(__name__)


class Split(NamedTuple):
    """The contents of a ``split.csv``: fold and label per ImageId."""

    folds: dict[str, int]
    positive: dict[str, bool]


def make_folds(
    image_ids: Sequence[str],
    positive: Mapping[str, bool],
    groups: Mapping[str, str | None] | None,
    k: int,
    seed: int,
) -> dict[str, int]:
    """Assign each image a fold in ``range(k)``; all images of a group share a fold.

    ``groups`` maps ImageId -> group key (a patient); ``None`` (for all, or for one image) makes an image its own
    group. Returns ImageId -> fold, sorted by ImageId.
    """
    if k < 2:
        raise ConfigError(f"folds must be at least 2, got {k}")
    ids = sorted(set(image_ids))
    if len(ids) != len(image_ids):
        raise ConfigError("make_folds: an ImageId is listed twice")
    missing = next((i for i in ids if i not in positive), None)
    if missing is not None:
        raise ConfigError(f"make_folds: no positive/negative label for ImageId {missing}")
    members: dict[tuple[str, str], list[str]] = {}
    for image_id in ids:
        key = None if groups is None else groups.get(image_id)
        members.setdefault(("image", image_id) if key is None else ("group", key), []).append(image_id)
    if k > len(members):
        raise ConfigError(f"{k} folds asked for, but there are only {len(members)} patient groups")

    rng = np.random.default_rng(seed)
    shuffled = list(members.values())
    order = [shuffled[i] for i in rng.permutation(len(shuffled))]
    order.sort(key=len, reverse=True)  # stable: equal sizes keep the shuffled order
    n_pos = sum(bool(positive[i]) for i in ids)
    n_neg = len(ids) - n_pos
    pos_in, neg_in = [0] * k, [0] * k
    folds: dict[str, int] = {}
    for group in order:
        p = sum(bool(positive[i]) for i in group)
        q = len(group) - p
        # Adding the group to fold f changes the squared deviation sum by 2*(p*pos_f/P + q*neg_f/Q) + constants.
        costs = [
            (p * pos_in[f] / max(n_pos, 1) + q * neg_in[f] / max(n_neg, 1), pos_in[f] + neg_in[f], f) for f in range(k)
        ]
        fold = min(costs)[2]
        pos_in[fold] += p
        neg_in[fold] += q
        folds.update(dict.fromkeys(group, fold))
    return dict(sorted(folds.items()))


def split_fingerprint(folds: Mapping[str, int]) -> str:
    """sha256 of the sorted ``ImageId,fold`` lines: equal fingerprints mean the same split."""
    text = "".join(f"{image_id},{folds[image_id]}\n" for image_id in sorted(folds))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_split_csv(path: str | os.PathLike[str], folds: Mapping[str, int], positive: Mapping[str, bool]) -> None:
    """Write ``ImageId,fold,positive`` (positive as 0/1), sorted by ImageId, atomically."""
    lines = [",".join(SPLIT_COLUMNS)]
    lines += [f"{image_id},{int(folds[image_id])},{int(bool(positive[image_id]))}" for image_id in sorted(folds)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_split_csv(path: str | os.PathLike[str]) -> Split:
    """Read a ``split.csv`` written by ``write_split_csv``; a malformed row raises LabelError naming it."""
    name = str(path)
    input_file(path, LabelError, "split file")  # stat first: opening a FIFO would block
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise LabelError(f"{name}: cannot read the split file ({err})") from None
    if not rows or tuple(c.strip() for c in rows[0]) != SPLIT_COLUMNS:
        raise LabelError(f"{name}:row 1: header must be {','.join(SPLIT_COLUMNS)}")
    split = Split({}, {})
    for line, cells in enumerate(rows[1:], start=2):
        if not cells:
            continue
        image_id, fold, positive = (c.strip() for c in cells) if len(cells) == 3 else ("", "", "")
        if not image_id or not (fold.isascii() and fold.isdigit()) or positive not in ("0", "1"):
            raise LabelError(f"{name}:row {line}: expected ImageId,<fold number>,<0 or 1>")
        if image_id in split.folds:
            raise LabelError(f"{name}:row {line}: ImageId {image_id} appears twice")
        split.folds[image_id] = int(fold)
        split.positive[image_id] = positive == "1"
    if not split.folds:
        raise LabelError(f"{name}: no rows after the header")
    return split


def read_groups(
    paths: Mapping[str, Path], progress: bool = True, sizes: dict[str, tuple[int, int]] | None = None
) -> dict[str, str | None]:
    """Patient key per ImageId from the DICOM headers (None when absent or unreadable, which is logged).

    The keys are hashes of PatientID: keep them in memory for ``make_folds``, never write them out. ``sizes``, when
    given, receives each readable image's native ``(rows, columns)`` from the same header read.
    """
    from cascade.common.progress import progress_bar
    from cascade.data.dicom import read_header_facts  # pydicom is only needed here, not to split

    groups: dict[str, str | None] = {}
    keys = progress_bar(paths.items(), desc="patient keys", unit="file", disable=not progress or len(paths) < 100)
    for image_id, path in keys:
        try:
            groups[image_id], rows, cols = read_header_facts(path)
        except DicomError as err:
            log.warning("%s (the image is its own group)", err)
            groups[image_id] = None
            continue
        if sizes is not None:
            sizes[image_id] = (rows, cols)
    return groups
