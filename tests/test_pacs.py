"""`cascade listen` against a real PACS: Orthanc with its DICOMweb plugin, configured exactly as the README says
(started once for the module on free loopback ports). Images routed to the node by Orthanc come back as a DICOM SR
(every image) and a SEG (positives) in their own study, by DIMSE and by STOW-RS; a study with one positive and one
negative image is HIGH; results made while Orthanc is down wait in the outboxes and reach it when it is back, with
the node running and across a node restart; the audit trail tells which model made each finding.
"""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from cascade.apps.listen import Destination, Node
from cascade.inference.pipeline import Cascade, Prediction
from cascade.storage.audit import instance_hash, read_audit
from listen_helpers import Orthanc, findings, free_port, require, store, wait_findings, wait_for
from test_listen import expected, model_dir, samples  # noqa: F401  (module fixtures, shared)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc routing CR/DX to a node on ``orthanc.node_port`` (the README's Lua), its DICOMweb plugin on."""
    folder = tmp_path_factory.mktemp("orthanc")
    node_port = free_port()
    peer = Orthanc(folder, node_port)
    peer.node_port = node_port
    peer.start()
    yield peer
    peer.stop()


def same_study(negative: Path, positive: Path, folder: Path) -> Path:
    """A copy of ``negative`` filed in ``positive``'s study and patient (new SOP and series UIDs)."""
    ds = pydicom.dcmread(negative)
    other = pydicom.dcmread(positive, stop_before_pixels=True)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber"):
        setattr(ds, keyword, other.get(keyword, ""))
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    return path


def worklist(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "worklist.csv", newline="", encoding="utf-8") as f:
        return {r["StudyInstanceUID"]: r for r in csv.DictReader(f)}


def test_orthanc_routes_by_dimse_and_gets_an_sr_per_image_and_a_seg_per_positive_in_the_study(
    orthanc: Orthanc, model_dir: Path, samples: list[Path], expected: dict[str, Prediction],  # noqa: F811
    tmp_path: Path,
) -> None:
    storescu = require("storescu")
    positive = next(p for p in samples if expected[p.stem].positive)
    negative = next(p for p in samples if not expected[p.stem].positive)
    folder = tmp_path / "send"
    folder.mkdir()
    for path in (positive, negative):
        (folder / path.name).write_bytes(path.read_bytes())
    partner = same_study(negative, positive, folder)  # negative, in the positive's study
    study = str(pydicom.dcmread(positive, stop_before_pixels=True).StudyInstanceUID)
    lone = str(pydicom.dcmread(negative, stop_before_pixels=True).StudyInstanceUID)
    out = tmp_path / "node"
    node = Node(Cascade.from_pretrained(model_dir, device="cpu"), out, port=orthanc.node_port,
                forward=Destination("ORTHANC", "127.0.0.1", orthanc.dicom_port), accept_from=["ORTHANC"])
    node.start()
    try:
        sent = subprocess.run([storescu, "-xy", "-aet", "STORESCU", "-aec", "ORTHANC", "127.0.0.1",
                               str(orthanc.dicom_port), "+sd", str(folder)], capture_output=True, text=True,
                              timeout=60)
        assert sent.returncode == 0, sent.stderr
        rows = {r["ImageId"]: r for r in wait_findings(out, 3)}
        # Orthanc's REST API: the two-image study holds its images, two SRs and one SEG; the lone negative an SR
        wait_for(lambda: orthanc.study_modalities(study).count("SR") == 2 and "SEG" in orthanc.study_modalities(study),
                 60, "the SRs and the SEG in the study")
        wait_for(lambda: "SR" in orthanc.study_modalities(lone), 30, "the negative's SR in its study")
        assert orthanc.study_modalities(lone).count("SR") == 1 and "SEG" not in orthanc.study_modalities(lone)
        assert sorted(m for m in orthanc.study_modalities(study) if m in ("SR", "SEG")) == ["SEG", "SR", "SR"]
        wait_for(lambda: node.outbox_waiting == 0, 30, "the outbox to empty")
        waiting = worklist(out)
    finally:
        node.stop()
    assert rows[positive.stem]["StudyInstanceUID"] == rows[partner.stem]["StudyInstanceUID"] == study
    assert rows[positive.stem]["sr"] and rows[positive.stem]["seg"] and not rows[partner.stem]["seg"]
    assert rows[partner.stem]["sr"] and rows[negative.stem]["sr"]
    sr = pydicom.dcmread(out / rows[positive.stem]["sr"])
    seg = pydicom.dcmread(out / rows[positive.stem]["seg"])
    assert sr.Modality == "SR" and sr.StudyInstanceUID == study
    assert seg.SOPInstanceUID in {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                                  for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert waiting[study]["priority"] == "HIGH" and waiting[study]["images"] == "2"
    assert waiting[study]["positives"] == "1" and waiting[lone]["priority"] == "ROUTINE"
    assert list(waiting)[0] == study  # HIGH first
    assert {rows[positive.stem]["study_priority"], rows[partner.stem]["study_priority"]} >= {"HIGH"}
    # the audit trail: which model made each finding, and where each result went
    records = read_audit(out / "audit.jsonl")
    analysed = {r["instance"]: r for r in records if r["event"] == "analysed"}
    for uid in rows:
        assert analysed[instance_hash(uid)]["model"]["weights_sha256"] == rows[uid]["model"] != ""
    received = [r for r in records if r["event"] == "received"]
    assert {r["peer"]["ae_title"] for r in received} == {"ORTHANC"} and len(received) == 3
    sent_ok = [r for r in records if r["event"] == "sent" and r["outcome"] == "stored"]
    assert sorted(r["result"] for r in sent_ok) == ["seg", "sr", "sr", "sr"]
    assert all(r["via"] == "dimse" and r["destination"].startswith("ORTHANC@") for r in sent_ok)
    text = (out / "audit.jsonl").read_text()
    assert study not in text and not any(uid in text for uid in rows)


def test_stow_rs_and_dimse_deliver_despite_orthanc_outages(
    orthanc: Orthanc, model_dir: Path, samples: list[Path], expected: dict[str, Prediction],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Results sent by STOW-RS arrive; with Orthanc down they wait in both outboxes and reach it once it is back,
    first with the node running (back-off), then across a node restart."""
    positives = [p for p in samples if expected[p.stem].positive]
    negatives = [p for p in samples if not expected[p.stem].positive]
    out = tmp_path / "node"
    forward = Destination("ORTHANC", "127.0.0.1", orthanc.dicom_port)

    def start() -> Node:
        node = Node(Cascade.from_pretrained(model_dir, device="cpu"), out, port=0, forward_stow=orthanc.stow_url,
                    forward=forward, retry_max=1.0)
        node.start()
        return node

    def arrived(path: Path) -> bool:
        study = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        return "SR" in orthanc.study_modalities(study)

    node = start()
    try:
        store(node.address[1], [positives[2], negatives[2]])
        wait_findings(out, 2)
        wait_for(lambda: all(arrived(p) for p in (positives[2], negatives[2])), 30, "results by STOW-RS")
        wait_for(lambda: node.outbox_waiting == 0, 30, "both outboxes to empty")

        orthanc.stop()
        store(node.address[1], [positives[3], negatives[3]])
        wait_findings(out, 4)
        assert (out / "outbox-stow" / "sr" / negatives[3].name).exists()
        assert (out / "outbox" / "seg" / positives[3].name).exists()
        orthanc.start()
        wait_for(lambda: node.outbox_waiting == 0, 30, "the outboxes to be sent once Orthanc is back")

        orthanc.stop()
        store(node.address[1], [positives[4]])
        wait_findings(out, 5)
        node.stop()
        kept = sorted(p.relative_to(out).as_posix() for p in out.glob("outbox*/*/*.dcm"))
        assert kept == sorted(f"{box}/{kind}/{positives[4].name}" for box in ("outbox", "outbox-stow")
                              for kind in ("seg", "sr"))
        orthanc.start()
        node = start()
        wait_for(lambda: not list(out.glob("outbox*/*/*.dcm")), 30, "the outboxes to be sent after the restart")
    finally:
        node.stop()
        if orthanc.proc is None:
            orthanc.start()
    for path in (*positives[2:5], *negatives[2:4]):
        assert arrived(path)
        study = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        assert ("SEG" in orthanc.study_modalities(study)) == expected[path.stem].positive
    records = read_audit(out / "audit.jsonl")
    stow = [r for r in records if r["event"] == "sent" and r["via"] == "stow"]
    assert stow and all(r["destination"] == orthanc.stow_url and r["outcome"] == "stored" for r in stow)
    assert sorted(r["result"] for r in stow) == sorted(["seg", "sr"] * 3 + ["sr"] * 2)
    assert len(findings(out)) == 5
