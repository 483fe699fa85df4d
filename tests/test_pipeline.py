"""Cascade inference and MODEL_DIR: tiny real networks (random weights), synthetic and real SIIM DICOMs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from cascade.data.dicom import read_dicom
from cascade.data.rle import rle_decode
from cascade.data.synth import SynthSummary, generate
from cascade.errors import CascadeError, ModelError
from cascade.inference.pipeline import Cascade, predict_probabilities
from cascade.inference.runtime import Runtime
from cascade.stages.checkpoint import sha256_file
from cascade.storage.modeldir import MANIFEST, read_model_dir
from cascade.thresholds.rule import Thresholds
from conftest import CLS_CONFIG, OPEN, PREP, SEG_CONFIG, assert_refused_when_damaged, make_model_dir, tiny_stage

@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return generate(tmp_path_factory.mktemp("synth"), images=6, positive_fraction=0.5, size=128, seed=3,
                    progress=False)


@pytest.fixture(scope="module")
def paths(synth: SynthSummary) -> list[Path]:
    return [synth.paths[k] for k in sorted(synth.paths)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("m") / "model")


def test_single_model_layout_and_manifest(model_dir: Path) -> None:
    files = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())
    assert files == [
        "MODEL_CARD.md",
        "cascade.json",
        "classifier/config.json",
        "classifier/model.safetensors",
        "segmenter/config.json",
        "segmenter/model.safetensors",
    ]
    manifest = json.loads((model_dir / MANIFEST).read_text())
    assert manifest["schema_version"] == 1
    assert manifest["thresholds"] == OPEN.to_dict()
    assert manifest["preprocessing"] == {"classifier": PREP, "segmenter": PREP}
    assert manifest["members"] == {"classifier": ["classifier"], "segmenter": ["segmenter"]}
    for name in ("classifier", "segmenter"):
        weights = model_dir / name / "model.safetensors"
        assert manifest["sha256"][f"{name}/model.safetensors"] == sha256_file(weights)
    assert set(manifest["versions"]) == {"cascade", "torch", "timm", "smp"}
    assert not list(model_dir.parent.glob(".model*")), "no temporary folder may be left behind"


def test_save_pretrained_round_trip_gives_identical_predictions(model_dir: Path, paths: list[Path],
                                                                tmp_path: Path) -> None:
    first = Cascade.from_pretrained(model_dir, device="cpu", tta=True)
    copy = Cascade.from_pretrained(first.save_pretrained(tmp_path / "copy"), device="cpu")
    assert copy.tta is True, "the TTA setting travels with the model folder"
    a = list(first.predict_many(paths, batch_size=4, workers=0))
    b = list(copy.predict_many(paths, batch_size=4, workers=0))
    assert [p.image_id for p in a] == [p.stem for p in paths]
    for x, y in zip(a, b):
        assert x.ok and y.ok
        assert x.probability == y.probability
        assert np.array_equal(x.mask, y.mask) and x.rle == y.rle


def test_rewriting_a_model_folder_replaces_it_but_never_other_data(model_dir: Path, tmp_path: Path) -> None:
    target = make_model_dir(tmp_path / "m", OPEN)
    make_model_dir(target, Thresholds(cls=0.3, top=0.5, area=0, bottom=0.4, min_component=0))
    assert read_model_dir(target).thresholds.cls == 0.3
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(ModelError, match="not a model folder"):
        make_model_dir(tmp_path / "data")
    assert (tmp_path / "data" / "keep.txt").exists()


def test_real_siim_dicom_gives_native_mask_whose_rle_decodes_back(model_dir: Path, shared_data: Path) -> None:
    path = sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))[0]
    (probs,) = predict_probabilities([model_dir / "classifier"], [model_dir / "segmenter"], [path], workers=0,
                                     runtime=Runtime.resolve("cpu"))
    assert probs.seg_prob.shape == (64, 64) and (probs.height, probs.width) == (1024, 1024)
    model = Cascade.from_pretrained(model_dir, device="cpu")
    model.thresholds = Thresholds(cls=0.0, top=0.0, area=0, bottom=float(np.median(probs.seg_prob)), min_component=0)
    pred = model.predict(path)
    assert pred.image_id == path.stem
    assert pred.probability == pytest.approx(probs.cls_prob, abs=1e-6)
    assert pred.mask.shape == (1024, 1024) and pred.mask.dtype == bool
    assert 0 < pred.mask.mean() < 1, "a median threshold must give a partial mask"
    assert pred.positive
    assert np.array_equal(rle_decode(pred.rle, 1024, 1024), pred.mask)


def test_path_dataset_and_array_inputs_agree(model_dir: Path, paths: list[Path]) -> None:
    model = Cascade.from_pretrained(model_dir, device="cpu")
    image = read_dicom(paths[0])
    by_path = model.predict(paths[0])
    by_dataset = model.predict(pydicom.dcmread(paths[0]))
    by_float = model.predict(image.pixels)
    by_uint8 = model.predict(np.rint(image.pixels * 255).astype(np.uint8))
    for other in (by_dataset, by_float, by_uint8):
        assert other.probability == by_path.probability
        assert np.array_equal(other.mask, by_path.mask)
    with pytest.raises(CascadeError, match="2-D"):
        model.predict(np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(CascadeError, match=r"\[0,1\]"):
        model.predict(np.full((8, 8), 2.0, dtype=np.float32))


def _count_segmenter_images(model: Cascade) -> list[int]:
    seen: list[int] = []
    for member in model._stages.segmenter.models:
        member.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    return seen


def test_segmenter_runs_only_on_images_the_classifier_passes(model_dir: Path, paths: list[Path]) -> None:
    model = Cascade.from_pretrained(model_dir, device="cpu", backend="torch")  # hooks count the torch calls
    probs = [p.probability for p in model.predict_many(paths, workers=0)]
    cls = float(np.median(probs))
    passing = [p >= cls for p in probs]
    assert 0 < sum(passing) < len(paths)
    model.thresholds = Thresholds(cls=cls, top=0.0, area=0, bottom=0.0, min_component=0)
    seen = _count_segmenter_images(model)
    gated = list(model.predict_many(paths, batch_size=2, workers=1))
    assert sum(seen) == sum(passing)
    assert seen == [2] * (sum(passing) // 2) + [sum(passing) % 2] * (sum(passing) % 2), "full segmenter batches"
    assert [p.positive for p in gated] == passing, "bottom 0 gives a full mask exactly when the gate passes"
    seen.clear()
    opened = list(model.predict_many(paths, batch_size=2, workers=0, gate=False))
    assert sum(seen) == len(paths)
    for g, o in zip(gated, opened):
        assert g.probability == o.probability and np.array_equal(g.mask, o.mask)


def test_shut_gate_never_calls_the_segmenter(tmp_path: Path, paths: list[Path]) -> None:
    th = Thresholds(cls=0.5, top=0.0, area=0, bottom=0.0, min_component=0)
    model = Cascade.from_pretrained(make_model_dir(tmp_path / "m", th, cls_bias=-20.0), device="cpu")
    seen = _count_segmenter_images(model)
    preds = list(model.predict_many(paths, workers=0)) + [model.predict(paths[0])]
    assert seen == []
    assert all(p.ok and not p.positive and p.rle == "-1" and p.mask.shape == (128, 128) for p in preds)


def test_thresholds_are_applied_at_native_size_with_rescaled_areas(tmp_path: Path, paths: list[Path]) -> None:
    # a saturated segmenter gives a full 128x128 mask = 16384 px; at 1024² that is 1048576 px
    full = dict(cls=0.0, top=0.5, bottom=0.5, min_component=0)
    just_enough = Cascade.from_pretrained(
        make_model_dir(tmp_path / "a", Thresholds(area=1024**2, **full), seg_bias=20.0), device="cpu"
    ).predict(paths[0])
    assert just_enough.positive and just_enough.mask.all()
    too_much = Cascade.from_pretrained(
        make_model_dir(tmp_path / "b", Thresholds(area=1024**2 + 100, **full), seg_bias=20.0), device="cpu"
    ).predict(paths[0])
    assert not too_much.positive and too_much.rle == "-1"


def test_fold_ensemble_averages_member_probabilities(tmp_path: Path, paths: list[Path]) -> None:
    ensemble_dir = make_model_dir(tmp_path / "ens", classifiers=2)
    info = read_model_dir(ensemble_dir)
    assert [d.name for d in info.classifiers] == ["classifier", "classifier-1"]
    ensemble = Cascade.from_pretrained(ensemble_dir, device="cpu").predict(paths[0]).probability
    members = [
        Cascade([tiny_stage(CLS_CONFIG, seed=i)], [tiny_stage(SEG_CONFIG, seed=10)], OPEN, runtime=Runtime.resolve("cpu"))
        .predict(paths[0]).probability
        for i in range(2)
    ]
    assert members[0] != members[1]
    assert ensemble == pytest.approx(np.mean(members), abs=1e-6)


def test_hflip_tta_makes_the_classifier_mirror_invariant(model_dir: Path, paths: list[Path]) -> None:
    pixels = read_dicom(paths[1]).pixels
    with_tta = Cascade.from_pretrained(model_dir, device="cpu", tta=True)
    plain = Cascade.from_pretrained(model_dir, device="cpu")
    a, b = with_tta.predict(pixels).probability, with_tta.predict(pixels[:, ::-1].copy()).probability
    assert a == pytest.approx(b, abs=1e-6)
    p, q = plain.predict(pixels).probability, plain.predict(pixels[:, ::-1].copy()).probability
    assert p != pytest.approx(q, abs=1e-6), "a random network is not mirror-invariant by itself"
    assert a == pytest.approx((p + q) / 2, abs=1e-6)


def test_bad_files_are_reported_in_order_and_the_good_ones_predicted(model_dir: Path, paths: list[Path],
                                                                     tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00not a dicom" * 50)
    missing = tmp_path / "missing.dcm"
    sources = [paths[0], garbage, paths[1], missing, paths[2]]
    model = Cascade.from_pretrained(model_dir, device="cpu")
    preds = list(model.predict_many(sources, batch_size=2, workers=1))
    assert [p.image_id for p in preds] == [s.stem for s in sources]
    assert [p.ok for p in preds] == [True, False, True, False, True]
    assert str(garbage) in preds[1].error and str(missing) in preds[3].error
    assert preds[1].mask is None and preds[1].rle == ""
    assert preds[2].probability == model.predict(paths[1]).probability
    with pytest.raises(CascadeError, match="missing.dcm"):
        model.predict(missing)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(path: Path, **changes: Any) -> None:
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: _flip_last_byte(d / "segmenter" / "model.safetensors"), r"segmenter/model.safetensors: sha256"),
        (lambda d: (d / "classifier" / "model.safetensors").write_bytes(
            (d / "classifier" / "model.safetensors").read_bytes()[:1000]), r"classifier/model.safetensors: sha256"),
        (lambda d: (d / "segmenter" / "config.json").unlink(), r"segmenter/config.json: missing"),
        (lambda d: (d / "classifier" / "model.safetensors").unlink(), r"classifier/model.safetensors: missing"),
        (lambda d: (d / MANIFEST).write_text("{not json"), r"cascade.json: not valid JSON"),
        (lambda d: (d / MANIFEST).unlink(), r"cascade.json: missing"),
        (lambda d: _edit_manifest(d / MANIFEST, schema_version=99), r"schema_version 99 is not supported"),
        (lambda d: _edit_manifest(d / MANIFEST, thresholds={"cls": 2}), r"cascade.json: thresholds"),
        (lambda d: _edit_manifest(d / MANIFEST, members={"classifier": ["../x"], "segmenter": ["segmenter"]}),
         r"must be a folder name"),
        (lambda d: _edit_manifest(d / MANIFEST, preprocessing={"classifier": {**PREP, "size": 128}, "segmenter": PREP}),
         r"preprocessing.classifier .* differs from what the classifier was trained with"),
    ],
    ids=["changed", "truncated", "no-config", "no-weights", "bad-json", "no-manifest", "schema", "thresholds",
         "escape",
         "preprocessing"],
)
def test_damaged_model_folder_is_refused_with_one_clear_error(model_dir: Path, tmp_path: Path, damage: Any,
                                                              message: str) -> None:
    assert_refused_when_damaged(model_dir, tmp_path, damage, message)


def test_editing_a_threshold_in_cascade_json_is_honoured(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    _edit_manifest(copy / MANIFEST, thresholds={**OPEN.to_dict(), "cls": 0.75}, tta={"hflip": True})
    model = Cascade.from_pretrained(copy, device="cpu")
    assert model.thresholds.cls == 0.75 and model.tta is True


def test_no_network_access_at_import_or_prediction(model_dir: Path, paths: list[Path]) -> None:
    script = textwrap.dedent(
        f"""
        import socket
        def refuse(*args, **kwargs):
            raise AssertionError("network access attempted")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.getaddrinfo = refuse
        socket.create_connection = refuse
        from cascade import Cascade
        model = Cascade.from_pretrained({str(model_dir)!r}, device="cpu")
        preds = list(model.predict_many([{str(paths[0])!r}, {str(paths[1])!r}], workers=1))
        assert all(p.ok for p in preds), [p.error for p in preds]
        print("ok", model.predict({str(paths[0])!r}).rle[:10])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")
