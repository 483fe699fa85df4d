"""DICOM SR (and the SEG and Secondary Capture beside it): one real `cascade predict --dicom-seg --dicom-sr
--secondary-capture` run of a tiny cascade on two real SIIM films, one positive and one negative, read back with
pydicom, highdicom (`srread`) and dcmtk's `dsr2xml`, and checked by dicom3tools' `dciodvfy`.

The films are given header values that no result may copy (patient comments, the acquisition's institution, station
and manufacturer): only the required patient and study attributes travel.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cascade import __version__
from cascade.errors import CascadeError
from cascade.inference.pipeline import Cascade
from cascade.outputs.dicom_seg import segmentation
from cascade.outputs.dicom_sr import report
from cascade.outputs.writers import DicomSrWriter, write_all
from cascade.thresholds.rule import Thresholds
from conftest import CLS_CONFIG, SEG_CONFIG, make_model_dir, tiny_stage

SOURCE_ONLY = {
    "PatientComments": "SOURCE-ONLY comment",
    "InstitutionName": "SOURCE-ONLY hospital",
    "StationName": "SOURCEONLY",
    "Manufacturer": "SOURCE-ONLY vendor",
}
"""Header values of the films that no result may carry (none is required there)."""
VALIDATION = {"images": 12, "fold": 0, "folds": 5, "precision": "fp32", "mean_dice": 0.8, "sensitivity": 0.9,
              "specificity": 0.85, "min_sensitivity": 0.9}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


@dataclass(frozen=True)
class Run:
    images: Path
    model_dir: Path
    seg: Path
    sr: Path
    sc: Path
    positive: str
    negative: str
    probabilities: dict[str, float]
    summary: str


@pytest.fixture(scope="module")
def run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Gate between the two films' classifier probabilities: one positive (segmenter map near 0.5: a random,
    non-empty mask), one negative."""
    from cascade.cli.main import main
    from cascade.storage.modeldir import write_model_dir

    root = tmp_path_factory.mktemp("dicom-results")
    images = root / "images"
    images.mkdir()
    for path in sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))[:2]:
        film = pydicom.dcmread(path)
        for keyword, value in SOURCE_ONLY.items():
            setattr(film, keyword, value)
        film.save_as(images / path.name)
    probe = Cascade.from_pretrained(make_model_dir(root / "probe"), device="cpu", precision="fp32")
    probabilities = {p.image_id: p.probability for p in probe.predict_many(sorted(images.glob("*.dcm")), workers=0)}
    low, high = sorted(probabilities.values())
    assert low < high
    gate = Thresholds(cls=(low + high) / 2, top=0.0, area=0.0, bottom=0.5, min_component=0.0)
    model_dir = write_model_dir(  # the probe's networks (make_model_dir's seeds), with a recorded validation
        root / "model", [tiny_stage(CLS_CONFIG, seed=0)], [tiny_stage(SEG_CONFIG, seed=10)], gate,
        metrics={"validation": VALIDATION},
    )
    out = {name: root / name for name in ("seg", "sr", "sc")}
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(["predict", str(model_dir), str(images), "--out", str(root / "sub.csv"), "--device", "cpu",
                       "--precision", "fp32", "--workers", "0", "--dicom-seg", str(out["seg"]),
                       "--dicom-sr", str(out["sr"]), "--secondary-capture", str(out["sc"])])
    assert status == 0
    positive = max(probabilities, key=probabilities.__getitem__)
    negative = min(probabilities, key=probabilities.__getitem__)
    return Run(images, model_dir, out["seg"], out["sr"], out["sc"], positive, negative, probabilities,
               buffer.getvalue())


def test_predict_writes_an_sr_per_analysed_image_a_seg_and_a_capture_per_positive(run: Run) -> None:
    assert sorted(p.name for p in run.sr.iterdir()) == sorted([f"{run.positive}.sr.dcm", f"{run.negative}.sr.dcm"])
    assert [p.name for p in run.seg.iterdir()] == [f"{run.positive}.dcm"]
    assert [p.name for p in run.sc.iterdir()] == [f"{run.positive}.sc.dcm"]
    assert "1 DICOM SEG written" in run.summary and "2 DICOM SR written" in run.summary
    assert "1 Secondary Capture written" in run.summary


def test_sr_holds_the_finding_probability_area_model_and_references(run: Run) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from cascade.data.labels import read_labels

    labels = read_labels(run.images.parent / "sub.csv")
    digest = _weights_sha256(run.model_dir)
    seg = pydicom.dcmread(run.seg / f"{run.positive}.dcm", stop_before_pixels=True)
    for image_id, present in ((run.positive, True), (run.negative, False)):
        source = pydicom.dcmread(run.images / f"{image_id}.dcm", stop_before_pixels=True)
        path = run.sr / f"{image_id}.sr.dcm"
        sr = pydicom.dcmread(path)
        assert sr.SOPClassUID == SR_CLASS and sr.Modality == "SR"
        assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
        assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, seg.SeriesInstanceUID)
        assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")

        document = hd.sr.srread(path)
        assert isinstance(document, hd.sr.ComprehensiveSR)
        planar = document.content.get_planar_roi_measurement_groups()
        whole = document.content.get_image_measurement_groups()
        assert (len(planar), len(whole)) == ((1, 0) if present else (0, 1))
        group = (planar or whole)[0]
        assert group.finding_type == codes.SCT.Pneumothorax
        evaluations = {e.name: e.value for e in group.get_qualitative_evaluations()}
        assert evaluations[codes.SCT.Pneumothorax] == (codes.SCT.Present if present else codes.SCT.Absent)
        measured = {m.name: (m.value, m.unit.value) for m in group.get_measurements()}
        probability, unit = measured[codes.DCM.Probability]
        assert unit == "1" and probability == pytest.approx(run.probabilities[image_id], abs=1e-6)
        area = labels.mask(image_id, source.Rows, source.Columns).sum()
        assert measured[codes.SCT.Area] == (area, "{pixels}") and (area > 0) == present
        assert _texts(group, codes.DCM.AlgorithmName) == ["cascade"]
        assert _texts(group, codes.DCM.AlgorithmVersion) == [__version__]
        parameters = _texts(group, codes.DCM.AlgorithmParameters)
        assert f"weights_sha256: {digest}" in parameters and "model: model" in parameters
        assert any(p.startswith("thresholds: cls ") for p in parameters)
        assert any(p.startswith("tuned for: highest mean Dice on 12 validation images (fold 0 of 5, fp32)")
                   and "sensitivity at least 0.9" in p for p in parameters)
        evidence = {uid for _, _, uid, _ in document.get_evidence()}
        if present:
            region = group.referenced_segmentation_frame
            assert region[0].referenced_sop_instance_uid == seg.SOPInstanceUID
            assert region[0].referenced_sop_class_uid == seg.SOPClassUID
            assert region[0].referenced_segment_numbers == [1]
            assert region[1].referenced_sop_instance_uid == source.SOPInstanceUID
            assert evidence == {source.SOPInstanceUID, seg.SOPInstanceUID}
        else:
            (image,) = group.source_images
            assert image.referenced_sop_instance_uid == source.SOPInstanceUID
            assert evidence == {source.SOPInstanceUID}
    # the SEG names the same model
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters == (
        f"model=model,weights_sha256={digest}"
    )


def _weights_sha256(model_dir: Path) -> str:
    """The web service's ``weights_sha256`` of a model folder (docs/serving.md), computed here from the manifest."""
    hashes = json.loads((model_dir / "cascade.json").read_text())["sha256"]
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()


def _texts(group: object, name: object) -> list[str]:
    """The TEXT items called ``name`` directly in a measurement group (the algorithm's, TID 4019)."""
    from highdicom.sr import ValueTypeValues
    from highdicom.sr.utils import find_content_items

    return [item.value for item in find_content_items(group[0], name=name, value_type=ValueTypeValues.TEXT)]


def _items(root: ET.Element, tag: str, concept: str) -> list[ET.Element]:
    return [item for item in root.iter(tag) if item.findtext("concept/value") == concept]


def test_dsr2xml_reads_the_finding_probability_and_references(run: Run) -> None:
    if shutil.which("dsr2xml") is None:
        pytest.skip("dsr2xml (Debian package dcmtk) is not installed")
    seg_uid = pydicom.dcmread(run.seg / f"{run.positive}.dcm", stop_before_pixels=True).SOPInstanceUID
    for image_id, present in ((run.positive, True), (run.negative, False)):
        done = subprocess.run(["dsr2xml", str(run.sr / f"{image_id}.sr.dcm")], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        root = ET.fromstring(done.stdout)
        assert root.get("type") == "Comprehensive SR"
        (finding,) = _items(root, "code", "36118008")
        assert (finding.findtext("value"), finding.findtext("meaning")) == (
            ("52101004", "Present") if present else ("272519000", "Absent")
        )
        (probability,) = _items(root, "num", "122157")
        assert float(probability.findtext("value")) == pytest.approx(run.probabilities[image_id], abs=1e-6)
        references = {
            item.findtext("concept/value"): item.find("value/instance").get("uid") for item in root.iter("image")
        }
        if present:
            assert references == {"121214": seg_uid, "121233": image_id}  # SEG's segment, the segmented image
            (segment,) = _items(root, "image", "121214")
            assert segment.findtext("value/segments") == "1"
        else:
            assert references == {"121112": image_id}  # source of measurement
        assert root.find("study").get("uid") == pydicom.dcmread(
            run.images / f"{image_id}.dcm", stop_before_pixels=True).StudyInstanceUID


def test_dciodvfy_finds_no_error_in_the_sr_seg_and_secondary_capture(run: Run) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    for path in [*run.sr.iterdir(), *run.seg.iterdir(), *run.sc.iterdir()]:
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}:\n" + "\n".join(errors)


def test_no_result_carries_a_header_value_the_standard_does_not_require_there(run: Run) -> None:
    for path in [*run.sr.iterdir(), *run.seg.iterdir(), *run.sc.iterdir()]:
        data = path.read_bytes()
        assert b"SOURCE-ONLY" not in data and b"SOURCEONLY" not in data, path.name
        result = pydicom.dcmread(path, stop_before_pixels=True)
        assert "PatientComments" not in result and "InstitutionName" not in result
        assert result.Manufacturer == "cascade"


def test_sr_without_its_seg_references_the_source_only_and_bad_inputs_are_refused(
    run: Run, tmp_path: Path
) -> None:
    model = Cascade.from_pretrained(run.model_dir, device="cpu", precision="fp32")
    preds = {p.image_id: p for p in model.predict_many(sorted(run.images.glob("*.dcm")), workers=0)}
    positive, negative = preds[run.positive], preds[run.negative]
    assert positive.positive and not negative.positive
    assert positive.model is not None and positive.model.weights_sha256 == _weights_sha256(run.model_dir)

    changed = Thresholds(cls=0.9, top=0.0, area=0.0, bottom=0.5, min_component=0.0)
    assert positive.model.tuned_for.startswith("highest mean Dice on 12 validation images")
    model.thresholds = changed  # the identity follows the thresholds in use; what they were tuned for no longer holds
    assert (model.identity.thresholds, model.identity.tuned_for) == (changed, "")
    assert model.identity.weights_sha256 == positive.model.weights_sha256

    # --dicom-sr alone: the positive's SR is a whole-image group, no SEG referenced
    written = write_all([positive, negative], {"dicom-sr": DicomSrWriter(tmp_path)})
    assert [w.wrote for w in written] == [("dicom-sr",), ("dicom-sr",)]
    document = pydicom.dcmread(tmp_path / f"{run.positive}.sr.dcm")
    assert len(document.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence) == 1

    seg = segmentation(positive)
    assert report(positive, seg).CurrentRequestedProcedureEvidenceSequence  # produced together: fine
    with pytest.raises(CascadeError, match="not this positive image's segmentation"):
        report(negative, seg)
    failed = Cascade.from_pretrained(run.model_dir, device="cpu", precision="fp32")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" * 100)
    (bad,) = failed.predict_many([broken], workers=0)
    with pytest.raises(CascadeError, match="failed"):
        report(bad)
    assert write_all([bad], {"dicom-sr": DicomSrWriter(tmp_path / "none")})[0].wrote == ()
    with pytest.raises(CascadeError, match="DICOM source"):
        report(model.predict(np.full((64, 64), 0.5, dtype=np.float32)))
