"""Fold ensembles end to end: 2 folds x 2 stages of tiny runs → ``cascade tune`` out-of-fold → a 2+2 member MODEL_DIR.

The checks are independent of cascade.training.tuning: the validation folds come from the runs' ``split.csv``, each
fold's images are re-predicted with that fold's own runs, and the thresholds are re-searched with
``cascade.thresholds.tune``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
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
from cascade.thresholds import tune
from cascade.training.tuning import tune_runs

CONFIGS = Path(__file__).resolve().parents[1] / "cascade" / "configs"
SIZE = 96
FOLDS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Synthetic data; a classifier and a segmenter run for each of the 2 folds of one split (3 epochs each)."""
    from cascade.data.synth import generate

    root = tmp_path_factory.mktemp("folds")
    generate(root / "synth", images=48, positive_fraction=0.5, size=SIZE, seed=5, difficulty="easy", progress=False)
    torch.set_num_threads(1)
    for fold in range(FOLDS):
        for stage in ("cls", "seg"):
            assert main([
                "train", "--stage", stage, "--images", str(root / "synth" / "dicom-images-train"),
                "--labels", str(root / "synth" / "train-rle.csv"), "--out", str(root / f"{stage}{fold}"),
                "--config", str(CONFIGS / f"tiny-{stage}.yaml"), "--cache-dir", str(root / "cache"),
                "--folds", str(FOLDS), "--fold", str(fold), "--epochs", "3", "--quiet",
            ]) == 0
    return root


def tune_cli(out: Path, cls: list[Path], seg: list[Path]) -> int:
    return main([
        "tune", "--cls", *map(str, cls), "--seg", *map(str, seg), "--out", str(out),
        "--workers", "0", "--batch-size", "8", "--quiet",
    ])


def fold_runs(runs: Path, stage: str) -> list[Path]:
    return [runs / f"{stage}{fold}" for fold in range(FOLDS)]


@pytest.fixture(scope="module")
def tuned(runs: Path) -> tuple[Path, str]:
    """The fold-ensemble model folder and what ``cascade tune`` printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert tune_cli(runs / "model", fold_runs(runs, "cls"), fold_runs(runs, "seg")) == 0
    return runs / "model", printed.getvalue()


def manifest(model: Path) -> dict:
    return json.loads((model / "cascade.json").read_text())


def dicoms(runs: Path) -> dict[str, Path]:
    return {p.stem: p for p in (runs / "synth" / "dicom-images-train").rglob("*.dcm")}


def fold_ids(runs: Path) -> dict[int, list[str]]:
    """Each fold's validation ImageIds (sorted), from the split every run recorded."""
    split = read_split_csv(runs / "cls0" / "split.csv")
    return {f: sorted(i for i, g in split.folds.items() if g == f) for f in range(FOLDS)}


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("cascade tune: error: "), lines
    return lines[-1]


def test_model_folder_has_every_fold_as_a_member_and_records_out_of_fold(runs: Path, tuned: tuple[Path, str]) -> None:
    model, printed = tuned
    info = read_model_dir(model)  # verifies every member's sha256, stage and shared preprocessing
    assert [p.name for p in info.classifiers] == ["classifier", "classifier-1"]
    assert [p.name for p in info.segmenters] == ["segmenter", "segmenter-1"]
    for fold in range(FOLDS):
        for stage, members in (("cls", info.classifiers), ("seg", info.segmenters)):
            assert sha256_file(members[fold] / "model.safetensors") == sha256_file(
                runs / f"{stage}{fold}" / "best" / "model.safetensors")
    labelled = read_labels(runs / "synth" / "train-rle.csv")
    ids = fold_ids(runs)
    v = manifest(model)["metrics"]["validation"]
    assert v["images"] == len(labelled.annotations) == 48  # every labelled image is someone's validation image
    assert v["out_of_fold"] == {"folds": [0, 1], "images_per_fold": [len(ids[0]), len(ids[1])]}
    assert v["fold"] is None and v["folds"] == FOLDS
    assert v["positives"] == sum(labelled.is_positive(i) for i in labelled.annotations)
    report = json.loads((model / "report" / "validation.json").read_text())
    assert [(r["fold"], Path(r["cls_run"]).name, Path(r["seg_run"]).name) for r in report["runs"]] == [
        (0, "cls0", "seg0"), (1, "cls1", "seg1")]
    assert "out-of-fold on folds 0, 1 of 2 (each by its own pair): 48 images" in printed
    assert "with 2 classifiers and 2 segmenters (averaged)" in printed
    cascade = Cascade.from_pretrained(model, device="cpu")
    assert cascade.thresholds == info.thresholds


def test_search_saw_each_image_once_predicted_by_its_own_fold(runs: Path, tuned: tuple[Path, str],
                                                             tmp_path: Path) -> None:
    """Re-predict every fold's images with only that fold's runs, re-search: same thresholds and score. The runs
    are given out of fold order to show that pairing is by fold, not by position."""
    model, _ = tuned
    outcome = tune_runs([runs / "cls1", runs / "cls0"], fold_runs(runs, "seg"), tmp_path / "m", workers=0,
                        runtime=Runtime.resolve("cpu"), progress=False)
    ids = fold_ids(runs)
    assert outcome.image_ids == ids[0] + ids[1]
    assert sorted(outcome.image_ids) == sorted(read_labels(runs / "synth" / "train-rle.csv").annotations)

    labels, paths = read_labels(runs / "synth" / "train-rle.csv"), dicoms(runs)
    probs = []
    for fold in range(FOLDS):
        best = [runs / f"{stage}{fold}" / "best" for stage in ("cls", "seg")]
        probs += list(predict_probabilities(best[:1], best[1:], [paths[i] for i in ids[fold]], workers=0,
                                            runtime=Runtime.resolve("cpu")))
    maps = [cv2.resize(p.seg_prob, (p.width, p.height), interpolation=cv2.INTER_LINEAR) for p in probs]
    result = tune([p.cls_prob for p in probs], maps, [labels.mask(p.image_id, SIZE, SIZE) for p in probs],
                  progress=False)
    for data in (manifest(model), manifest(tmp_path / "m")):
        assert data["thresholds"] == result.thresholds.to_dict()
        assert data["metrics"]["validation"]["mean_dice"] == pytest.approx(result.score, abs=1e-12)
        assert data["metrics"]["validation"]["confusion"] == result.confusion.to_dict()


def test_ensemble_prediction_averages_the_fold_classifiers(runs: Path, tuned: tuple[Path, str]) -> None:
    model, _ = tuned
    cascade = Cascade.from_pretrained(model, device="cpu")
    images = sorted(dicoms(runs).values())[:4]
    seg = [runs / "seg0" / "best"]
    singles = [[p.cls_prob for p in predict_probabilities([runs / f"cls{f}" / "best"], seg, images, workers=0,
                                                          runtime=Runtime.resolve("cpu"))] for f in range(FOLDS)]
    assert not np.allclose(singles[0], singles[1]), "the two fold classifiers should differ"
    ensemble = [cascade.predict(path).probability for path in images]
    assert ensemble == pytest.approx(np.mean(singles, axis=0), abs=1e-6)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("state.pt", "last"))
    return dst


def edit_config(run: Path, **changes) -> None:
    path = run / "best" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unpaired_duplicate_or_mismatched_runs_are_refused(runs: Path, tmp_path: Path, capsys) -> None:
    cls, seg = fold_runs(runs, "cls"), fold_runs(runs, "seg")
    out = tmp_path / "m"
    assert tune_cli(out, cls, seg[:1]) == 2
    assert f"{runs / 'cls1'}: no --seg run validates on fold 1 (the --seg runs cover folds 0)" in error_line(capsys)
    assert tune_cli(out, cls[:1], seg) == 2
    assert f"{runs / 'seg1'}: no --cls run validates on fold 1" in error_line(capsys)
    assert tune_cli(out, [cls[0], cls[0], cls[1]], seg) == 2
    assert "both --cls runs validate on fold 0; give one classifier run per fold" in error_line(capsys)

    other_split = copy_run(runs / "seg1", tmp_path / "seg1-split")
    split = read_split_csv(other_split / "split.csv")
    folds = {i: 1 - f for i, f in split.folds.items()}
    write_split_csv(other_split / "split.csv", folds, split.positive)
    edit_config(other_split, split_fingerprint=split_fingerprint(folds))
    assert tune_cli(out, cls, [seg[0], other_split]) == 2
    assert f"{runs / 'cls0'} and {other_split}: the runs were trained on different splits" in error_line(capsys)

    other_prep = copy_run(runs / "cls1", tmp_path / "cls1-prep")
    edit_config(other_prep, preprocessing={"size": 96, "mean": 0.5, "std": 0.25})
    assert tune_cli(out, [cls[0], other_prep], seg) == 2
    assert "the classifier runs were trained with different preprocessing" in error_line(capsys)
    assert not out.exists()


def test_help_points_to_the_doc_that_explains_fold_pairing_and_the_calibration_caveat(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "out-of-fold tuned fold ensemble (docs/fold-ensembles.md)" in text
    doc = " ".join((Path(__file__).resolve().parents[1] / "docs" / "fold-ensembles.md").read_text().split())
    assert "A subset of the split's folds is allowed" in doc and "better calibrated" in doc


def test_the_documented_commands_parse() -> None:
    """Every `cascade …` line of docs/fold-ensembles.md parses (loop variables set to fold 0 of 5)."""
    from cascade.cli.main import build_parser

    doc = (Path(__file__).resolve().parents[1] / "docs" / "fold-ensembles.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", doc, flags=re.DOTALL)
    lines = [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    commands = [line.replace("$K", "5").replace("$fold", "0") for line in lines if line.startswith("cascade ")]
    assert [shlex.split(c)[1] for c in commands] == ["train", "train", "tune", "predict"]
    parsed = [build_parser().parse_args(shlex.split(c)[1:]) for c in commands]
    from cascade.stages.config import find_config

    assert all(find_config(p.config).is_file() for p in parsed[:2])  # the shipped names resolve
    assert (parsed[2].cls, parsed[2].seg) == (["runs/cls-f*"], ["runs/seg-f*"])
