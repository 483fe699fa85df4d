"""Exact grid search of the cascade's thresholds for mean per-image Dice (the rule: cascade.thresholds.rule).

One streaming pass keeps, per image, a few small integer arrays (:class:`ThresholdSearch.add`):

- the number of pixels at or above each ``top`` value (the gate's area test),
- for each ``bottom`` and each ``min_component``, the predicted area and its intersection with the truth after the
  small 8-connected components are removed (one connected-components labelling per ``bottom``),
- the truth area and the classifier probability.

From these every grid point is exact and O(1) per image. Writing ``e_i`` for the Dice of an empty prediction
(1 for a negative image, 0 otherwise) and ``d_i(b, m)`` for the Dice of the mask drawn at ``(bottom, min_component)``,
the score is ``mean_i e_i + mean_i gate_i(cls, top, area) · (d_i(b, m) − e_i)``: one matrix product of the gate
matrix (images × cls·top·area) with the Dice gains (images × bottom·min_component), done in chunks of images.
The per-image statistics take about 1 KB per image with the default grid, so 12,047 images stay near 15 MB.

Ties (scores within ``TIE_TOLERANCE`` of the maximum; the tolerance only absorbs floating-point summation order):
the classifier gate goes to the **middle** of the tied ``cls`` values (the lower one of the two middle values),
then the first tied point in grid order (top, area, bottom, min_component, each ascending). Often a whole range of
gates scores the same on the validation fold — every negative below it is already rejected by the top/area rule;
the lowest would switch the gate off (the segmenter runs on every image), the highest sits where the next positive
would be lost. The middle lets the gate skip the segmenter on the images it can, with margin on both sides.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cascade.errors import CascadeError, ConfigError
from cascade.thresholds.metrics import (
    Confusion,
    Summary,
    dice,
    dice_from_counts,
    json_float,
    roc_auc,
    summarize,
)
from cascade.thresholds.rule import FIELDS, Thresholds, apply_rule, area_scale, component_sizes

TIE_TOLERANCE = 1e-12
MIN_TRUSTED_IMAGES = 50
MIN_TRUSTED_POSITIVES = 10
"""Below either count ``tune`` warns that its validation fold is too small to trust."""
NEAR_CHANCE_AUC = 0.6
"""Below this classifier ROC AUC the gate cannot separate the classes: ``tune`` opens it (see :func:`gate_verdict`)."""
MIN_SKIPPED_NEGATIVES = 0.05
"""A best gate that keeps less than this share of the validation negatives from the segmenter does not pay for its
classifier pass: ``tune`` opens it (see :func:`gate_verdict`)."""
DICE_TOLERANCE = 0.005
"""``cascade tune``'s default ``--dice-tolerance``: the gate that sends the fewest images to the segmenter among the
points within this much validation mean Dice of the best (speed for at most 0.005 Dice, well inside a validation
fold's noise; 0 chooses the best point alone)."""
NATURAL_LOWER_ENDS = ("cls", "area", "min_component")
"""Thresholds whose lowest searched value (0) is a natural bound: best there means "off", not "search lower"."""
SENSITIVITY_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
_CHUNK = 1024


def read_grid(path: str | os.PathLike[str]) -> Grid:
    """A :class:`Grid` from a YAML mapping of threshold names to value lists; fields it omits keep the default."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such grid file") from None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable YAML grid ({type(err).__name__})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: a grid file maps threshold names ({', '.join(FIELDS)}) to lists of values")
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    if unknown:
        raise ConfigError(f"{path}: unknown threshold(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    try:
        return Grid(**data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _steps(start: float, stop: float, step: float) -> tuple[float, ...]:
    n = int(round((stop - start) / step))
    return tuple(round(start + i * step, 6) for i in range(n + 1))


@dataclass(frozen=True)
class Grid:
    """The values searched for each threshold; ``area``/``min_component`` are pixels at 1024².

    The default has 30 x 14 x 8 x 13 x 4 = 174,720 points. ``cls`` steps by 0.01 up to 0.1 and by 0.025 up to 0.2: a
    gate trained at 22% prevalence gives most negatives probabilities below 0.15, where steps of 0.05 jumped from
    keeping 11% of the validation negatives from the segmenter to 74% (docs/workflow.md).
    """

    cls: tuple[float, ...] = _steps(0.0, 0.1, 0.01) + _steps(0.125, 0.2, 0.025) + _steps(0.25, 0.95, 0.05)
    top: tuple[float, ...] = _steps(0.3, 0.95, 0.05)
    area: tuple[float, ...] = (0, 128, 256, 512, 1024, 2048, 3072, 4096)
    bottom: tuple[float, ...] = _steps(0.1, 0.7, 0.05)
    min_component: tuple[float, ...] = (0, 256, 1024, 2048)

    def __post_init__(self) -> None:
        for name in FIELDS:
            raw = getattr(self, name)
            try:
                values = tuple(float(v) for v in np.atleast_1d(np.asarray(raw, dtype=np.float64)))
            except (TypeError, ValueError):
                raise ConfigError(f"grid {name!r} must be a list of numbers, got {raw!r}") from None
            if not values:
                raise ConfigError(f"grid {name!r} is empty")
            if any(b <= a for a, b in zip(values, values[1:])):
                raise ConfigError(f"grid {name!r} must be strictly increasing, got {list(values)}")
            for v in (values[0], values[-1]):  # Thresholds checks the range of each end
                Thresholds(**{k: (v if k == name else 0.0) for k in FIELDS})
            object.__setattr__(self, name, values)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (len(self.cls), len(self.top), len(self.area), len(self.bottom), len(self.min_component))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def point(self, index: Sequence[int]) -> Thresholds:
        """The thresholds at a (cls, top, area, bottom, min_component) index."""
        return Thresholds(**{k: getattr(self, k)[int(i)] for k, i in zip(FIELDS, index)})

    def to_dict(self) -> dict[str, list[float]]:
        return {k: list(getattr(self, k)) for k in FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Grid:
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ConfigError(f"grid: unknown key(s) {', '.join(map(str, unknown))}; expected {', '.join(FIELDS)}")
        return cls(**{k: tuple(v) for k, v in data.items()})


def best_point(scores: np.ndarray, allowed: np.ndarray | None = None) -> tuple[int, ...] | None:
    """Index of the best allowed score (None if none), ties broken as the module docstring says."""
    masked = scores if allowed is None else np.where(allowed, scores, -np.inf)
    top = masked.max()
    if not np.isfinite(top):
        return None
    tied = masked >= top - TIE_TOLERANCE
    tied_cls = np.flatnonzero(tied.reshape(tied.shape[0], -1).any(axis=1))
    cls = int(tied_cls[(tied_cls.size - 1) // 2])
    rest = int(np.flatnonzero(tied[cls].ravel())[0])
    return (cls, *(int(i) for i in np.unravel_index(rest, scores.shape[1:])))


def gate_verdict(auc: float, skipped_negatives: float) -> str | None:
    """Why the classifier gate does not pay (None when it does, or when it cannot be judged).

    **The gate-open rule**: with both classes among the validation images, the gate is open when the classifier's
    ROC AUC is below :data:`NEAR_CHANCE_AUC` (0.6: it cannot separate the classes, so any gate skips images at
    random), or when the best gate the search found keeps less than :data:`MIN_SKIPPED_NEGATIVES` (5%) of the
    validation negatives from the segmenter (it decides nothing worth its classifier pass). ``tune`` then sets
    ``cls`` to 0 (:meth:`ThresholdSearch.result`) — unless opening it costs more validation Dice than the fold's
    noise (1.96 standard errors of the paired per-image difference), ``--max-segmenter-share`` asks for a gate, or
    the grid has no ``cls`` 0; the statement then says why the gate is kept.
    """
    if not (math.isfinite(auc) and math.isfinite(skipped_negatives)):
        return None
    if auc < NEAR_CHANCE_AUC:
        return f"the classifier does not separate the classes (AUC {auc:.3f}, below {NEAR_CHANCE_AUC:g})"
    if skipped_negatives < MIN_SKIPPED_NEGATIVES:
        return (
            f"the gate does not pay: the best one keeps only {100 * skipped_negatives:.1f}% of the validation "
            f"negatives from the segmenter, under {100 * MIN_SKIPPED_NEGATIVES:g}% (classifier AUC {auc:.3f})"
        )
    return None


@dataclass
class TuneResult:
    """The outcome of a search; arrays are indexed (cls, top, area, bottom, min_component) like ``grid``."""

    thresholds: Thresholds
    score: float
    baseline: float
    summary: Summary
    grid: Grid
    best_index: tuple[int, ...]
    scores: np.ndarray = field(repr=False)
    tp: np.ndarray = field(repr=False)
    fp: np.ndarray = field(repr=False)
    positives: int
    negatives: int
    cls_probs: np.ndarray = field(repr=False)
    truth_positive: np.ndarray = field(repr=False)
    min_sensitivity: float | None = None
    max_segmented_share: float | None = None
    per_image_dice: np.ndarray | None = field(default=None, repr=False)
    """Each validation image's Dice at the chosen point (for the score's uncertainty)."""
    dice_tolerance: float = 0.0
    best_score: float = math.nan
    """The best mean Dice of the search (under the same limits): the chosen point is within ``dice_tolerance`` of it,
    with the fewest images sent to the segmenter."""
    gate_open: dict[str, Any] | None = None
    """Set when the gate-open rule (:func:`gate_verdict`) fired: ``reason``, ``applied`` (``cls`` set to 0; false
    when ``max_segmented_share`` asked for a gate or the grid has no ``cls`` 0), and the best gated point it replaced
    (``gated_cls``, ``gated_score``, ``gated_skipped_negatives``), what opening costs (``open_cost``, ``noise``);
    ``kept_because`` when not applied. ``statement`` (in ``to_dict``) is the line reports print."""

    @property
    def gate_statement(self) -> str | None:
        """The one line ``tune``'s printout, ``tune.json``, ``MODEL_CARD.md`` and the demo report give (None when the
        gate pays)."""
        g = self.gate_open
        if g is None:
            return None
        if not g["applied"]:
            return f"{g['reason']}; the gate (cls {g['gated_cls']:g}) is kept only because {g['kept_because']}"
        tail = (
            "cls is 0" if g["gated_cls"] == 0 else
            f"cls is set to 0 (the best gate, cls {g['gated_cls']:g}, scored mean Dice {g['gated_score']:.4f} "
            f"on the validation images, {self.score:.4f} open)"
        )
        return f"gate open: {g['reason']}; {tail}: the segmenter runs on every image"

    @property
    def standard_error(self) -> float:
        """Standard error of the mean Dice over the validation images (nan with fewer than two)."""
        d = self.per_image_dice
        if d is None or d.size < 2:
            return math.nan
        return float(np.std(d, ddof=1) / math.sqrt(d.size))

    def warnings(self) -> list[str]:
        """What a user should know before trusting the chosen point: a small fold, a classifier near chance, a best
        point on the edge of a searched range (the optimum may lie beyond it)."""
        out = []
        n = self.positives + self.negatives
        if n < MIN_TRUSTED_IMAGES or self.positives < MIN_TRUSTED_POSITIVES:
            out.append(
                f"the validation images are too few to trust the tuned thresholds: {n} images, {self.positives} "
                f"positive (want at least {MIN_TRUSTED_IMAGES} and {MIN_TRUSTED_POSITIVES}); the mean Dice "
                f"{self.score:.4f} is uncertain by about ±{1.96 * self.standard_error:.4f} (95%)"
            )
        auc = self.classifier_auc
        if self.gate_open is None and math.isfinite(auc) and auc < NEAR_CHANCE_AUC:
            out.append(
                f"the classifier's ROC AUC is {auc:.3f}, near chance: the gate can only skip images at random; "
                "train the classifier longer or from the segmenter (--init-from)"
            )
        c = self.confusion
        if c.tp + c.fp == 0:  # the best point draws no mask anywhere: where it sits in the grid means nothing
            return out
        for axis, name in enumerate(FIELDS):
            values = getattr(self.grid, name)
            i = self.best_index[axis]
            if len(values) < 2 or (i == 0 and name in NATURAL_LOWER_ENDS) or 0 < i < len(values) - 1:
                continue
            end = "lowest" if i == 0 else "highest"
            out.append(
                f"the best {name} ({values[i]:g}) is the {end} value searched ({values[0]:g}..{values[-1]:g}): the "
                f"optimum may lie beyond it; widen the range with --grid (a YAML file: {name}: [values])"
            )
        return out

    @property
    def confusion(self) -> Confusion:
        return self.summary.confusion

    @property
    def dice_positive(self) -> float:
        return self.summary.dice_positive

    @property
    def sensitivity_table(self) -> np.ndarray:
        """Image-level sensitivity at every grid point (nan without positive images)."""
        return self.tp / self.positives if self.positives else np.full(self.tp.shape, math.nan)

    @property
    def specificity_table(self) -> np.ndarray:
        """Image-level specificity at every grid point (nan without negative images)."""
        return (self.negatives - self.fp) / self.negatives if self.negatives else np.full(self.fp.shape, math.nan)

    @property
    def classifier_auc(self) -> float:
        return roc_auc(self.cls_probs, self.truth_positive)

    def _point(self, index: tuple[int, ...]) -> dict[str, Any]:
        return {
            "thresholds": self.grid.point(index).to_dict(),
            "mean_dice": float(self.scores[index]),
            "sensitivity": json_float(float(self.sensitivity_table[index])),
            "specificity": json_float(float(self.specificity_table[index])),
        }

    def breakdown(self) -> dict[str, dict[str, list[Any]]]:
        """For each threshold: mean Dice, sensitivity and specificity as it varies, the others at the best."""
        out = {}
        sens, spec = self.sensitivity_table, self.specificity_table
        for axis, name in enumerate(FIELDS):
            sl = tuple(slice(None) if a == axis else i for a, i in enumerate(self.best_index))
            out[name] = {
                "values": list(getattr(self.grid, name)),
                "mean_dice": self.scores[sl].tolist(),
                "sensitivity": [json_float(v) for v in sens[sl].tolist()],
                "specificity": [json_float(v) for v in spec[sl].tolist()],
            }
        return out

    def cls_bottom_table(self) -> np.ndarray:
        """Mean Dice over cls x bottom with top, area and min_component at the best point."""
        _, t, a, _, m = self.best_index
        return self.scores[:, t, a, :, m]

    @property
    def segmented_share(self) -> float:
        """Share of the validation images the chosen gate sends to the segmenter."""
        return float(np.mean(self.cls_probs >= self.thresholds.cls))

    @property
    def skipped_negatives(self) -> float:
        """Share of the truly negative validation images the chosen gate keeps from the segmenter (nan without)."""
        negatives = ~self.truth_positive
        if not negatives.any():
            return math.nan
        return float(np.mean(self.cls_probs[negatives] < self.thresholds.cls))

    def frontier(self) -> list[dict[str, Any]]:
        """For each searched gate ``cls``: the share of images it sends to the segmenter, the share of negatives it
        skips, and the best mean Dice reachable with it (the other thresholds at their best for that gate, subject
        to ``min_sensitivity`` when one was asked): the price in Dice of each saving in segmenter work."""
        sens = self.sensitivity_table
        allowed = None if self.min_sensitivity is None else sens >= self.min_sensitivity
        negatives = ~self.truth_positive
        rows = []
        for c, gate in enumerate(self.grid.cls):
            index = best_point(self.scores[c : c + 1], None if allowed is None else allowed[c : c + 1])
            passed = self.cls_probs >= gate
            rows.append({
                "cls": gate,
                "segmented_share": float(passed.mean()),
                "skipped_negatives": json_float(float((~passed[negatives]).mean()) if negatives.any() else math.nan),
                "mean_dice": None if index is None else float(self.scores[c][index[1:]]),
            })
        return rows

    def operating_points(self, levels: Sequence[float] = SENSITIVITY_LEVELS) -> list[dict[str, Any]]:
        """Best mean Dice subject to sensitivity >= each level (``thresholds`` None when out of reach)."""
        sens = self.sensitivity_table
        rows = []
        for level in levels:
            index = best_point(self.scores, sens >= level) if self.positives else None
            row: dict[str, Any] = {"min_sensitivity": level}
            row.update(self._point(index) if index is not None else {"thresholds": None, "mean_dice": None})
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``tune.json`` holds)."""
        return {
            "thresholds": self.thresholds.to_dict(),
            "score": self.score,
            "baseline_empty": self.baseline,
            "min_sensitivity": self.min_sensitivity,
            **{k: v for k, v in self.summary.to_dict().items() if k not in ("mean_dice", "baseline_empty")},
            "classifier_auc": json_float(self.classifier_auc),
            "breakdown": self.breakdown(),
            "cls_bottom": {
                "cls": list(self.grid.cls),
                "bottom": list(self.grid.bottom),
                "mean_dice": self.cls_bottom_table().tolist(),
            },
            "operating_points": self.operating_points(),
            "max_segmented_share": self.max_segmented_share,
            "dice_tolerance": self.dice_tolerance,
            "best_mean_dice": json_float(self.best_score),
            "segmented_share": self.segmented_share,
            "skipped_negatives": json_float(self.skipped_negatives),
            "frontier": self.frontier(),
            "gate_open": None if self.gate_open is None else {**self.gate_open, "statement": self.gate_statement},
            "grid": self.grid.to_dict(),
            "grid_points": self.grid.size,
        }


@dataclass(frozen=True)
class _Tables:
    """What :meth:`ThresholdSearch.result` chooses from: the per-image pieces of the rule (indexed by image) and the
    whole grid's scores and image-level true/false positive counts (indexed like ``grid``)."""

    grid: Grid
    cls: np.ndarray
    positive: np.ndarray
    dices: np.ndarray
    """Each image's Dice at every (bottom, min_component)."""
    empty: np.ndarray
    """Each image's Dice of an empty prediction (1 for a negative, 0 for a positive)."""
    masked: np.ndarray
    """Whether each image's mask is non-empty at every (bottom, min_component)."""
    cls_pass: np.ndarray
    top_pass: np.ndarray
    n_neg: int
    scores: np.ndarray
    tp: np.ndarray
    fp: np.ndarray

    def per_image_at(self, index: tuple[int, ...]) -> np.ndarray:
        """Each image's Dice at one grid point (the gate passes: the mask's Dice; else the empty one's)."""
        c, t, a, b, m = index
        return np.where(self.cls_pass[:, c] & self.top_pass[:, t, a], self.dices[:, b, m], self.empty)

    def allowed(self, min_sensitivity: float | None, max_segmented_share: float | None) -> np.ndarray | None:
        """The grid points that meet the limits (None: no limit, all allowed); ``CascadeError`` when a limit cannot
        be judged or no searched gate meets the segmented share."""
        allowed = None
        if min_sensitivity is not None:
            if not self.positive.any():
                raise CascadeError("threshold search: a minimum sensitivity needs positive images, and there are none")
            allowed = self.tp / self.positive.sum() >= min_sensitivity
        if max_segmented_share is not None:
            share = self.cls_pass.mean(axis=0)  # per gate value: the share of images the segmenter runs on
            if not (share <= max_segmented_share).any():
                raise CascadeError(
                    f"threshold search: no searched gate sends at most {max_segmented_share:g} of the images to the "
                    f"segmenter (the lowest share is {share.min():.4f}; widen the cls range with --grid)"
                )
            by_share = np.broadcast_to((share <= max_segmented_share)[:, None, None, None, None], self.grid.shape)
            allowed = by_share if allowed is None else allowed & by_share
        return allowed


class ThresholdSearch:
    """Streaming accumulator: ``add`` one image at a time, then ``result``; memory is O(images x grid axes).

    The per-image statistics live in a few preallocated arrays that double when full: thousands of tiny
    long-lived arrays between the 4 MB maps of a stream would fragment the heap and inflate the resident size.
    """

    def __init__(self, grid: Grid | None = None) -> None:
        self.grid = grid if grid is not None else Grid()
        self._tops = np.asarray(self.grid.top, dtype=np.float32)
        self._bottoms = np.asarray(self.grid.bottom, dtype=np.float32)
        self._n = 0
        _, n_t, _, n_b, n_m = self.grid.shape
        self._stats = {
            "cls": np.zeros(0),
            "scale": np.zeros(0),
            "truth": np.zeros(0, np.int64),
            "top_counts": np.zeros((0, n_t), np.int64),
            "pred": np.zeros((0, n_b, n_m), np.int64),
            "inter": np.zeros((0, n_b, n_m), np.int64),
        }

    def __len__(self) -> int:
        return self._n

    def _row(self) -> int:
        """Index of a fresh row in every statistics array (grown by doubling)."""
        n = self._n
        if n == len(self._stats["cls"]):
            for key, old in self._stats.items():
                new = np.zeros((max(256, 2 * n), *old.shape[1:]), old.dtype)
                new[:n] = old
                self._stats[key] = new
        self._n += 1
        return n

    def add(self, cls_prob: float, seg_prob: np.ndarray, mask: np.ndarray) -> None:
        """Record one image: its classifier probability, H x W probability map and H x W truth mask."""
        seg = np.asarray(seg_prob, dtype=np.float32)
        truth = np.asarray(mask) != 0
        where = f"image {len(self)}"
        if seg.ndim != 2:
            raise CascadeError(f"{where}: segmentation map must be 2-D (height x width), got shape {seg.shape}")
        if truth.shape != seg.shape:
            raise CascadeError(f"{where}: truth mask shape {truth.shape} differs from map shape {seg.shape}")
        scale = area_scale(*seg.shape)
        i = self._row()
        st = self._stats
        st["cls"][i], st["scale"][i], st["truth"][i] = float(cls_prob), scale, np.count_nonzero(truth)
        values = np.sort(seg[seg >= self._tops[0]])
        st["top_counts"][i] = values.size - np.searchsorted(values, self._tops, side="left")
        self._box_stats(seg, truth, scale, st["pred"][i], st["inter"][i])

    def _box_stats(self, seg: np.ndarray, truth: np.ndarray, scale: float, pred: np.ndarray, inter: np.ndarray) -> None:
        """Fill pred/inter [bottom, min_component], labelling components on the bounding box of each level.

        Bottoms ascend, so each level's pixels lie inside the previous level's box: the crop only shrinks.
        """
        min_px = np.asarray(self.grid.min_component, dtype=np.float64) * scale
        for b, level in enumerate(self._bottoms):
            binary = seg >= level
            rows = np.flatnonzero(binary.any(axis=1))
            if rows.size == 0:
                break  # every higher bottom is empty too
            cols = np.flatnonzero(binary.any(axis=0))
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            seg, truth, binary = seg[box], truth[box], np.ascontiguousarray(binary[box])
            count = np.count_nonzero(binary)
            if min_px.max() <= 1 or count < min_px[min_px > 1].min():  # no labelling needed: all or nothing kept
                pred[b] = np.where(min_px <= count, count, 0)
                inter[b] = np.where(min_px <= count, np.count_nonzero(binary & truth), 0)
                continue
            areas, hits = component_sizes(binary, truth)
            keep = (areas[None, :] >= min_px[:, None]).astype(np.int64)
            pred[b] = keep @ areas
            inter[b] = keep @ hits

    def result(
        self, min_sensitivity: float | None = None, max_segmented_share: float | None = None, *,
        open_gate: bool = True, dice_tolerance: float = 0.0,
    ) -> TuneResult:
        """The best thresholds, optionally subject to image-level sensitivity >= ``min_sensitivity`` and to the
        classifier gate sending at most ``max_segmented_share`` of the images to the segmenter.

        With ``dice_tolerance`` > 0 the chosen point is the one sending the fewest images to the segmenter among the
        allowed points within ``dice_tolerance`` mean Dice of the best (the best Dice among those; ties as
        :func:`best_point`): a gate that skips negatives at a negligible cost is preferred to an open one.

        With ``open_gate`` (the default, what ``cascade tune`` does) a gate that does not pay (:func:`gate_verdict`)
        is opened: the best point with ``cls`` 0 (the grid's first value) is returned instead, subject to the same
        ``min_sensitivity``, and ``TuneResult.gate_open`` says why. ``open_gate=False`` is the plain search.
        """
        n = len(self)
        if n == 0:
            raise CascadeError("threshold search: no images were given")
        for name, value in (("min_sensitivity", min_sensitivity), ("max_segmented_share", max_segmented_share),
                            ("dice_tolerance", dice_tolerance)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value!r}")
        tables = self._tables()
        allowed = tables.allowed(min_sensitivity, max_segmented_share)
        best = best_point(tables.scores, allowed)
        if best is None:
            reach = float(np.where(allowed, tables.tp, 0).max() / tables.positive.sum())
            raise CascadeError(
                f"threshold search: no grid point reaches sensitivity {min_sensitivity} (the highest is {reach:.4f}"
                + (f" with at most {max_segmented_share:g} of the images segmented)" if max_segmented_share is not
                   None else ")")
            )
        best_score = float(tables.scores[best])
        if dice_tolerance:
            best = _fewest_segmented(tables, allowed, best_score - dice_tolerance)
        gate_open = None
        if open_gate:
            gate_open, best = self._open_gate(
                best, tables.scores, allowed, tables.cls, tables.positive, max_segmented_share, tables.per_image_at
            )
        result = self._result(tables, best, min_sensitivity, max_segmented_share, gate_open)
        result.dice_tolerance, result.best_score = dice_tolerance, best_score
        return result

    def _tables(self) -> _Tables:
        """Score, true and false positives of every grid point at once, from the per-image statistics (see the
        module docstring: one chunked matrix product of the gates with the Dice gains)."""
        n = len(self)
        g = self.grid
        n_c, n_t, n_a, n_b, n_m = g.shape
        st = {key: values[:n] for key, values in self._stats.items()}
        truth = st["truth"]
        positive = truth > 0
        pred = st["pred"]
        dices = dice_from_counts(st["inter"], pred, truth[:, None, None])
        empty = (~positive).astype(np.float64)
        masked = pred > 0
        gains = np.concatenate(
            [
                (dices - empty[:, None, None]).reshape(n, -1),
                (masked & positive[:, None, None]).reshape(n, -1),
                (masked & ~positive[:, None, None]).reshape(n, -1),
            ],
            axis=1,
            dtype=np.float64,
        )
        cls_pass = st["cls"][:, None] >= np.asarray(g.cls)[None, :]
        area_px = np.asarray(g.area)[None, :] * st["scale"][:, None]
        top_pass = st["top_counts"][:, :, None] >= area_px[:, None, :]
        totals = np.zeros((n_c * n_t * n_a, gains.shape[1]))
        for s in range(0, n, _CHUNK):
            gate = cls_pass[s : s + _CHUNK, :, None, None] & top_pass[s : s + _CHUNK, None]
            totals += gate.reshape(gate.shape[0], -1).astype(np.float64).T @ gains[s : s + _CHUNK]
        k = n_b * n_m
        n_neg = int(n - positive.sum())
        return _Tables(
            grid=g, cls=st["cls"], positive=positive, dices=dices, empty=empty, masked=masked, cls_pass=cls_pass,
            top_pass=top_pass, n_neg=n_neg,
            scores=((n_neg + totals[:, :k]) / n).reshape(g.shape),
            tp=np.rint(totals[:, k : 2 * k]).astype(np.int64).reshape(g.shape),
            fp=np.rint(totals[:, 2 * k :]).astype(np.int64).reshape(g.shape),
        )

    @staticmethod
    def _result(
        tables: _Tables, best: tuple[int, ...], min_sensitivity: float | None, max_segmented_share: float | None,
        gate_open: dict[str, Any] | None,
    ) -> TuneResult:
        """The :class:`TuneResult` of the chosen point, its summary recomputed per image at that point."""
        c, t, a, b, m = best
        gate = tables.cls_pass[:, c] & tables.top_pass[:, t, a]
        per_image = tables.per_image_at(best)
        summary = summarize(per_image, gate & tables.masked[:, b, m], tables.positive)
        n = tables.cls.size
        return TuneResult(
            thresholds=tables.grid.point(best),
            score=summary.mean_dice,
            baseline=tables.n_neg / n,
            summary=summary,
            grid=tables.grid,
            best_index=best,
            scores=tables.scores,
            tp=tables.tp,
            fp=tables.fp,
            positives=int(tables.positive.sum()),
            negatives=tables.n_neg,
            cls_probs=tables.cls.copy(),
            truth_positive=tables.positive,
            min_sensitivity=min_sensitivity,
            max_segmented_share=max_segmented_share,
            per_image_dice=per_image,
            gate_open=gate_open,
        )

    def _open_gate(
        self, best: tuple[int, ...], scores: np.ndarray, allowed: np.ndarray | None, cls: np.ndarray,
        positive: np.ndarray, max_segmented_share: float | None, per_image_at: Any,
    ) -> tuple[dict[str, Any] | None, tuple[int, ...]]:
        """The gate-open rule applied to the best point: (what ``TuneResult.gate_open`` holds, the point to use).

        A gate the verdict condemns is still kept when opening it costs more mean Dice than the validation fold's
        noise (1.96 standard errors of the paired per-image difference): then the gate is doing the work of an
        all-empty answer the segmenter cannot give alone, and the statement says so."""
        gated_cls = self.grid.cls[best[0]]
        negatives = ~positive
        skipped = float(np.mean(cls[negatives] < gated_cls)) if negatives.any() else math.nan
        reason = gate_verdict(roc_auc(cls, positive), skipped)
        if reason is None:
            return None, best
        kept_because = None
        opened = best_point(scores[:1], None if allowed is None else allowed[:1])
        cost = noise = 0.0
        if opened is not None:
            difference = per_image_at(best) - per_image_at(opened)
            cost = float(difference.mean())
            noise = 1.96 * float(difference.std(ddof=1) / math.sqrt(difference.size)) if difference.size > 1 else 0.0
        if max_segmented_share is not None:
            kept_because = f"--max-segmenter-share {max_segmented_share:g} asks for one"
        elif self.grid.cls[0] != 0:
            kept_because = f"the searched cls values start at {self.grid.cls[0]:g}, not 0 (--grid)"
        elif opened is None:  # cannot happen: opening the gate only adds true positives
            kept_because = "no point with the gate open meets --min-sensitivity"
        elif cost > noise:
            kept_because = (
                f"opening it would cost {cost:.4f} mean Dice on the validation images, more than their noise "
                f"(±{noise:.4f}): the segmenter alone draws too many false positives"
            )
        record = {"reason": reason, "applied": kept_because is None, "gated_cls": gated_cls,
                  "gated_score": float(scores[best]), "gated_skipped_negatives": json_float(skipped),
                  "open_cost": cost, "noise": noise}
        if kept_because is not None:
            return {**record, "kept_because": kept_because}, best
        return record, opened


def _fewest_segmented(tables: _Tables, allowed: np.ndarray | None, floor: float) -> tuple[int, ...]:
    """The allowed point scoring at least ``floor`` whose gate sends the fewest images to the segmenter (the best
    score among those gates; ties as :func:`best_point`). The best point itself qualifies, so one always exists."""
    near = tables.scores >= floor - TIE_TOLERANCE
    if allowed is not None:
        near &= allowed
    share = tables.cls_pass.mean(axis=0)
    has = near.reshape(near.shape[0], -1).any(axis=1)
    fewest = has & (share <= share[has].min())
    point = best_point(tables.scores, near & fewest[:, None, None, None, None])
    assert point is not None
    return point


def _progress(items: Iterable[Any], total: int, enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    from cascade.common.progress import progress_bar

    return progress_bar(items, total=total, desc=desc, unit="img")


def _paired(cls_probs: Any, seg_probs: Iterable[Any], masks: Iterable[Any]) -> tuple[np.ndarray, Iterable[Any]]:
    cls = np.asarray(cls_probs, dtype=np.float64).reshape(-1)
    return cls, zip(cls, seg_probs, masks, strict=True)


def tune(
    cls_probs: Any,
    seg_probs: Iterable[np.ndarray],
    masks: Iterable[np.ndarray],
    *,
    grid: Grid | None = None,
    min_sensitivity: float | None = None,
    max_segmented_share: float | None = None,
    open_gate: bool = True,
    dice_tolerance: float = 0.0,
    progress: bool = True,
) -> TuneResult:
    """Search the thresholds that maximise mean Dice (exactly, over ``grid``; default :class:`Grid`).

    ``seg_probs`` and ``masks`` are arrays [N, H, W] or iterables of H x W arrays (consumed once, one image at a
    time, so a generator keeps memory flat); ``cls_probs`` has N entries. With ``min_sensitivity`` the best point
    among those whose image-level sensitivity is at least that value is returned. ``open_gate``: see
    :meth:`ThresholdSearch.result`.
    """
    search = ThresholdSearch(grid)
    cls, pairs = _paired(cls_probs, seg_probs, masks)
    try:
        for p, seg, mask in _progress(pairs, len(cls), progress, "threshold statistics"):
            search.add(p, seg, mask)
    except ValueError as err:
        if isinstance(err, CascadeError) or "zip()" not in str(err):
            raise
        raise CascadeError(f"threshold search: cls_probs, seg_probs and masks differ in length ({err})") from None
    return search.result(min_sensitivity, max_segmented_share, open_gate=open_gate, dice_tolerance=dice_tolerance)


def evaluate_thresholds(
    cls_probs: Any, seg_probs: Iterable[np.ndarray], masks: Iterable[np.ndarray], th: Thresholds
) -> Summary:
    """Score one setting by applying :func:`apply_rule` to every image (the plain reference for the search)."""
    dices, pred_pos, true_pos = [], [], []
    for p, seg, mask in _paired(cls_probs, seg_probs, masks)[1]:
        seg = np.asarray(seg)
        out = apply_rule(p, seg, th, area_scale(*seg.shape))
        truth = np.asarray(mask) != 0
        dices.append(dice(out, truth))
        pred_pos.append(bool(out.any()))
        true_pos.append(bool(truth.any()))
    return summarize(dices, pred_pos, true_pos)
