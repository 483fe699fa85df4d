"""The decision rule (`cascade.thresholds.rule`) and the metrics (`cascade.thresholds.metrics`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cascade.errors import ConfigError
from cascade.thresholds.metrics import (
    Confusion,
    confusion,
    dice,
    mean_dice,
    roc_auc,
    sensitivity,
    specificity,
    summarize,
)
from cascade.thresholds.rule import Thresholds, apply_rule, area_scale

TH = dict(cls=0.5, top=0.8, area=0, bottom=0.4, min_component=0)


def test_thresholds_round_trip_and_validation() -> None:
    th = Thresholds(cls=0.5, top=0.75, area=2000, bottom=0.3, min_component=256)
    assert Thresholds.from_dict(json.loads(json.dumps(th.to_dict()))) == th
    with pytest.raises(ConfigError, match="model/cascade.json: thresholds: missing top"):
        Thresholds.from_dict({k: v for k, v in th.to_dict().items() if k != "top"}, where="model/cascade.json")
    with pytest.raises(ConfigError, match="unknown colour"):
        Thresholds.from_dict({**th.to_dict(), "colour": 1})
    with pytest.raises(ConfigError, match="'cls' must lie in"):
        Thresholds.from_dict({**th.to_dict(), "cls": 1.5})
    with pytest.raises(ConfigError, match="'area'"):
        Thresholds(**{**TH, "area": -1})
    with pytest.raises(ConfigError, match="must be a number"):
        Thresholds(**{**TH, "bottom": True})
    with pytest.raises(ConfigError, match="finite"):
        Thresholds(**{**TH, "top": math.nan})


def test_describe_names_every_field_once_with_its_unit() -> None:
    th = Thresholds(cls=0.45, top=0.6, area=256, bottom=0.3, min_component=1024)
    assert th.describe() == "cls 0.45, top 0.6, area 256 px, bottom 0.3, min_component 1024 px (areas at 1024²)"
    assert th.describe(code=True).startswith("`cls` 0.45, `top` 0.6, `area` 256 px, ")


def test_area_scale() -> None:
    assert area_scale(1024, 1024) == 1.0
    assert area_scale(512, 512) == 0.25
    assert area_scale(256, 512) == 0.125


def test_apply_rule_gates_and_mask() -> None:
    seg = np.zeros((8, 8), np.float32)
    seg[1:3, 1:3] = 0.9  # 4 pixels above top
    seg[5, 5] = 0.5  # above bottom only
    th = Thresholds(**TH)
    out = apply_rule(0.6, seg, th)
    assert out.dtype == bool and out.sum() == 5
    assert not apply_rule(0.49, seg, th).any(), "classifier gate closed"
    assert apply_rule(0.6, seg, Thresholds(**{**TH, "area": 4})).sum() == 5
    assert not apply_rule(0.6, seg, Thresholds(**{**TH, "area": 5})).any(), "too few pixels above top"
    assert apply_rule(0.6, seg, Thresholds(**{**TH, "top": 0.95})).sum() == 5, "area 0 passes any map"
    assert not apply_rule(0.6, seg, Thresholds(**{**TH, "top": 0.95, "area": 1})).any()


def test_apply_rule_scales_areas_with_the_map() -> None:
    seg = np.zeros((512, 512), np.float32)
    seg[:10, :10] = 0.9  # 100 pixels on a 512² map = 400 at 1024²
    th = Thresholds(**{**TH, "area": 400})
    assert apply_rule(1.0, seg, th, area_scale(512, 512)).sum() == 100
    assert not apply_rule(1.0, seg, Thresholds(**{**TH, "area": 401}), area_scale(512, 512)).any()
    assert apply_rule(1.0, seg, Thresholds(**{**TH, "min_component": 400}), area_scale(512, 512)).sum() == 100
    assert not apply_rule(1.0, seg, Thresholds(**{**TH, "min_component": 401}), area_scale(512, 512)).any()


def test_min_component_uses_8_connectivity() -> None:
    seg = np.zeros((6, 6), np.float32)
    seg[0, 0] = seg[1, 1] = seg[2, 2] = 0.9  # a diagonal line: one 3-pixel component with 8-connectivity
    seg[5, 5] = 0.9  # isolated
    out = apply_rule(1.0, seg, Thresholds(**{**TH, "min_component": 3}))
    assert out.sum() == 3 and out[1, 1] and not out[5, 5]
    assert not apply_rule(1.0, seg, Thresholds(**{**TH, "min_component": 4})).any()


def test_pixels_on_a_threshold_count_in_float32() -> None:
    seg = np.full((4, 4), np.float32(0.7))  # float32(0.7) < 0.7 in float64
    th = Thresholds(cls=0.7, top=0.7, area=16, bottom=0.7, min_component=0)
    assert apply_rule(0.7, seg, th).all()
    assert not apply_rule(0.6999, seg, th).any()


def test_dice_challenge_convention() -> None:
    empty = np.zeros((4, 4), bool)
    one = empty.copy()
    one[0, 0] = True
    assert dice(empty, empty) == 1.0
    assert dice(one, empty) == 0.0
    assert dice(empty, one) == 0.0
    assert dice(one, one) == 1.0
    two = one.copy()
    two[0, 1] = True
    assert dice(one, two) == pytest.approx(2 * 1 / 3)
    assert dice(one.astype(np.uint8) * 255, two) == pytest.approx(2 / 3)
    assert mean_dice([empty, one], [empty, two]) == pytest.approx((1 + 2 / 3) / 2)


def test_confusion_and_rates() -> None:
    c = confusion([True, True, False, False, True], [True, False, True, False, True])
    assert c == Confusion(tp=2, fp=1, fn=1, tn=1)
    assert sensitivity(c) == pytest.approx(2 / 3)
    assert specificity(c) == pytest.approx(1 / 2)
    assert math.isnan(sensitivity(Confusion(0, 1, 0, 3)))


def test_roc_auc() -> None:
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert math.isnan(roc_auc([0.1, 0.2], [True, True]))


def test_summarize_dice_on_true_positives_only() -> None:
    s = summarize([1.0, 0.5, 0.0, 0.0], [False, True, True, False], [False, True, False, True])
    assert s.mean_dice == pytest.approx(0.375)
    assert s.dice_positive == pytest.approx(0.5)
    assert s.confusion == Confusion(tp=1, fp=1, fn=1, tn=1)
    d = s.to_dict()
    assert d["sensitivity"] == 0.5 and d["images"] == 4
    assert summarize([1.0], [False], [False]).to_dict()["dice_positive"] is None
