"""DICOM Secondary Capture: the overlay drawing (the one in cascade.outputs.overlay) under a burned-in "AI result,
not for diagnosis" banner, on a real SIIM film, read back with pydicom and checked by dciodvfy. The `cascade predict
--secondary-capture` run itself is in tests/test_dicom_sr.py."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from cascade import __version__
from cascade.data.labels import read_labels
from cascade.data.rle import rle_encode
from cascade.errors import CascadeError
from cascade.inference.pipeline import Cascade, Prediction
from cascade.outputs.overlay import draw_overlay
from cascade.outputs.secondary_capture import BANNER, render, secondary_capture, write_secondary_capture
from cascade.thresholds.rule import Thresholds
from conftest import make_model_dir

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def source(shared_data: Path) -> Path:
    return sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))[0]


@pytest.fixture(scope="module")
def positive(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Prediction:
    """Gate open, segmenter map near 0.5: a random, non-empty mask; the decoded film kept."""
    model = Cascade.from_pretrained(make_model_dir(tmp_path_factory.mktemp("m") / "model"), device="cpu",
                                    precision="fp32")
    (pred,) = model.predict_many([source], workers=0, keep_image=True)
    assert pred.positive and pred.image is not None
    return pred


def test_capture_is_the_overlay_under_a_banner_in_the_sources_study(
    positive: Prediction, source: Path, tmp_path: Path
) -> None:
    path = write_secondary_capture(positive, tmp_path / "sc.dcm")
    sc = pydicom.dcmread(path)
    src = pydicom.dcmread(source, stop_before_pixels=True)
    assert sc.SOPClassUID == SC_CLASS and sc.Modality == "OT"
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.PatientID == src.PatientID
    assert sc.SeriesInstanceUID != src.SeriesInstanceUID and sc.SeriesNumber == 9903
    assert sc.BurnedInAnnotation == "YES" and list(sc.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert positive.model is not None and positive.model.weights_sha256
    assert f"cascade {__version__}" in sc.DerivationDescription
    assert f"weights_sha256: {positive.model.weights_sha256}" in sc.DerivationDescription
    assert sc.LossyImageCompression == src.LossyImageCompression == "01"  # a JPEG film: never reset

    pixels = sc.pixel_array
    band = pixels.shape[0] - src.Rows
    assert pixels.shape[1] == src.Columns and 0 < band < src.Rows // 10
    drawn = cv2.cvtColor(draw_overlay(positive.image, positive), cv2.COLOR_BGR2RGB)
    assert np.array_equal(pixels[band:], drawn), "the film with the one overlay drawing, nothing of it hidden"
    banner = pixels[:band]
    assert (banner[..., 0] == banner[..., 1]).all() and (banner[..., 1] == banner[..., 2]).all(), "white on black"
    assert (banner > 200).mean() > 0.02, "the banner text is burned in"
    assert np.array_equal(render(positive.image, positive, BANNER.format(version=__version__)), pixels)
    assert not np.array_equal(render(positive.image, positive, "AI RESULT"), pixels)


def test_capture_passes_the_dicom3tools_validator(positive: Prediction, tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    path = write_secondary_capture(positive, tmp_path / "sc.dcm")
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


def test_no_capture_for_a_negative_an_image_not_kept_or_an_array(source: Path, tmp_path: Path) -> None:
    gated = Thresholds(cls=0.5, top=0.0, area=0.0, bottom=0.5, min_component=0.0)
    shut = Cascade.from_pretrained(make_model_dir(tmp_path / "shut", gated, cls_bias=-20.0), device="cpu",
                                   precision="fp32")
    (negative,) = shut.predict_many([source], workers=0, keep_image=True)
    assert not negative.positive
    with pytest.raises(CascadeError, match="negative"):
        secondary_capture(negative)
    opened = Cascade.from_pretrained(make_model_dir(tmp_path / "open", seg_bias=20.0), device="cpu",
                                     precision="fp32")
    with pytest.raises(CascadeError, match="keep_image"):
        secondary_capture(opened.predict(source))
    with pytest.raises(CascadeError, match="DICOM source"):
        secondary_capture(opened.predict(np.full((64, 64), 0.5, dtype=np.float32)))


def test_capture_of_a_real_annotation_outlines_exactly_that_region(
    positive: Prediction, shared_data: Path, tmp_path: Path
) -> None:
    """The SC of a film whose mask is the challenge's own annotation of it: red lies only along that region's edge.
    With ``$CASCADE_SCREENSHOTS`` set it is saved as what a PACS viewer shows (docs/secondary-capture.png)."""
    labels = read_labels(shared_data / "siim" / "train-rle-sample.csv")
    film = next(p for p in sorted((shared_data / "siim" / "sample-images").glob("*.dcm")) if labels.is_positive(p.stem))
    model = Cascade.from_pretrained(make_model_dir(tmp_path / "model"), device="cpu", precision="fp32")
    (pred,) = model.predict_many([film], workers=0, keep_image=True)
    truth = labels.mask(film.stem, 1024, 1024)
    pred = dataclasses.replace(pred, mask=truth, positive=True, rle=rle_encode(truth))
    pixels = pydicom.dcmread(write_secondary_capture(pred, tmp_path / "sc.dcm")).pixel_array
    film_part = pixels[pixels.shape[0] - 1024:]
    red = (film_part[..., 0] > 200) & (film_part[..., 1] < 80) & (film_part[..., 2] < 80)
    edge = cv2.dilate(truth.astype(np.uint8), np.ones((9, 9), np.uint8)) - cv2.erode(truth.astype(np.uint8),
                                                                                    np.ones((9, 9), np.uint8))
    red[:60, :260] = False  # the probability label's corner
    assert red.sum() > 100 and edge[red].mean() > 0.95, "the outline follows the annotation"
    if os.environ.get("CASCADE_SCREENSHOTS"):
        picture = cv2.resize(cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), (512, 512 * pixels.shape[0] // pixels.shape[1]),
                             interpolation=cv2.INTER_AREA)
        assert cv2.imwrite(str(Path(os.environ["CASCADE_SCREENSHOTS"]) / "secondary-capture.png"), picture)
