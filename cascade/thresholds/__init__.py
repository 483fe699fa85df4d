"""Threshold rule, challenge metrics and the exact threshold search (the rule: cascade.thresholds.rule)."""

from __future__ import annotations

from cascade.thresholds.metrics import Confusion, Summary, dice, mean_dice, summarize
from cascade.thresholds.rule import Thresholds, apply_rule, area_scale
from cascade.thresholds.search import Grid, ThresholdSearch, TuneResult, evaluate_thresholds, tune

__all__ = [
    "Confusion",
    "Grid",
    "Summary",
    "ThresholdSearch",
    "Thresholds",
    "TuneResult",
    "apply_rule",
    "area_scale",
    "dice",
    "evaluate_thresholds",
    "mean_dice",
    "summarize",
    "tune",
]
