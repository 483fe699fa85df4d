"""The exact threshold search (`cascade.thresholds.search`) against a brute force over `apply_rule`."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.errors import CascadeError, ConfigError
from cascade.thresholds.rule import FIELDS
from cascade.thresholds.search import Grid, ThresholdSearch, best_point, evaluate_thresholds, gate_verdict, tune

LEVELS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)  # probability values that sit on grid thresholds (ties)
PX = 1024 * 1024 / 256  # one pixel of a 16 x 16 map, in pixels at 1024²


def brute_force(cls, segs, masks, grid):
    """Score every grid point by applying the rule to every image: (scores, tp, fp)."""
    scores = np.zeros(grid.shape)
    tp = np.zeros(grid.shape, np.int64)
    fp = np.zeros(grid.shape, np.int64)
    for index in itertools.product(*(range(n) for n in grid.shape)):
        s = evaluate_thresholds(cls, segs, masks, grid.point(index))
        scores[index], tp[index], fp[index] = s.mean_dice, s.confusion.tp, s.confusion.fp
    return scores, tp, fp


@st.composite
def cases(draw):
    n = draw(st.integers(1, 6))
    segs, masks = [], []
    for _ in range(n):
        h, w = draw(st.sampled_from([(16, 16), (12, 16), (9, 7), (4, 5)]))
        pool = (0.0,) * draw(st.sampled_from([0, 10, 60])) + LEVELS  # from dense maps to a few lit pixels
        seg = np.asarray(draw(st.lists(st.sampled_from(pool), min_size=h * w, max_size=h * w)), np.float32)
        truth = draw(st.sampled_from(["empty", "random", "from_map"]))
        if truth == "empty":
            mask = np.zeros(h * w, bool)
        elif truth == "random":
            mask = np.asarray(draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w)))
        else:
            mask = seg >= 0.5
        segs.append(seg.reshape(h, w))
        masks.append(mask.reshape(h, w))
    cls = draw(st.lists(st.sampled_from((0.0, 0.2, 0.5, 0.8, 1.0)), min_size=n, max_size=n))

    def axis(pool):
        return tuple(sorted(draw(st.sets(st.sampled_from(pool), min_size=1, max_size=3))))

    grid = Grid(
        cls=axis((0.0, 0.2, 0.5, 0.9)),
        top=axis((0.3, 0.5, 0.7, 0.9)),
        area=axis((0.0, PX, 2 * PX, 2.5 * PX, 6 * PX)),
        bottom=axis((0.1, 0.3, 0.5, 0.7)),
        min_component=axis((0.0, 2 * PX, 3.5 * PX, 8 * PX)),
    )
    return cls, segs, masks, grid


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_search_equals_brute_force(case) -> None:
    cls, segs, masks, grid = case
    result = tune(cls, segs, masks, grid=grid, open_gate=False, progress=False)  # the plain search
    scores, tp, fp = brute_force(cls, segs, masks, grid)
    np.testing.assert_allclose(result.scores, scores, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(result.tp, tp)
    np.testing.assert_array_equal(result.fp, fp)
    assert result.best_index == best_point(scores)
    assert result.score == pytest.approx(scores.max(), abs=1e-12)
    reference = evaluate_thresholds(cls, segs, masks, result.thresholds)
    assert result.summary.confusion == reference.confusion
    assert result.dice_positive == pytest.approx(reference.dice_positive, nan_ok=True)


def _synthetic(n=24, size=32, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    segs = rng.random((n, size, size)).astype(np.float32) * 0.35
    for i in range(0, n, 2):
        r, c = rng.integers(0, size - 10, 2)
        masks[i, r : r + 8, c : c + 6] = True
        segs[i, r : r + 8, c : c + 6] = rng.uniform(0.4, 1.0, (8, 6))
    segs[1, 3:6, 3:6] = 0.95  # a confident false positive
    cls = np.where(masks.any(axis=(1, 2)), rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 0.7, n))
    return cls, segs, masks


SMALL_GRID = Grid(
    cls=(0.0, 0.25, 0.5, 0.75),
    top=(0.5, 0.8),
    area=(0, 2048, 8192),
    bottom=(0.2, 0.4, 0.6),
    min_component=(0, 4096, 16384),
)


def test_closed_gate_gives_the_empty_baseline() -> None:
    cls, segs, masks = _synthetic()
    grid = Grid(cls=(1.0,), top=(0.5,), area=(0,), bottom=(0.3,), min_component=(0,))
    result = tune(np.minimum(cls, 0.99), segs, masks, grid=grid, progress=False)
    negatives = int((~masks.any(axis=(1, 2))).sum())
    assert result.baseline == negatives / len(cls)
    assert result.score == result.baseline
    assert result.confusion.tp == 0 and result.confusion.fp == 0


def test_all_negative_maps_tie_and_the_middle_gate_wins() -> None:
    segs = np.zeros((3, 8, 8), np.float32)
    result = tune([0.9, 0.1, 0.5], segs, np.zeros_like(segs, bool), grid=SMALL_GRID, progress=False)
    assert result.score == 1.0 and (result.scores == 1.0).all()
    middle = (len(SMALL_GRID.cls) - 1) // 2
    assert result.best_index == (middle, 0, 0, 0, 0)
    assert result.thresholds == SMALL_GRID.point((middle, 0, 0, 0, 0))


def test_a_tied_range_of_gates_gives_its_middle_and_never_a_lower_score() -> None:
    scores = np.zeros((6, 1, 1, 2, 1))
    scores[1:5, 0, 0, 1, 0] = 0.8  # gates 1..4 tie at the best score, at bottom index 1
    scores[5, 0, 0, 0, 0] = 0.7
    assert best_point(scores) == (2, 0, 0, 1, 0)
    assert best_point(scores, allowed=scores < 0.75) == (5, 0, 0, 0, 0)


def test_streamed_input_gives_the_same_result_as_arrays() -> None:
    cls, segs, masks = _synthetic()
    arrays = tune(cls, segs, masks, grid=SMALL_GRID, progress=False)
    streamed = tune(list(cls), (s for s in segs), (m for m in masks), grid=SMALL_GRID, progress=False)
    assert streamed.thresholds == arrays.thresholds and streamed.score == arrays.score
    np.testing.assert_array_equal(streamed.scores, arrays.scores)


def test_constrained_mode_meets_its_sensitivity() -> None:
    cls, segs, masks = _synthetic()
    free = tune(cls, segs, masks, grid=SMALL_GRID, progress=False)
    constrained = tune(cls, segs, masks, grid=SMALL_GRID, min_sensitivity=1.0, progress=False)
    assert constrained.summary.sensitivity == 1.0
    assert constrained.score <= free.score
    sens = free.sensitivity_table
    assert constrained.score == pytest.approx(free.scores[sens >= 1.0].max(), abs=1e-12)
    ops = free.operating_points([0.5, 1.0])
    assert ops[1]["mean_dice"] == pytest.approx(constrained.score, abs=1e-12)
    assert ops[1]["sensitivity"] == 1.0


def test_unreachable_sensitivity_is_a_clear_error() -> None:
    cls, segs, masks = _synthetic()
    with pytest.raises(CascadeError, match="no grid point reaches sensitivity 1.0"):
        tune(np.zeros_like(cls), segs, masks, grid=Grid(cls=(0.5,)), min_sensitivity=1.0, progress=False)
    with pytest.raises(CascadeError, match="needs positive images"):
        tune([0.5], np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), min_sensitivity=0.5, progress=False)


def test_bad_inputs() -> None:
    with pytest.raises(CascadeError, match="differ in length"):
        tune([0.5, 0.5], np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), progress=False)
    with pytest.raises(CascadeError, match="image 0: truth mask shape"):
        tune([0.5], np.zeros((1, 4, 4)), np.zeros((1, 4, 5)), progress=False)
    with pytest.raises(CascadeError, match="no images"):
        ThresholdSearch().result()
    with pytest.raises(ConfigError, match="strictly increasing"):
        Grid(cls=(0.5, 0.2))
    with pytest.raises(ConfigError, match="'top' must lie in"):
        Grid(top=(0.5, 1.5))
    with pytest.raises(ConfigError, match="unknown key"):
        Grid.from_dict({"clss": [0.5]})


def test_default_grid_and_result_report_dict() -> None:
    assert Grid().size >= 10_000 and Grid().shape == (30, 14, 8, 13, 4)
    assert Grid.from_dict(Grid().to_dict()) == Grid()
    cls, segs, masks = _synthetic(n=10)
    result = tune(cls, segs, masks, progress=False)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data["thresholds"]) == set(FIELDS)
    assert data["score"] >= data["baseline_empty"] == pytest.approx(0.5)
    best = data["breakdown"]["cls"]
    assert max(best["mean_dice"]) == pytest.approx(data["score"], abs=1e-12)
    assert len(data["cls_bottom"]["mean_dice"]) == len(Grid().cls)


def test_separate_pixels_as_many_as_min_component_are_all_removed() -> None:
    seg = np.zeros((1, 16, 16), np.float32)
    seg[0, 2, 2] = seg[0, 9, 9] = 0.9  # two 1-pixel components: 2 pixels in all, none of them 2 pixels big
    grid = Grid(cls=(0.0,), top=(0.5,), area=(0,), bottom=(0.5,), min_component=(0, 2 * PX))
    result = tune([1.0], seg, seg > 0, grid=grid, progress=False)
    assert result.scores.ravel().tolist() == [1.0, 0.0]
    np.testing.assert_array_equal(result.scores, brute_force([1.0], seg, seg > 0, grid)[0])


def test_warnings_name_a_small_fold_with_its_uncertainty_and_a_near_chance_classifier() -> None:
    cls, segs, masks = _synthetic()  # 24 images, 12 positive: under the 50 a user should trust
    result = tune(cls, segs, masks, grid=SMALL_GRID, progress=False)
    small = [w for w in result.warnings() if "too few" in w]
    assert len(small) == 1 and "24 images, 12 positive" in small[0]
    per_image = result.per_image_dice
    assert per_image is not None and per_image.mean() == pytest.approx(result.score, abs=1e-12)
    expected = 1.96 * per_image.std(ddof=1) / np.sqrt(per_image.size)
    assert f"±{expected:.4f}" in small[0]
    assert not any("near chance" in w for w in result.warnings())
    shuffled = tune(np.random.default_rng(1).permutation(np.linspace(0, 1, 24)), segs, masks, grid=SMALL_GRID,
                    open_gate=False, progress=False)
    assert shuffled.classifier_auc < 0.6
    assert any("near chance" in w for w in shuffled.warnings())
    big_cls, big_segs, big_masks = _synthetic(n=60)
    assert not any("too few" in w for w in tune(big_cls, big_segs, big_masks, grid=SMALL_GRID,
                                                 progress=False).warnings())


def test_warnings_name_a_best_point_on_the_edge_of_a_searched_range_but_not_at_natural_bounds() -> None:
    cls, segs, masks = _synthetic()
    wide = tune(cls, segs, masks, grid=SMALL_GRID, progress=False)
    assert wide.thresholds.bottom == 0.4  # inside its range (0.2..0.6): no edge warning for bottom
    assert not any("best bottom" in w for w in wide.warnings())
    narrow = tune(cls, segs, masks, grid=Grid(cls=SMALL_GRID.cls, top=SMALL_GRID.top, area=SMALL_GRID.area,
                                              min_component=(0,), bottom=(0.6, 0.7)), progress=False)
    assert narrow.thresholds.bottom == 0.6
    edge = [w for w in narrow.warnings() if "best bottom" in w]
    assert edge == ["the best bottom (0.6) is the lowest value searched (0.6..0.7): the optimum may lie beyond it; "
                    "widen the range with --grid (a YAML file: bottom: [values])"]
    off = tune(cls, segs, masks, grid=Grid(cls=(0.0, 0.5), top=(0.5,), area=(0, 100), bottom=(0.4,),
                                           min_component=(0, 10)), progress=False)
    assert not any(f"best {name} (0)" in w for w in off.warnings() for name in ("cls", "area", "min_component"))


def test_read_grid_replaces_the_named_ranges_and_refuses_bad_files(tmp_path) -> None:
    from cascade.thresholds.search import read_grid

    good = tmp_path / "grid.yaml"
    good.write_text("bottom: [0.05, 0.1, 0.8]\ncls: [0.0, 0.99]\n")
    grid = read_grid(good)
    assert grid.bottom == (0.05, 0.1, 0.8) and grid.cls == (0.0, 0.99) and grid.top == Grid().top
    for text, message in [("bogus: [1]\n", "unknown threshold"), ("bottom: [0.5, 0.2]\n", "strictly increasing"),
                          ("- 1\n", "maps threshold names"), ("bottom: [\n", "not a readable YAML")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_grid(bad)
    with pytest.raises(ConfigError, match="no such grid file"):
        read_grid(tmp_path / "absent.yaml")


def test_frontier_is_the_best_score_per_gate_and_the_share_it_segments() -> None:
    cls, segs, masks = _synthetic()
    result = tune(cls, segs, masks, grid=SMALL_GRID, progress=False)
    negatives = ~masks.any(axis=(1, 2))
    for c, row in enumerate(result.frontier()):
        gate = SMALL_GRID.cls[c]
        assert row["cls"] == gate
        assert row["segmented_share"] == pytest.approx(np.mean(cls >= gate))
        assert row["skipped_negatives"] == pytest.approx(np.mean(cls[negatives] < gate))
        assert row["mean_dice"] == pytest.approx(result.scores[c].max(), abs=1e-12)
    assert result.segmented_share == pytest.approx(np.mean(cls >= result.thresholds.cls))


def test_max_segmented_share_is_met_at_the_best_allowed_score() -> None:
    cls, segs, masks = _synthetic()
    free = tune(cls, segs, masks, grid=SMALL_GRID, progress=False)
    shares = np.array([np.mean(cls >= g) for g in SMALL_GRID.cls])
    limit = float(np.sort(shares)[1])  # the second-smallest share: only the highest gates qualify
    fast = tune(cls, segs, masks, grid=SMALL_GRID, max_segmented_share=limit, progress=False)
    assert fast.segmented_share <= limit
    allowed = shares <= limit
    assert fast.score == pytest.approx(free.scores[allowed].max(), abs=1e-12)
    assert fast.score <= free.score
    with pytest.raises(CascadeError, match="no searched gate sends at most 0.01 of the images"):
        tune(cls, segs, masks, grid=Grid(cls=(0.0,)), max_segmented_share=0.01, progress=False)


def _card(result) -> str:
    """MODEL_CARD.md as ``cascade tune`` writes it for this search result (validation metrics of a fold-0 pair)."""
    from types import SimpleNamespace

    from cascade.storage import model_card
    from cascade.training.tuning import validation_metrics

    run = SimpleNamespace(fold=0, folds=5, fingerprint="0" * 64)
    metrics = validation_metrics(result, pairs=[(run, run)], images_per_fold=[len(result.cls_probs)], tta=False,
                                 failed=0)
    manifest = {"metrics": metrics, "thresholds": result.thresholds.to_dict(), "tta": {"hflip": False},
                "preprocessing": {"classifier": {"size": 64}, "segmenter": {"size": 64}}}
    return model_card.render(manifest, {"classifier": [{"stage": "cls"}], "segmenter": [{"stage": "seg"}]})


def test_a_random_classifier_opens_the_gate_and_the_report_and_model_card_say_so() -> None:
    cls, segs, masks = _synthetic(n=60)
    segs[~masks.any(axis=(1, 2)), 10:20, 10:20] = 0.9  # confident false positives: skipping at random scores higher
    random_cls = np.random.default_rng(0).random(len(cls))  # a classifier that learned nothing
    gated = tune(random_cls, segs, masks, grid=SMALL_GRID, open_gate=False, progress=False)
    assert gated.thresholds.cls > 0 and gated.score > gated.scores[0].max()  # the plain search keeps a random gate
    result = tune(random_cls, segs, masks, grid=SMALL_GRID, progress=False)
    assert result.classifier_auc < 0.6
    assert result.thresholds.cls == 0.0 and result.segmented_share == 1.0 and result.skipped_negatives == 0.0
    assert result.score == pytest.approx(result.scores[0].max(), abs=1e-12)  # the best point with the gate open
    reference = evaluate_thresholds(random_cls, segs, masks, result.thresholds)
    assert result.summary.confusion == reference.confusion and result.score == pytest.approx(reference.mean_dice)
    statement = result.gate_statement
    assert statement.startswith(f"gate open: the classifier does not separate the classes "
                                f"(AUC {result.classifier_auc:.3f}, below 0.6); ")
    assert statement.endswith("the segmenter runs on every image")
    assert f"the best gate, cls {gated.thresholds.cls:g}, scored mean Dice {gated.score:.4f}" in statement
    assert not any("near chance" in w for w in result.warnings())  # the statement replaces the warning
    data = json.loads(json.dumps(result.to_dict()))
    assert data["gate_open"]["statement"] == statement and data["gate_open"]["applied"] is True
    assert data["thresholds"]["cls"] == 0.0
    assert f"- **{statement}**" in _card(result)


def test_a_separating_classifier_keeps_its_gate_and_no_statement() -> None:
    cls, segs, masks = _synthetic(n=60)
    negatives = ~masks.any(axis=(1, 2))
    segs[negatives, 10:20, 10:20] = 0.9  # the segmenter draws a confident lesion on every negative: only a gate helps
    result = tune(cls, segs, masks, grid=SMALL_GRID, progress=False)
    assert result.classifier_auc > 0.8 and result.skipped_negatives >= 0.05
    assert result.thresholds.cls > 0 and result.gate_open is None and result.gate_statement is None
    assert result.to_dict()["gate_open"] is None
    card = _card(result)
    assert "gate open" not in card and "does not separate" not in card


def test_a_requested_segmenter_share_keeps_a_random_gate_and_says_why() -> None:
    cls, segs, masks = _synthetic(n=60)
    random_cls = np.random.default_rng(7).random(len(cls))
    result = tune(random_cls, segs, masks, grid=SMALL_GRID, max_segmented_share=0.8, progress=False)
    assert result.segmented_share <= 0.8 and result.thresholds.cls > 0
    assert result.gate_open is not None and result.gate_open["applied"] is False
    assert result.gate_statement.startswith("the classifier does not separate the classes (AUC ")
    assert "kept only because --max-segmenter-share 0.8 asks for one" in result.gate_statement


def test_the_gate_open_rule() -> None:
    assert gate_verdict(0.59, 0.5).startswith("the classifier does not separate the classes (AUC 0.590")
    assert gate_verdict(0.9, 0.049).startswith("the gate does not pay: the best one keeps only 4.9% of the")
    assert gate_verdict(0.6, 0.05) is None and gate_verdict(0.95, 0.6) is None
    cls, segs, masks = _synthetic(n=60)  # a perfect segmenter: the classifier separates, but no gate is needed
    result = tune(cls, segs, masks, grid=SMALL_GRID, progress=False)
    assert result.classifier_auc > 0.8 and result.thresholds.cls == 0.0 and result.gate_open["applied"]
    assert result.gate_statement == (
        f"gate open: the gate does not pay: the best one keeps only 0.0% of the validation negatives from the "
        f"segmenter, under 5% (classifier AUC {result.classifier_auc:.3f}); cls is 0: the segmenter runs on every "
        "image"
    )
    assert gate_verdict(float("nan"), 0.5) is None and gate_verdict(0.5, float("nan")) is None  # one class only


def test_a_random_gate_doing_the_work_of_an_empty_answer_is_kept_and_the_statement_says_why() -> None:
    cls, segs, masks = _synthetic(n=60)
    negatives = ~masks.any(axis=(1, 2))
    segs[:] = 0.0
    segs[negatives, 10:20, 10:20] = 0.9  # a segmenter that misses every lesion and draws on every negative
    result = tune(np.random.default_rng(0).random(len(cls)), segs, masks, grid=SMALL_GRID, progress=False)
    assert result.classifier_auc < 0.6 and result.thresholds.cls > 0
    g = result.gate_open
    assert g is not None and g["applied"] is False and g["open_cost"] > g["noise"] > 0
    assert result.score == pytest.approx(g["gated_score"]) and result.score > result.scores[0].max()
    assert result.gate_statement.startswith("the classifier does not separate the classes (AUC ")
    assert f"is kept only because opening it would cost {g['open_cost']:.4f} mean Dice" in result.gate_statement


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases(), st.sampled_from([0.0, 0.005, 0.05, 0.3]))
def test_dice_tolerance_picks_the_fewest_segmented_gate_within_it_by_brute_force(case, tolerance) -> None:
    """Among the points within ``tolerance`` of the best mean Dice, the chosen one sends the fewest images to the
    segmenter, and is the best scoring of those (tolerance 0: the best point itself)."""
    cls, segs, masks, grid = case
    result = tune(cls, segs, masks, grid=grid, open_gate=False, dice_tolerance=tolerance, progress=False)
    scores, _, _ = brute_force(cls, segs, masks, grid)
    share = np.array([np.mean(np.asarray(cls) >= c) for c in grid.cls])
    near = scores >= scores.max() - tolerance - 1e-12
    fewest = share[near.reshape(len(grid.cls), -1).any(axis=1)].min()
    assert result.best_score == pytest.approx(scores.max(), abs=1e-12)
    assert result.score >= scores.max() - tolerance - 1e-9
    assert result.segmented_share == pytest.approx(fewest)
    allowed = near & (share <= fewest)[:, None, None, None, None]
    assert result.score == pytest.approx(np.where(allowed, scores, -np.inf).max(), abs=1e-12)
    if tolerance == 0.0:
        assert result.best_index == best_point(scores)


def test_a_separating_gate_within_the_tolerance_skips_negatives_an_open_one_would_segment() -> None:
    """The seed-1 case of issue 24: the best mean Dice is reached with the gate open (the area rule already clears
    the negatives), but a gate costing under 0.005 keeps most negatives from the segmenter: ``tune``'s default
    takes it, and the result records the best score and the tolerance."""
    cls, segs, masks = _synthetic(n=200, seed=3)
    positive = masks.any(axis=(1, 2))
    segs[~positive] = np.minimum(segs[~positive], 0.3)  # the segmenter alone already draws nothing on negatives
    cls = np.where(positive, np.linspace(0.6, 1.0, 200), np.linspace(0.0, 0.65, 200))
    grid = Grid(cls=(0.0, 0.2, 0.4, 0.55, 0.7), top=(0.5,), area=(0,), bottom=(0.4,), min_component=(0,))
    best = tune(cls, segs, masks, grid=grid, dice_tolerance=0.0, progress=False)
    fast = tune(cls, segs, masks, grid=grid, dice_tolerance=0.005, progress=False)
    assert fast.segmented_share < best.segmented_share and fast.skipped_negatives >= 0.5
    assert fast.score >= best.score - 0.005 and fast.best_score == best.score
    assert fast.to_dict()["dice_tolerance"] == 0.005 and fast.gate_open is None
