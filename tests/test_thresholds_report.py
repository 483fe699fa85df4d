"""Tune report files (`cascade.thresholds.report`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from cascade.thresholds.report import write_tune_report
from cascade.thresholds.search import Grid, tune


def test_tune_report_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((12, 32, 32), bool)
    masks[::3, 5:15, 5:12] = True
    segs = (masks * 0.7 + rng.random(masks.shape) * 0.3).astype(np.float32)
    cls = masks.any(axis=(1, 2)) * 0.4 + rng.random(12) * 0.6
    grid = Grid(cls=(0.0, 0.3, 0.6), top=(0.5, 0.8), area=(0, 4096), bottom=(0.3, 0.5), min_component=(0, 2048))
    result = tune(cls, segs, masks, grid=grid, progress=False)
    paths = write_tune_report(result, tmp_path / "report")
    names = {p.name for p in paths}
    assert {"tune.json", "dice_cls_bottom.png", "dice_by_threshold.png", "confusion.png", "roc.png"} <= names
    for p in paths:
        assert p.stat().st_size > 100, p
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "report" / "tune.json").read_text())
    assert data["thresholds"] == result.thresholds.to_dict() and data["score"] == result.score
    rows = list(csv.DictReader((tmp_path / "report" / "operating_points.csv").open()))
    assert len(rows) == len(result.operating_points()) and "mean_dice" in rows[0]
    assert not list((tmp_path / "report").glob(".*.tmp")), "no temporary files left behind"
