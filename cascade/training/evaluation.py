"""Scoring a submission CSV against a label CSV with the challenge metric: what ``cascade evaluate`` runs.

Both files are read like label files (several rows of one ImageId are united into one mask). Which images are
scored:

- by default every labelled image; a labelled image absent from the submission counts as an empty prediction (as
  the challenge scored it) and is listed in ``missing``;
- ``only_submitted``: only the labelled images the submission names (for scoring a subset, e.g. one fold);
- a submitted ImageId with no label is an error naming the first few, unless ``ignore_unknown`` drops them
  (counted in ``unknown``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cascade.common.messages import SHOWN, first_few
from cascade.data.labels import read_labels
from cascade.errors import ConfigError, LabelError
from cascade.thresholds.metrics import Summary, dice, summarize



@dataclass(frozen=True, eq=False)
class Evaluation:
    """The scores of one submission, with the per-image values behind them."""

    summary: Summary
    image_ids: list[str]
    dices: np.ndarray = field(repr=False)
    true_positive: np.ndarray = field(repr=False)
    pred_positive: np.ndarray = field(repr=False)
    missing: list[str]
    """Labelled images the submission lacks, scored as empty (empty with ``only_submitted``)."""
    unknown: list[str]
    """Submitted ImageIds without a label, left out (only with ``ignore_unknown``)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``evaluate.json`` holds besides the file names)."""
        return {
            **self.summary.to_dict(),
            "missing_from_submission": {"count": len(self.missing), "first": self.missing[:SHOWN]},
            "unknown_ignored": {"count": len(self.unknown), "first": self.unknown[:SHOWN]},
        }


def score_submission(
    submission: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    *,
    size: tuple[int, int] = (1024, 1024),
    only_submitted: bool = False,
    ignore_unknown: bool = False,
    progress: bool = False,
) -> Evaluation:
    """Score ``submission`` against ``labels`` (RLE strings refer to ``size`` = height, width)."""
    height, width = size
    if height <= 0 or width <= 0:
        raise ConfigError(f"the mask size must be two positive integers, got {height} {width}")
    truth = read_labels(labels)
    sub = read_labels(submission)
    unknown = [i for i in sub.image_ids if i not in truth]
    if unknown and not ignore_unknown:
        raise LabelError(
            f"{submission}: {len(unknown)} ImageId(s) not in the labels {labels}: {first_few(unknown)} "
            "(--ignore-unknown leaves them out)"
        )
    ids = [i for i in truth.image_ids if i in sub] if only_submitted else list(truth.image_ids)
    if not ids:
        raise LabelError(f"{submission}: no submitted ImageId has a label in {labels}; nothing to score")
    missing = [] if only_submitted else [i for i in ids if i not in sub]
    dices = np.ones(len(ids), dtype=np.float64)
    pred_pos = np.zeros(len(ids), dtype=bool)
    true_pos = np.zeros(len(ids), dtype=bool)
    iterator = ids
    if progress:
        from cascade.common.progress import progress_bar

        iterator = progress_bar(ids, desc="evaluate", unit="img")
    for k, image_id in enumerate(iterator):
        true_pos[k] = truth.is_positive(image_id)
        pred_pos[k] = image_id in sub and sub.is_positive(image_id)
        if true_pos[k] or pred_pos[k]:  # both empty: Dice 1 without decoding anything
            predicted = sub.mask(image_id, height, width) if pred_pos[k] else np.zeros((height, width), bool)
            dices[k] = dice(predicted, truth.mask(image_id, height, width))
    return Evaluation(
        summary=summarize(dices, pred_pos, true_pos),
        image_ids=ids,
        dices=dices,
        true_positive=true_pos,
        pred_positive=pred_pos,
        missing=missing,
        unknown=unknown,
    )
