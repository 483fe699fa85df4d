"""The challenge metric and image-level statistics.

Per-image Dice follows the SIIM-ACR convention: ``2|X∩Y| / (|X| + |Y|)``, and **1** when truth and prediction are
both empty (so an empty truth with any predicted pixel scores 0). An image is *predicted positive* when its final
mask is non-empty and *truly positive* when its truth mask is non-empty.

Undefined ratios (sensitivity without positive images, specificity without negatives, Dice on true positives
without any, ROC AUC with a single class) are ``nan``; :func:`json_float` turns them into JSON ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


def dice_from_counts(intersection: Any, pred_area: Any, true_area: Any) -> np.ndarray:
    """Vectorised per-image Dice from pixel counts (broadcasts; 1 where both areas are 0)."""
    inter = np.asarray(intersection, dtype=np.float64)
    total = np.asarray(pred_area, dtype=np.float64) + np.asarray(true_area, dtype=np.float64)
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, 2.0 * inter / safe, 1.0)


def best_min_area(intersection: Any, pred_area: Any, true_area: Any) -> tuple[float, int]:
    """The best mean Dice when every image whose predicted area is below a minimum is called empty, and that minimum
    (in pixels; 0 keeps every prediction). Scores a segmenter as the tuned cascade will use it: a few stray pixels
    on negative images are removed by the area rule, so they should not decide which epoch is best."""
    pred = np.asarray(pred_area, dtype=np.int64)
    kept = dice_from_counts(intersection, pred, true_area)
    if pred.size == 0:
        return math.nan, 0
    gain = (np.asarray(true_area) == 0).astype(np.float64) - kept  # what calling an image empty changes
    order = np.argsort(pred, kind="stable")
    cumulative = np.concatenate([[0.0], np.cumsum(gain[order])])
    minimums = np.concatenate([[0], np.unique(pred) + 1])
    emptied = np.searchsorted(pred[order], minimums, side="left")  # images with area < minimum
    totals = kept.sum() + cumulative[emptied]
    best = int(np.argmax(totals))  # the smallest minimum among equals
    return float(totals[best] / pred.size), int(minimums[best])


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Per-image Dice of two same-shaped masks (nonzero = foreground), challenge convention."""
    p = np.asarray(pred) != 0
    t = np.asarray(truth) != 0
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    return float(dice_from_counts(np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t)))


def mean_dice(preds: Iterable[np.ndarray], truths: Iterable[np.ndarray]) -> float:
    """Mean per-image Dice over paired masks (iterables are consumed one pair at a time)."""
    values = [dice(p, t) for p, t in zip(preds, truths, strict=True)]
    return float(np.mean(values)) if values else math.nan


@dataclass(frozen=True)
class Confusion:
    """Image-level confusion matrix (positive = non-empty mask)."""

    tp: int
    fp: int
    fn: int
    tn: int

    def to_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


def confusion(pred_positive: Any, true_positive: Any) -> Confusion:
    """Confusion matrix of two bool vectors (one entry per image)."""
    p = np.asarray(pred_positive, dtype=bool)
    t = np.asarray(true_positive, dtype=bool)
    return Confusion(
        tp=int(np.count_nonzero(p & t)),
        fp=int(np.count_nonzero(p & ~t)),
        fn=int(np.count_nonzero(~p & t)),
        tn=int(np.count_nonzero(~p & ~t)),
    )


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def sensitivity(c: Confusion) -> float:
    """tp / (tp + fn): the share of truly positive images predicted positive (nan without positives)."""
    return _ratio(c.tp, c.tp + c.fn)


def specificity(c: Confusion) -> float:
    """tn / (tn + fp): the share of truly negative images predicted empty (nan without negatives)."""
    return _ratio(c.tn, c.tn + c.fp)


def roc_auc(scores: Any, true_positive: Any) -> float:
    """Area under the ROC curve of image scores against truth; nan when only one class is present."""
    t = np.asarray(true_positive, dtype=bool)
    if t.all() or not t.any():
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(t, np.asarray(scores, dtype=np.float64)))


def json_float(value: float) -> float | None:
    """``value`` for JSON: ``None`` when it is nan or infinite."""
    return float(value) if math.isfinite(value) else None


def format_number(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` decimals for people, or ``n/a`` when undefined (None, nan: e.g. sensitivity
    without positive images)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


@dataclass(frozen=True)
class Summary:
    """What `cascade evaluate` prints and `tune` reports for one setting."""

    images: int
    mean_dice: float
    dice_positive: float
    """Mean Dice over the true positives (truth and prediction both non-empty): the segmenter's quality alone."""
    dice_all_positives: float
    """Mean Dice over every truly positive image, a missed one scoring 0: the quality a positive patient gets."""
    confusion: Confusion

    @property
    def sensitivity(self) -> float:
        return sensitivity(self.confusion)

    @property
    def specificity(self) -> float:
        return specificity(self.confusion)

    @property
    def baseline_empty(self) -> float:
        """Mean Dice of predicting every image empty: the share of truly negative images (nan without images)."""
        c = self.confusion
        return _ratio(c.tn + c.fp, self.images)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "mean_dice": json_float(self.mean_dice),
            "baseline_empty": json_float(self.baseline_empty),
            "dice_positive": json_float(self.dice_positive),
            "dice_all_positives": json_float(self.dice_all_positives),
            "sensitivity": json_float(self.sensitivity),
            "specificity": json_float(self.specificity),
            "confusion": self.confusion.to_dict(),
        }


def summarize(dices: Any, pred_positive: Any, true_positive: Any) -> Summary:
    """Summary from per-image Dice values and image-level decisions.

    ``dice_positive`` is the mean Dice over true positives (truth and prediction both non-empty), the factor in
    ``score = (1-p)·specificity + p·sensitivity·dice_positive``; ``dice_all_positives`` averages over every truly
    positive image, misses as 0 (``= sensitivity·dice_positive``).
    """
    d = np.asarray(dices, dtype=np.float64)
    p = np.asarray(pred_positive, dtype=bool)
    t = np.asarray(true_positive, dtype=bool)
    both = p & t
    return Summary(
        images=int(d.size),
        mean_dice=float(d.mean()) if d.size else math.nan,
        dice_positive=float(d[both].mean()) if both.any() else math.nan,
        dice_all_positives=float(d[t].mean()) if t.any() else math.nan,
        confusion=confusion(p, t),
    )
