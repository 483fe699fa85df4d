"""`cascade export --format onnx`: self-contained graphs that ONNX Runtime runs like PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascade.cli.main import main
from cascade.data.dicom import read_dicom
from cascade.data.preprocess import prepare_image
from cascade.errors import ModelError
from cascade.inference.onnx_export import TOLERANCE, export_onnx
from cascade.inference.pipeline import predict_probabilities
from cascade.inference.runtime import Runtime
from test_pipeline import make_model_dir

ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the optional extra 'onnx'")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    model_dir = make_model_dir(root / "model")
    out = root / "onnx"
    status = main(["export", str(model_dir), "--format", "onnx", "--out", str(out)])
    assert status == 0
    return model_dir, out


def test_export_writes_both_stages_with_dynamic_axes(exported: tuple[Path, Path]) -> None:
    _, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["cascade.json", "classifier.onnx", "export.json",
                                                      "segmenter.onnx"]
    record = json.loads((out / "export.json").read_text())
    assert record["tolerance"] == TOLERANCE
    assert all(m["dynamic_spatial"] and m["max_abs_diff"] <= TOLERANCE for m in record["members"])


def test_onnx_runtime_reproduces_the_pipeline_on_a_real_image(exported: tuple[Path, Path],
                                                              shared_data: Path) -> None:
    model_dir, out = exported
    path = sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))[0]
    (expected,) = predict_probabilities([model_dir / "classifier"], [model_dir / "segmenter"], [path], workers=0,
                                        runtime=Runtime.resolve("cpu", "fp32"))
    image = prepare_image(read_dicom(path).pixels, 64)[None, None]
    batch = np.concatenate([image, image[..., ::-1]])  # batch of 2: the dynamic batch axis is used
    cls = ort.InferenceSession(str(out / "classifier.onnx")).run(None, {"image": batch})[0]
    seg = ort.InferenceSession(str(out / "segmenter.onnx")).run(None, {"image": batch})[0]
    assert cls.shape == (2,) and seg.shape == (2, 1, 64, 64)
    assert abs(cls[0] - expected.cls_prob) <= TOLERANCE
    assert np.abs(seg[0, 0] - expected.seg_prob).max() <= TOLERANCE
    bigger = np.zeros((1, 1, 96, 128), dtype=np.uint8)
    assert ort.InferenceSession(str(out / "segmenter.onnx")).run(None, {"image": bigger})[0].shape == (1, 1, 96, 128)


def test_a_parity_failure_is_an_error(exported: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, _ = exported
    with pytest.raises(ModelError, match="ONNX Runtime differs from PyTorch"):
        export_onnx(model_dir, tmp_path / "strict", tolerance=-1.0)
    assert not list((tmp_path / "strict").glob("*.onnx")), "a file that failed the check is not left behind"


def test_export_refuses_a_non_empty_folder(tmp_path: Path, capsys) -> None:
    from cascade.cli.main import main
    from conftest import make_model_dir

    model = make_model_dir(tmp_path / "model")
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    assert main(["export", str(model), "--format", "onnx", "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
