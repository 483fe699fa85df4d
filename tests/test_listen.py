"""`cascade listen` with real components on loopback: pynetdicom's SCU and dcmtk's storescu/echoscu send the real
SIIM sample DICOMs to the node, which must answer exactly what `Cascade.predict_many` answers, write an SR for every
analysed image and a SEG for every positive, and lose nothing and repeat nothing across faults (Orthanc as the
PACS: tests/test_pacs.py).

The tiny random model's classifier threshold is set between the 5th and 6th highest probabilities of the 11 samples,
so some real images come out positive and some negative.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from cascade.apps.listen import COLUMNS, COLUMNS_V1, Destination, Node
from cascade.errors import ConfigError
from cascade.inference.pipeline import Cascade, Prediction
from cascade.thresholds.rule import Thresholds
from conftest import make_model_dir
from listen_helpers import NodeProcess, copies, findings, require, store, wait_findings, wait_for


@pytest.fixture(scope="module")
def samples(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, samples: list[Path]) -> Path:
    root = tmp_path_factory.mktemp("listen-model")
    opened = Cascade.from_pretrained(make_model_dir(root / "open"), device="cpu")
    probs = sorted(p.probability for p in opened.predict_many(samples, workers=0))
    gate = Thresholds(cls=(probs[5] + probs[6]) / 2, top=0.0, area=0.0, bottom=0.5, min_component=0.0)
    return make_model_dir(root / "mixed", gate)


@pytest.fixture(scope="module")
def expected(model_dir: Path, samples: list[Path]) -> dict[str, Prediction]:
    """What the library answers for each sample (by SOP Instance UID = file stem): the node must agree."""
    model = Cascade.from_pretrained(model_dir, device="cpu")
    answers = {p.image_id: p for p in model.predict_many(samples, workers=0)}
    positives = sum(p.positive for p in answers.values())
    assert 3 <= positives <= len(samples) - 3, "the fixture needs positives and negatives"
    return answers


def start_node(model_dir: Path, out: Path, **options) -> Node:
    node = Node(Cascade.from_pretrained(model_dir, device="cpu"), out, port=0, **options)
    node.start()
    return node


def check_findings(out: Path, rows: list[dict[str, str]], expected: dict[str, Prediction]) -> None:
    """Each row agrees with the library's answer; each positive has its SEG, in the source's study."""
    ids = [r["ImageId"] for r in rows]
    assert len(ids) == len(set(ids)), "an image has two findings"
    for row in rows:
        pred = expected[row["ImageId"]]
        assert row["error"] == ""
        assert math.isclose(float(row["probability"]), pred.probability, abs_tol=1e-6)
        assert row["positive"] == str(int(pred.positive))
        assert row["priority"] == ("HIGH" if pred.positive else "ROUTINE")
        assert row["EncodedPixels"] == pred.rle
        assert row["received"] <= row["finished"]
        assert row["StudyInstanceUID"] == pred.header.StudyInstanceUID
        sr = pydicom.dcmread(out / row["sr"])
        assert sr.Modality == "SR" and sr.StudyInstanceUID == pred.header.StudyInstanceUID
        if pred.positive:
            seg = pydicom.dcmread(out / row["seg"])
            assert seg.Modality == "SEG" and seg.StudyInstanceUID == pred.header.StudyInstanceUID
            ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
            assert ref.ReferencedSOPInstanceUID == row["ImageId"]
        else:
            assert row["seg"] == "" and not (out / "seg" / f"{row['ImageId']}.dcm").exists()


def identifiers(paths: list[Path]) -> set[str]:
    """Header values that must never reach a log: UIDs and patient identifiers of the images sent."""
    values = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        values |= {str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.PatientID)}
        values |= {str(ds.get("PatientName", "")), str(ds.get("AccessionNumber", ""))} - {""}
    return values


def test_pynetdicom_scu_gets_the_library_answers_segs_and_clean_logs(
    model_dir: Path, samples: list[Path], expected: dict[str, Prediction], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    node = start_node(model_dir, tmp_path)
    try:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title="SCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.address[1], ae_title="CASCADE")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        assert store(node.address[1], samples) == [0] * len(samples)
        rows = wait_findings(tmp_path, len(samples))
        check_findings(tmp_path, rows, expected)
        assert {r["ImageId"] for r in rows} == set(expected)
        wait_for(lambda: not list((tmp_path / "incoming").iterdir()), 10, "incoming/ to empty")
        # a copy received again is acknowledged, never analysed or recorded twice
        assert store(node.address[1], samples[:2]) == [0, 0]
    finally:
        node.stop()
    assert len(findings(tmp_path)) == len(samples)
    text = caplog.text
    leaked = [v for v in identifiers(samples) if v in text]
    assert not leaked, "a header value reached the log"
    from cascade.apps.listen import uid_hash

    for uid, pred in expected.items():
        assert f"{uid_hash(uid)} {'positive' if pred.positive else 'negative'} " in text


def test_other_sop_classes_and_unknown_callers_are_refused(model_dir: Path, samples: list[Path],
                                                           tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import BasicTextSRStorage, ComputedRadiographyImageStorage, EncapsulatedPDFStorage

    node = start_node(model_dir, tmp_path, accept_from=["PACS"])
    port = node.address[1]
    try:
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assert ae.associate("127.0.0.1", port, ae_title="CASCADE").is_rejected

        ae = AE(ae_title="PACS")
        for sop_class in (BasicTextSRStorage, EncapsulatedPDFStorage, ComputedRadiographyImageStorage):
            ae.add_requested_context(sop_class)
        assoc = ae.associate("127.0.0.1", port, ae_title="CASCADE")
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        assert accepted == {ComputedRadiographyImageStorage}
        assert rejected == {BasicTextSRStorage, EncapsulatedPDFStorage}
        report = pydicom.dcmread(samples[0], stop_before_pixels=True)
        report.SOPClassUID = BasicTextSRStorage
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(report)
        assoc.release()
    finally:
        node.stop()
    assert findings(tmp_path) == []


def corrupt_copies(sample: Path) -> list[pydicom.Dataset]:
    """A JPEG payload that is not a JPEG, and native pixels shorter than the header says; new UIDs."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    garbage = pydicom.dcmread(sample)
    garbage.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(2000)])
    short = pydicom.dcmread(sample)
    short.decompress()
    short.PixelData = short.PixelData[: len(short.PixelData) // 2]
    for ds in (garbage, short):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return [garbage, short]


def test_corrupt_pixels_give_a_failure_finding_and_the_node_goes_on(
    model_dir: Path, samples: list[Path], expected: dict[str, Prediction], tmp_path: Path
) -> None:
    bad = corrupt_copies(samples[0])
    from pydicom.uid import generate_uid

    announced = str(generate_uid())  # a file whose dataset is another instance than the name it was stored under
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / f"{announced}.dcm").write_bytes(samples[2].read_bytes())
    node = start_node(model_dir, tmp_path)
    try:
        assert store(node.address[1], [*bad, samples[1]]) == [0, 0, 0]
        rows = {r["ImageId"]: r for r in wait_findings(tmp_path, 4)}
    finally:
        node.stop()
    assert "differs" in rows[announced]["error"] and rows[announced]["seg"] == rows[announced]["positive"] == ""
    for ds in bad:
        row = rows[str(ds.SOPInstanceUID)]
        assert row["probability"] == row["positive"] == row["seg"] == ""
        assert row["error"] and str(ds.SOPInstanceUID) not in row["error"]
    assert re.search("cannot decode|refused before decoding", rows[str(bad[0].SOPInstanceUID)]["error"])
    assert "shorter than the header" in rows[str(bad[1].SOPInstanceUID)]["error"]
    check_findings(tmp_path, [rows[samples[1].stem]], expected)
    assert not list((tmp_path / "incoming").iterdir())


def test_restart_after_a_kill_analyses_leftovers_once(
    model_dir: Path, samples: list[Path], expected: dict[str, Prediction], tmp_path: Path
) -> None:
    """The states a kill can leave, made exactly: A received but not analysed; B analysed and recorded but still in
    incoming/; C recorded by a line cut short. After a restart each has exactly one finding and B keeps its own."""
    a, b, c = samples[:3]
    node = start_node(model_dir, tmp_path)
    try:
        store(node.address[1], [b, c])
        wait_findings(tmp_path, 2)
    finally:
        node.stop()
    lines = (tmp_path / "findings.csv").read_text().splitlines(keepends=True)
    line_b = next(line for line in lines if line.startswith(b.stem))
    line_c = next(line for line in lines if line.startswith(c.stem))
    (tmp_path / "findings.csv").write_text(lines[0] + line_b + line_c[:40])
    for path in (a, b, c):
        (tmp_path / "incoming" / path.name).write_bytes(path.read_bytes())

    node = start_node(model_dir, tmp_path)
    try:
        rows = wait_findings(tmp_path, 3)
        wait_for(lambda: not list((tmp_path / "incoming").iterdir()), 30, "incoming/ to empty")
    finally:
        node.stop()
    rows = findings(tmp_path)
    assert sorted(r["ImageId"] for r in rows) == sorted(p.stem for p in (a, b, c))
    assert (tmp_path / "findings.csv").read_text().endswith("\n")
    assert line_b in (tmp_path / "findings.csv").read_text()
    check_findings(tmp_path, rows, expected)


def test_a_foreign_findings_file_is_refused_untouched(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "findings.csv").write_text("ImageId,EncodedPixels\nx,-1")
    with pytest.raises(ConfigError, match="not a findings file"):
        start_node(model_dir, tmp_path)
    assert (tmp_path / "findings.csv").read_text() == "ImageId,EncodedPixels\nx,-1"
    assert Destination.parse("ORTHANC@127.0.0.1:4242") == Destination("ORTHANC", "127.0.0.1", 4242)
    for bad in ("ORTHANC@host", "@h:1", "A@h:0", "WAY-TOO-LONG-AE-TITLE@h:1"):
        with pytest.raises(ConfigError):
            Destination.parse(bad)
    assert COLUMNS[:5] == ("ImageId", "StudyInstanceUID", "probability", "positive", "priority")


def test_a_first_version_findings_file_is_upgraded_atomically(model_dir: Path, samples: list[Path],
                                                              tmp_path: Path) -> None:
    """A findings.csv of the first version (no study, SR or model columns) keeps its findings under the new
    columns; its images are not analysed again, new ones are."""
    old = ",".join(COLUMNS_V1) + "\n" + f"{samples[0].stem},0.9,1,HIGH,1 2,2025-01-01T00:00:00.000+00:00," \
        f"2025-01-01T00:00:01.000+00:00,seg/{samples[0].name},\n" + "1.2.3,0.1,0,ROU"  # a cut last line
    (tmp_path / "findings.csv").write_text(old)
    node = start_node(model_dir, tmp_path)
    try:
        assert store(node.address[1], samples[:2]) == [0, 0]
        rows = wait_findings(tmp_path, 2)
    finally:
        node.stop()
    assert (tmp_path / "findings.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert [r["ImageId"] for r in rows] == [samples[0].stem, samples[1].stem]  # the first kept, not analysed again
    assert rows[0]["probability"] == "0.9" and rows[0]["study_priority"] == "HIGH" and rows[0]["sr"] == ""
    assert rows[1]["sr"] and rows[1]["StudyInstanceUID"]


def test_dcmtk_storescu_and_echoscu_against_the_cli(
    model_dir: Path, samples: list[Path], expected: dict[str, Prediction], tmp_path: Path
) -> None:
    storescu = require("storescu")
    out = tmp_path / "node"
    synthetic = tmp_path / "model"  # the same networks, recorded as trained on cascade synth films: the node says so
    shutil.copytree(model_dir, synthetic)
    manifest = json.loads((synthetic / "cascade.json").read_text())
    manifest["metrics"]["training_data"] = {"synthetic": True}
    (synthetic / "cascade.json").write_text(json.dumps(manifest))
    node = NodeProcess(synthetic, out, tmp_path / "node.log", "--ae-title", "TRIAGE")
    try:
        echo = subprocess.run([require("echoscu"), "-aec", "TRIAGE", "127.0.0.1", str(node.port)],
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        sent = subprocess.run([storescu, "-xy", "-aec", "TRIAGE", "127.0.0.1", str(node.port), "+sd",
                               str(samples[0].parent)], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        assert node.terminate() == 0  # at once, mid-queue: the node drains what it acknowledged, then exits
    finally:
        node.close()
    rows = findings(out)
    assert sorted(r["ImageId"] for r in rows) == sorted(expected)
    check_findings(out, rows, expected)
    log = (tmp_path / "node.log").read_text()
    assert not [v for v in identifiers(samples) if v in log], "a header value reached the log"
    assert "stopped; 11 finding(s)" in log
    assert "warning: this model was trained on synthetic films (cascade synth) only" in log
    assert re.search(r"listening on 127\.0\.0\.1:\d+ \(device cpu, (fp32|bf16) on (onnxruntime|torch),", log), log


@pytest.mark.slow
def test_kill_then_restart_then_sigterm_mid_queue_give_one_finding_each(
    model_dir: Path, samples: list[Path], expected: dict[str, Prediction], tmp_path: Path
) -> None:
    """A real SIGKILL right after storescu is answered (the queue still full), a restart, more images and SIGTERM
    mid-queue: every image acknowledged has exactly one finding, its own (~45 s on two loaded cores)."""
    storescu = require("storescu")
    first, second = copies(samples, tmp_path / "first", 16), copies(samples, tmp_path / "second", 8)
    out, log = tmp_path / "node", tmp_path / "node.log"

    def push(folder: Path, port: int) -> None:
        sent = subprocess.run([storescu, "-xy", "-aec", "CASCADE", "127.0.0.1", str(port), "+sd", str(folder)],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr

    node = NodeProcess(model_dir, out, log, "--batch-size", "4")
    try:
        push(tmp_path / "first", node.port)
        node.kill()  # every image was acknowledged: each must survive the kill
        node = NodeProcess(model_dir, out, log, "--batch-size", "4")
        push(tmp_path / "second", node.port)
        assert node.terminate() == 0  # SIGTERM drains what was acknowledged, leftovers of the kill included
    finally:
        node.close()
    rows = findings(out)
    made = first | second
    assert sorted(r["ImageId"] for r in rows) == sorted(made)
    for row in rows:  # each copy got its own source's answer: nothing mixed up across the kill
        assert math.isclose(float(row["probability"]), expected[made[row["ImageId"]].stem].probability, abs_tol=1e-6)
    assert not list((out / "incoming").iterdir())


def test_the_worklist_puts_high_first_and_promotes_a_routine_study_past_the_cap(tmp_path: Path) -> None:
    from cascade.apps.listen import Worklist

    worklist = Worklist(tmp_path / "worklist.csv", max_routine_wait=30)
    now = 1_700_000_000.0
    worklist.add("1.1", now - 40 * 60, positive=False, failed=False)  # routine, waited 40 min: promoted
    worklist.add("1.2", now - 5 * 60, positive=False, failed=False)
    worklist.add("1.2", now - 2 * 60, positive=True, failed=False)  # one positive image: the study is HIGH
    worklist.add("1.3", now - 20 * 60, positive=False, failed=True)  # routine, within the cap
    worklist.write(now)
    rows = list(csv.DictReader(open(tmp_path / "worklist.csv", encoding="utf-8")))
    assert [(r["StudyInstanceUID"], r["priority"], r["promoted"]) for r in rows] == [
        ("1.1", "HIGH", "yes"), ("1.2", "HIGH", "no"), ("1.3", "ROUTINE", "no")]
    assert rows[1]["images"] == "2" and rows[1]["positives"] == "1" and rows[2]["failed"] == "1"
    assert rows[0]["waited_minutes"] == "40.0"
    assert not list(tmp_path.glob(".*.tmp"))
    uncapped = Worklist(tmp_path / "w2.csv", max_routine_wait=None)
    uncapped.add("1.1", now - 600 * 60, positive=False, failed=False)
    assert [e.promoted for e in uncapped.entries(now)] == [False]
