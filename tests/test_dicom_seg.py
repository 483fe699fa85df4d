"""DICOM SEG writer: a real tiny cascade on the real SIIM sample DICOMs; read back with pydicom, checked by dciodvfy.

highdicom 0.28 writes these SEGs but cannot read them back: its reader demands SliceThickness in the Pixel Measures
macro, which the standard requires only when a Frame of Reference is present (PS3.3 C.7.6.16.2.1, type 1C) — and a
projection radiograph has none. The standard's own validator (dciodvfy) is the judge instead.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cascade.errors import CascadeError
from cascade.inference.pipeline import Cascade
from cascade.outputs.dicom_seg import segmentation, write_segmentation
from cascade.thresholds.rule import Thresholds
from conftest import make_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Cascade:
    """Gate open, segmenter map near 0.5 everywhere: a random, non-empty mask on every image."""
    return Cascade.from_pretrained(make_model_dir(tmp_path_factory.mktemp("m") / "model"), device="cpu")


@pytest.fixture(scope="module")
def source(shared_data: Path) -> Path:
    return next(iter(sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))))


def test_seg_holds_the_predicted_mask_and_references_its_source(model: Cascade, source: Path, tmp_path: Path) -> None:
    pred = model.predict(source)
    assert pred.positive and pred.mask is not None and pred.mask.shape == (1024, 1024)
    assert 0 < pred.mask.sum() < pred.mask.size
    path = write_segmentation(pred, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(path)
    src = pydicom.dcmread(source, stop_before_pixels=True)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.PatientID == src.PatientID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    described = seg.SegmentSequence[0]
    assert described.SegmentLabel == "Pneumothorax"
    assert described.SegmentedPropertyTypeCodeSequence[0].CodeValue == "36118008"
    assert described.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert described.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "cascade"
    assert seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing == src.PixelSpacing
    assert np.array_equal(seg.pixel_array.astype(bool), pred.mask)


def test_seg_passes_the_dicom3tools_validator(model: Cascade, source: Path, tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; .ci/run installs it")
    path = write_segmentation(model.predict(source), tmp_path / "seg.dcm")
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


def test_no_seg_for_a_negative_or_an_array(tmp_path: Path, source: Path) -> None:
    gated = Thresholds(cls=0.5, top=0.0, area=0.0, bottom=0.5, min_component=0.0)
    shut = Cascade.from_pretrained(make_model_dir(tmp_path / "shut", gated, cls_bias=-20.0), device="cpu")
    negative = shut.predict(source)
    assert not negative.positive
    with pytest.raises(CascadeError, match="negative"):
        segmentation(negative)
    opened = Cascade.from_pretrained(make_model_dir(tmp_path / "open", seg_bias=20.0), device="cpu")
    from_array = opened.predict(np.full((64, 64), 0.5, dtype=np.float32))
    assert from_array.positive
    with pytest.raises(CascadeError, match="DICOM source"):
        segmentation(from_array)


def test_predict_writes_one_seg_per_positive_and_refuses_input_or_model_folders(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cascade.cli.main import main
    from cascade.data.labels import read_labels

    gated = Thresholds(cls=0.504, top=0.0, area=0.0, bottom=0.68, min_component=0.0)
    model_dir = make_model_dir(tmp_path / "model", gated)
    images = shared_data / "siim" / "sample-images"
    out, segs = tmp_path / "sub.csv", tmp_path / "segs"
    args = ["predict", str(model_dir), str(images), "--out", str(out), "--device", "cpu", "--workers", "0"]
    assert main([*args, "--dicom-seg", str(segs)]) == 0
    labels = read_labels(out)
    positives = sorted(i for i in labels.image_ids if labels.is_positive(i))
    assert 0 < len(positives) < len(labels.image_ids)
    assert sorted(p.stem for p in segs.glob("*.dcm")) == positives
    assert f"{len(positives)} DICOM SEG written" in capsys.readouterr().out
    for image_id in positives:
        seg = pydicom.dcmread(segs / f"{image_id}.dcm")
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == image_id
        assert np.array_equal(seg.pixel_array.astype(bool), labels.mask(image_id, 1024, 1024))
    assert not list(segs.glob(".*")), "no temporary files are left"

    copy = tmp_path / "inputs"
    shutil.copytree(images, copy)
    for inside in (copy, copy / "segs", model_dir):
        before = sorted(p.name for p in inside.parent.rglob("*"))
        assert main([*args[:2], str(copy), *args[3:], "--dicom-seg", str(inside)]) == 2
        err = capsys.readouterr().err  # the shared output guard: an input itself, or inside one or the model
        assert "is one of this command's inputs" in err or ", which this command reads; write elsewhere" in err
        assert sorted(p.name for p in inside.parent.rglob("*")) == before, "nothing written"
