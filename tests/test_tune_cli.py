"""`cascade tune` on two tiny real runs: a complete MODEL_DIR whose thresholds and scores can be re-derived.

The synthetic images are 96² while the tiny networks run at 64², so the native-resolution convention (maps resized
to the image, areas rescaled) is exercised, not hidden by equal sizes.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cascade import Cascade
from cascade.cli.main import main
from cascade.data.labels import read_labels
from cascade.data.splits import read_split_csv, split_fingerprint, write_split_csv
from cascade.inference.pipeline import predict_probabilities
from cascade.inference.runtime import Runtime
from cascade.stages.checkpoint import sha256_file
from cascade.storage.modeldir import read_model_dir
from cascade.thresholds import Summary, dice, summarize, tune

CONFIGS = Path(__file__).resolve().parents[1] / "cascade" / "configs"
SIZE = 96
REPORT_FILES = (
    "tune.json", "validation.json", "operating_points.csv", "dice_cls_bottom.png", "dice_by_threshold.png",
    "confusion.png", "roc.png", "operating_points.png", "frontier.csv", "frontier.png",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Synthetic data and a classifier and a segmenter run on the same split (4 epochs each)."""
    from cascade.data.synth import generate

    root = tmp_path_factory.mktemp("tune")
    generate(root / "synth", images=64, positive_fraction=0.5, size=SIZE, seed=3, difficulty="easy", progress=False)
    torch.set_num_threads(1)
    for stage in ("cls", "seg"):
        assert main([
            "train", "--stage", stage, "--images", str(root / "synth" / "dicom-images-train"),
            "--labels", str(root / "synth" / "train-rle.csv"), "--out", str(root / stage),
            "--config", str(CONFIGS / f"tiny-{stage}.yaml"), "--cache-dir", str(root / "cache"),
            "--epochs", "4", "--quiet",
        ]) == 0
    return root


def tune_cli(runs: Path, out: Path, *extra: str, cls: Path | None = None, seg: Path | None = None) -> int:
    return main([
        "tune", "--cls", str(cls or runs / "cls"), "--seg", str(seg or runs / "seg"), "--out", str(out),
        "--workers", "0", "--batch-size", "8", "--quiet", *extra,
    ])


@pytest.fixture(scope="module")
def tuned(runs: Path) -> tuple[Path, str]:
    """The model folder tuned on the two runs, and what ``cascade tune`` printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert tune_cli(runs, runs / "model") == 0
    return runs / "model", printed.getvalue()


@pytest.fixture(scope="module")
def model(tuned: tuple[Path, str]) -> Path:
    return tuned[0]


def validation(runs: Path) -> tuple[list[str], list[Path]]:
    """The validation fold's ids and paths, found independently of cascade.training.tuning."""
    split = read_split_csv(runs / "cls" / "split.csv")
    fold = json.loads((runs / "cls" / "best" / "config.json").read_text())["fold"]
    ids = sorted(i for i, f in split.folds.items() if f == fold)
    paths = {p.stem: p for p in (runs / "synth" / "dicom-images-train").rglob("*.dcm")}
    return ids, [paths[i] for i in ids]


def manifest(model: Path) -> dict:
    return json.loads((model / "cascade.json").read_text())


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("cascade tune: error: "), lines
    return lines[-1]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("state.pt", "last"))
    return dst


def test_writes_a_complete_model_folder_that_loads(runs: Path, tuned: tuple[Path, str]) -> None:
    model, out = tuned
    info = read_model_dir(model)  # verifies schema, every sha256, stages and preprocessing
    for stage in ("cls", "seg"):
        folder = model / ("classifier" if stage == "cls" else "segmenter")
        assert sha256_file(folder / "model.safetensors") == sha256_file(runs / stage / "best" / "model.safetensors")
    data = manifest(model)
    ids, _ = validation(runs)
    v = data["metrics"]["validation"]
    assert v["images"] == len(ids) and v["resolution"] == "native" and v["tta"] is False
    assert v["fold"] == 0 and v["folds"] == 4 and "out_of_fold" not in v  # the single-pair record is unchanged
    assert v["positives"] == sum(read_labels(runs / "synth" / "train-rle.csv").is_positive(i) for i in ids)
    assert data["preprocessing"]["segmenter"] == {"size": 64, "mean": 0.5, "std": 0.25}
    assert data["precision"] == v["precision"] == Runtime.resolve("cpu").precision  # what auto ran
    assert set(data["versions"]) == {"cascade", "torch", "timm", "smp"}
    assert sorted(data["report"]) == sorted(f"report/{name}" for name in REPORT_FILES)
    for name in REPORT_FILES:
        assert (model / "report" / name).stat().st_size > 0, name
    assert json.loads((model / "report" / "tune.json").read_text())["thresholds"] == data["thresholds"]
    assert Cascade.from_pretrained(model, device="cpu").thresholds == info.thresholds
    assert f"validation fold 0 of 4: {v['images']} images, {v['positives']} positive" in out
    assert f"mean Dice {v['mean_dice']:.4f} (all-empty baseline {v['baseline_empty']:.4f})" in out
    assert "to the segmenter" in out and str(model / "report") in out
    assert not [p for p in runs.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_thresholds_are_what_tune_finds_on_the_same_maps(runs: Path, model: Path) -> None:
    ids, paths = validation(runs)
    labels = read_labels(runs / "synth" / "train-rle.csv")
    probs = list(predict_probabilities([runs / "cls" / "best"], [runs / "seg" / "best"], paths, workers=0,
                                       runtime=Runtime.resolve("cpu")))
    assert [p.image_id for p in probs] == ids
    maps = [cv2.resize(p.seg_prob, (p.width, p.height), interpolation=cv2.INTER_LINEAR) for p in probs]
    masks = [labels.mask(i, SIZE, SIZE) for i in ids]
    result = tune([p.cls_prob for p in probs], maps, masks, progress=False)
    data = manifest(model)
    assert data["thresholds"] == result.thresholds.to_dict()
    assert data["metrics"]["validation"]["mean_dice"] == pytest.approx(result.score, abs=1e-12)
    assert data["metrics"]["validation"]["confusion"] == result.confusion.to_dict()


def rescore(runs: Path, model: Path) -> tuple[Summary, float]:
    """Cascade.predict one validation image at a time (masks at native size) against the truth; and the share of
    images whose classifier probability opens the gate."""
    ids, paths = validation(runs)
    labels = read_labels(runs / "synth" / "train-rle.csv")
    cascade = Cascade.from_pretrained(model, device="cpu")
    preds = [cascade.predict(p) for p in paths]
    truths = [labels.mask(i, SIZE, SIZE) for i in ids]
    assert all(p.mask.shape == (SIZE, SIZE) for p in preds)
    summary = summarize([dice(p.mask, t) for p, t in zip(preds, truths)], [p.positive for p in preds],
                        [t.any() for t in truths])
    return summary, float(np.mean([p.probability >= cascade.thresholds.cls for p in preds]))


def test_reported_scores_equal_a_rescore_with_cascade_predict(runs: Path, model: Path) -> None:
    summary, gated = rescore(runs, model)
    v = manifest(model)["metrics"]["validation"]
    assert v["mean_dice"] == pytest.approx(summary.mean_dice, abs=1e-12)
    assert v["confusion"] == summary.confusion.to_dict()
    assert v["segmented_share"] == pytest.approx(gated)


def test_flip_tta_is_tuned_with_and_recorded_for_predict(runs: Path, tmp_path: Path) -> None:
    assert tune_cli(runs, tmp_path / "m", "--tta") == 0
    data = manifest(tmp_path / "m")
    assert data["tta"] == {"hflip": True} and data["metrics"]["validation"]["tta"] is True
    summary, _ = rescore(runs, tmp_path / "m")  # from_pretrained takes TTA from cascade.json
    assert data["metrics"]["validation"]["mean_dice"] == pytest.approx(summary.mean_dice, abs=1e-12)
    assert data["metrics"]["validation"]["confusion"] == summary.confusion.to_dict()


def test_runs_on_different_folds_or_splits_are_refused(runs: Path, tmp_path: Path, capsys) -> None:
    other_fold = copy_run(runs / "cls", tmp_path / "cls-fold1")
    config = json.loads((other_fold / "best" / "config.json").read_text())
    (other_fold / "best" / "config.json").write_text(json.dumps({**config, "fold": 1}))
    assert tune_cli(runs, tmp_path / "m1", cls=other_fold) == 2
    assert "validate on different folds (1 and 0)" in error_line(capsys)

    other_split = copy_run(runs / "seg", tmp_path / "seg-split")
    split = read_split_csv(other_split / "split.csv")
    folds = {i: (f + 1) % 4 for i, f in split.folds.items()}
    write_split_csv(other_split / "split.csv", folds, split.positive)
    config = json.loads((other_split / "best" / "config.json").read_text())
    config["split_fingerprint"] = split_fingerprint(folds)
    (other_split / "best" / "config.json").write_text(json.dumps(config))
    assert tune_cli(runs, tmp_path / "m2", seg=other_split) == 2
    assert "trained on different splits" in error_line(capsys)
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_wrong_stage_missing_best_and_bad_out_are_refused(runs: Path, tmp_path: Path, capsys) -> None:
    assert tune_cli(runs, tmp_path / "m", cls=runs / "seg") == 2
    assert "this is a segmenter run, but --cls needs a classifier run" in error_line(capsys)
    assert tune_cli(runs, tmp_path / "m", seg=runs / "cls") == 2
    assert "this is a classifier run, but --seg needs a segmenter run" in error_line(capsys)
    no_best = copy_run(runs / "seg", tmp_path / "no-best")
    shutil.rmtree(no_best / "best")
    assert tune_cli(runs, tmp_path / "m", seg=no_best) == 2
    assert f"{no_best / 'best'}: missing" in error_line(capsys)
    assert tune_cli(runs, tmp_path / "m", cls=tmp_path / "absent") == 2
    assert "no such run folder" in error_line(capsys)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert tune_cli(runs, precious) == 2
    assert "refusing to replace it" in error_line(capsys)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "m").exists()


def test_min_sensitivity_is_met_with_explicit_data_paths(runs: Path, model: Path, tmp_path: Path, capsys) -> None:
    """Runs without data.json need --images/--labels; the constrained search meets its sensitivity."""
    cls, seg = (copy_run(runs / s, tmp_path / s) for s in ("cls", "seg"))
    (cls / "data.json").unlink()
    (seg / "data.json").unlink()
    assert tune_cli(runs, tmp_path / "m", cls=cls, seg=seg) == 2
    assert "pass --images DIR and --labels CSV" in error_line(capsys)
    synth = runs / "synth"
    data_args = ("--images", str(synth / "dicom-images-train"), "--labels", str(synth / "train-rle.csv"))
    assert tune_cli(runs, tmp_path / "m", *data_args, "--min-sensitivity", "0.9", cls=cls, seg=seg) == 0
    v = manifest(tmp_path / "m")["metrics"]["validation"]
    assert v["min_sensitivity"] == 0.9 and v["sensitivity"] >= 0.9
    assert v["mean_dice"] <= manifest(model)["metrics"]["validation"]["mean_dice"] + 1e-12
    assert "subject to sensitivity ≥ 0.9" in capsys.readouterr().out
    assert tune_cli(runs, tmp_path / "fast", "--max-segmenter-share", "0.5") == 0
    v = manifest(tmp_path / "fast")["metrics"]["validation"]
    assert v["max_segmented_share"] == 0.5 and v["segmented_share"] <= 0.5
    assert "subject to segmented share ≤ 0.5" in capsys.readouterr().out


def test_an_unreadable_validation_image_is_reported_and_left_out(runs: Path, model: Path, tmp_path: Path,
                                                                  capsys) -> None:
    images = tmp_path / "images"
    shutil.copytree(runs / "synth" / "dicom-images-train", images)
    ids, paths = validation(runs)
    broken = images / paths[0].relative_to(runs / "synth" / "dicom-images-train")
    broken.write_bytes(b"not a dicom file")
    assert tune_cli(runs, tmp_path / "m", "--images", str(images)) == 0
    captured = capsys.readouterr()
    assert f"left out of the search: {broken}" in captured.err
    # the tiny validation fold is under the trusted size: said on stderr and recorded in the model folder
    assert f"{len(ids) - 1} images," in captured.err and "too few to trust" in captured.err
    warnings = manifest(tmp_path / "m")["metrics"]["validation"]["warnings"]
    assert any("too few to trust" in w for w in warnings)
    assert "1 unreadable (left out)" in captured.out
    report = json.loads((tmp_path / "m" / "report" / "validation.json").read_text())
    assert report["images"] == len(ids) - 1 and len(report["unreadable"]) == 1


def test_labels_or_images_that_do_not_match_the_runs_are_refused(runs: Path, tmp_path: Path, capsys) -> None:
    ids, _ = validation(runs)
    labels = read_labels(runs / "synth" / "train-rle.csv")
    flipped = next(i for i in ids if labels.is_positive(i))
    other = tmp_path / "labels.csv"
    rows = [f"{i},{rle}" for i, rles in labels.annotations.items() for rle in (rles if i != flipped else []) or ["-1"]]
    other.write_text("ImageId,EncodedPixels\n" + "\n".join(rows) + "\n")
    assert tune_cli(runs, tmp_path / "m", "--labels", str(other)) == 2
    assert f"ImageId {flipped} is negative here but not in" in error_line(capsys)
    empty = tmp_path / "no-images"
    empty.mkdir()
    assert tune_cli(runs, tmp_path / "m", "--images", str(empty)) == 2
    assert f"{len(ids)} validation image(s) of {runs / 'cls' / 'split.csv'} not found" in error_line(capsys)
    assert not (tmp_path / "m").exists()


def test_model_folder_records_its_provenance_and_a_model_card(runs: Path, model: Path) -> None:
    data = manifest(model)["metrics"]["training_data"]
    split = read_split_csv(runs / "cls" / "split.csv")
    ids, _ = validation(runs)
    assert data["images"] == 64 == len(split.folds) and data["positives"] == sum(split.positive.values())
    assert data["validation_images"] == len(ids) and data["training_images"] == 64 - len(ids)
    assert data["image_size"] == {"classifier": 64, "segmenter": 64}
    assert data["labels_file"] == "train-rle.csv"
    assert data["labels_sha256"] == sha256_file(runs / "synth" / "train-rle.csv")
    assert data["synthetic"] is True and data["synthetic_share"] == 1.0
    card = (model / "MODEL_CARD.md").read_text()
    v = manifest(model)["metrics"]["validation"]
    assert "**Not a medical device**" in card and "Trained and tuned on synthetic films" in card
    assert f"**{v['mean_dice']:.4f}**" in card and f"all-empty baseline {v['baseline_empty']:.4f}" in card
    assert f"{data['images']} images ({data['positives']} positive)" in card


def test_predicting_a_real_radiograph_with_a_synthetic_model_warns_once(
    model: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = shared_data / "siim" / "sample-images"
    assert main(["predict", str(model), str(real), "--out", str(tmp_path / "sub.csv"), "--workers", "0",
                 "--device", "cpu"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "synthetic films" in line]
    assert len(warnings) == 1 and warnings[0].startswith("cascade predict: warning: ")
    assert "meaningless" in warnings[0]
    runs_images = model.parent / "synth" / "dicom-images-train"
    assert main(["predict", str(model), str(runs_images), "--out", str(tmp_path / "syn.csv"), "--workers", "0",
                 "--device", "cpu"]) == 0
    assert "synthetic films" not in capsys.readouterr().err  # its own kind of film: no warning


def test_int8_tune_ships_calibrated_graphs_that_predict_runs(runs: Path, model: Path, tmp_path: Path) -> None:
    """--precision int8: graphs calibrated on the fold go into MODEL_DIR (hashed); the recorded scores are what
    Cascade.predict reproduces at int8; the probabilities are near fp32's but quantized; misuse gets one clear line."""
    import warnings

    from cascade.errors import ConfigError, ModelError
    from cascade.inference.precision import PrecisionWarning
    from cascade.storage.modeldir import INT8_GRAPH

    out = tmp_path / "int8"
    assert tune_cli(runs, out, "--precision", "int8", "--cache-dir", str(tmp_path / "engines")) == 0
    data = manifest(out)
    assert data["precision"] == "int8" and data["metrics"]["validation"]["precision"] == "int8"
    assert "Tuned on probabilities computed at int8 by the int8 graphs" in (out / "MODEL_CARD.md").read_text()
    for name in ("classifier", "segmenter"):
        assert data["sha256"][f"{name}/{INT8_GRAPH}"] == sha256_file(out / name / INT8_GRAPH)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)  # auto means int8 for this folder: no warning
        int8 = Cascade.from_pretrained(out, device="cpu")
    assert (int8.precision, int8.backend) == ("int8", "onnxruntime")
    summary, gated = rescore(runs, out)
    v = data["metrics"]["validation"]
    assert v["mean_dice"] == pytest.approx(summary.mean_dice, abs=1e-12)
    assert v["confusion"] == summary.confusion.to_dict()
    assert v["segmented_share"] == pytest.approx(gated)

    _, paths = validation(runs)
    fp32 = Cascade.from_pretrained(model, device="cpu", precision="fp32")
    moved = [abs(a.probability - b.probability) for a, b in zip(int8.predict_many(paths, workers=0),
                                                                 fp32.predict_many(paths, workers=0))]
    assert 0 < max(moved) < 0.1, f"int8 probabilities must be quantized, yet near fp32: {max(moved)}"

    with pytest.warns(PrecisionWarning, match="tuned at int8 but inference runs at fp32"):
        forced = Cascade.from_pretrained(out, device="cpu", precision="fp32")
    forced.save_pretrained(tmp_path / "saved")  # keeps the tuned precision and its graphs
    assert Cascade.from_pretrained(tmp_path / "saved", device="cpu").precision == "int8"

    with pytest.raises(ModelError, match="has no int8 graphs .*cascade tune --precision int8"):
        Cascade.from_pretrained(model, device="cpu", precision="int8")
    with pytest.raises(ConfigError, match="precision int8 runs on ONNX Runtime on the CPU only"):
        Cascade.from_pretrained(out, device="cpu", precision="int8", backend="torch")
    usual = Runtime.resolve("cpu", engine="torch").precision  # torch asked for: the usual auto precision, warned
    with pytest.warns(PrecisionWarning, match=f"tuned at int8 but inference runs at {usual}"):
        assert Cascade.from_pretrained(out, device="cpu", backend="torch").precision == usual
    # the int8 graphs travel with an export
    assert main(["export", str(out), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    exported = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert exported["precision"] == "int8"
    assert exported["int8"] == ["classifier.int8.onnx", "segmenter.int8.onnx"]
    assert (tmp_path / "onnx" / "segmenter.int8.onnx").read_bytes() == (out / "segmenter" / INT8_GRAPH).read_bytes()
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    graph = damaged / "segmenter" / INT8_GRAPH
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelError, match="model.int8.onnx: sha256 does not match"):
        Cascade.from_pretrained(damaged, device="cpu")
