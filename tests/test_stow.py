"""STOW-RS and the audit trail of `cascade serve` (issue 26): a real ``cascade serve --results-dir --audit-log``
process on a free loopback port, fed ``multipart/related`` bodies of the real SIIM samples and malformed ones; its
decisions are ``Cascade.predict``'s, its results are on disk, and its audit log tells which model made each finding
without holding any UID or patient value."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from conftest import make_model_dir  # noqa: E402
from robust_helpers import serve_process  # noqa: E402

from cascade import __version__  # noqa: E402
from cascade.cli.main import main  # noqa: E402
from cascade.inference.pipeline import Cascade, Prediction  # noqa: E402
from cascade.storage.audit import AuditLog, read_audit  # noqa: E402
from cascade.storage.modeldir import read_model_dir  # noqa: E402
from cascade.thresholds.rule import Thresholds  # noqa: E402

THRESHOLDS = Thresholds(cls=0.504, top=0.0, area=0.0, bottom=0.68, min_component=0.0)
"""As in tests/test_serve.py: with the tiny networks of ``make_model_dir`` some SIIM samples are positive."""
TOKEN = "stow-token-0123456789abcdef-0123"
LIMIT_MB = 3
"""--max-upload-mb: the 11 samples (1.8 MB) fit in one body."""
BOUNDARY = "cascade-stow-test-boundary"
RELATED = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
FAILED, REFERENCED, REASON = "00081198", "00081199", "00081197"


@dataclass
class Server:
    base: str
    results: Path
    audit: Path
    log: Path

    def stow(self, body: bytes, content_type: str = RELATED, path: str = "/dicomweb/studies",
             token: str | None = TOKEN) -> httpx.Response:
        headers = {"content-type": content_type, **({"authorization": f"Bearer {token}"} if token else {})}
        return httpx.post(self.base + path, content=body, headers=headers, timeout=60)


def related(*parts: bytes, part_type: str = "application/dicom") -> bytes:
    """A multipart/related body of ``parts``, each with its Content-Type."""
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n" for part in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("stow") / "model", THRESHOLDS)


@pytest.fixture(scope="module")
def samples(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))


@pytest.fixture(scope="module")
def reference(model_dir: Path, samples: list[Path]) -> dict[str, Prediction]:
    """``Cascade.predict`` on each file, run as the server runs (fp32, torch): its decisions are the standard."""
    model = Cascade.from_pretrained(model_dir, device="cpu", precision="fp32", backend="torch")
    return {path.stem: model.predict(path) for path in samples}


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("stow-serve")
    (folder / "token").write_text(TOKEN)
    (folder / "results").mkdir()
    with serve_process(model_dir, folder, "--token-file", folder / "token", "--max-upload-mb", LIMIT_MB,
                       "--max-batch", 4, "--results-dir", folder / "results", "--audit-log",
                       folder / "audit.jsonl") as proc:
        yield Server(proc.base, folder / "results", folder / "audit.jsonl", proc.log)


def references(answer: dict, key: str) -> list[tuple[str | None, str | None]]:
    """(SOP Class UID, SOP Instance UID) of each item of a store response's sequence ``key``."""
    return [tuple((item[tag].get("Value") or [None])[0] for tag in ("00081150", "00081155"))
            for item in answer.get(key, {}).get("Value", [])]


def sr_decision(path: Path) -> tuple[bool, bool]:
    """(pneumothorax present, the SR references a SEG) read from an SR file."""
    sr = pydicom.dcmread(path)
    values = {str(e.value) for e in sr.iterall() if e.VR in ("CS", "LO", "UI", "UT")}
    assert ("Present" in values) != ("Absent" in values)
    return "Present" in values, SEG_CLASS in values


def test_stow_of_the_real_samples_gives_cascade_predicts_decisions(
    server: Server, samples: list[Path], reference: dict[str, Prediction]
) -> None:
    response = server.stow(related(*(path.read_bytes() for path in samples)))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    answer = response.json()
    assert FAILED not in answer
    headers = {path.stem: pydicom.dcmread(path, stop_before_pixels=True) for path in samples}
    assert sorted(references(answer, REFERENCED)) == sorted(
        (h.SOPClassUID, h.SOPInstanceUID) for h in headers.values())
    decisions = set()
    for stem, header in headers.items():
        study = server.results / header.StudyInstanceUID
        positive = reference[stem].positive
        assert sr_decision(study / f"{stem}.sr.dcm") == (positive, positive)
        assert (study / f"{stem}.seg.dcm").exists() == positive
        if positive:
            seg = pydicom.dcmread(study / f"{stem}.seg.dcm")
            assert (seg.pixel_array.astype(bool) == reference[stem].mask).mean() > 0.9999
        decisions.add(positive)
    assert decisions == {True, False}, "the samples give both decisions"


def test_stow_into_a_study_fails_other_studies_and_non_dicom_parts(server: Server, samples: list[Path]) -> None:
    first, second = (pydicom.dcmread(p, stop_before_pixels=True) for p in samples[:2])
    body = related(samples[0].read_bytes(), samples[1].read_bytes(), b"plain text, not DICOM")
    response = server.stow(body, path=f"/dicomweb/studies/{first.StudyInstanceUID}")
    assert response.status_code == 202, response.text
    answer = response.json()
    assert references(answer, REFERENCED) == [(first.SOPClassUID, first.SOPInstanceUID)]
    failed = answer[FAILED]["Value"]
    assert references(answer, FAILED) == [(second.SOPClassUID, second.SOPInstanceUID), (None, None)]
    assert [item[REASON] for item in failed] == [{"vr": "US", "Value": [0xA900]}, {"vr": "US", "Value": [0xC000]}]


@pytest.mark.parametrize(
    ("name", "body", "content_type", "token", "status", "reason"),
    [
        ("no token", lambda d: related(d), RELATED, None, 401, "token"),
        ("a single application/dicom body", lambda d: d, "application/dicom", TOKEN, 415, "multipart/related"),
        ("parts of another type", lambda d: related(d), RELATED.replace("application/dicom", "application/dicom+json"),
         TOKEN, 415, "multipart/related"),
        ("no boundary", lambda d: related(d), 'multipart/related; type="application/dicom"', TOKEN, 400, "boundary"),
        ("a boundary of 71 characters", lambda d: related(d), RELATED.replace(BOUNDARY, "b" * 71), TOKEN, 400,
         "boundary"),
        ("no closing boundary", lambda d: related(d)[:-40], RELATED, TOKEN, 400, "closing"),
        ("no part", lambda d: f"--{BOUNDARY}--\r\n".encode(), RELATED, TOKEN, 400, "no part"),
        ("headers without an end", lambda d: f"--{BOUNDARY}\r\n".encode() + b"X-A: b\r\n" * 2000 + b"\r\n--"
         + f"{BOUNDARY}--".encode(), RELATED, TOKEN, 400, "headers"),
        ("300 parts", lambda d: related(*[b"x"] * 300), RELATED, TOKEN, 400, "256"),
        ("over the size limit", lambda d: related(b"\0" * (LIMIT_MB << 20)), RELATED, TOKEN, 413, "limit"),
    ],
)
def test_bad_requests_get_the_right_error_and_the_next_request_works(
    server: Server, samples: list[Path], name: str, body, content_type: str, token: str | None,  # noqa: ANN001
    status: int, reason: str,
) -> None:
    response = server.stow(body(samples[2].read_bytes()), content_type, token=token)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert reason in error and "\n" not in error
    good = server.stow(related(samples[3].read_bytes()))
    assert good.status_code == 200 and len(good.json()[REFERENCED]["Value"]) == 1


def test_only_non_dicom_parts_fail_all_with_409(server: Server, samples: list[Path]) -> None:
    response = server.stow(related(b"\0" * 1000, samples[0].read_bytes()[:500], b"not DICOM", part_type="text/plain"))
    assert response.status_code == 409, response.text
    assert [item[REASON]["Value"] for item in response.json()[FAILED]["Value"]] == [[0xC000]] * 3
    assert server.stow(related(samples[4].read_bytes())).status_code == 200


def test_the_audit_log_says_which_model_made_each_finding_and_holds_no_identifier(
    server: Server, model_dir: Path, samples: list[Path], reference: dict[str, Prediction]
) -> None:
    positive = next(p for p in samples if reference[p.stem].positive)
    headers = {"content-type": "application/dicom", "authorization": f"Bearer {TOKEN}"}
    for format in ("json", "sr", "seg"):
        answer = httpx.post(f"{server.base}/v1/predict?format={format}", content=positive.read_bytes(),
                            headers=headers, timeout=60)
        assert answer.status_code == 200
    assert server.stow(related(*(path.read_bytes() for path in samples))).status_code == 200

    records = read_audit(server.audit)
    digest = read_model_dir(model_dir).weights_sha256
    findings: dict[str, set[tuple[str, str]]] = {}
    for record in records:
        assert record["time"].endswith("+00:00") and record["peer"] == "127.0.0.1"
        if record["event"] == "result" and record.get("decision") == "positive":
            model = record["model"]
            findings.setdefault(record["instance"], set()).add((model["version"], model["weights_sha256"]))
    expected = {hashlib.sha256(stem.encode()).hexdigest() for stem, pred in reference.items() if pred.positive}
    assert set(findings) == expected, "every positive the service sent is found in the log by its UID's hash"
    assert all(made == {(__version__, digest)} for made in findings.values())
    sent = {(r["sent"], r["status"]) for r in records if r["event"] == "result" and r["instance"] == _hash(positive)}
    assert {("json", 200), ("sr", 200), ("seg", 200), ("stow", 200)} <= sent
    received = [r for r in records if r["event"] == "received"]
    assert {r["via"] for r in received} == {"predict", "stow"} and all(r["bytes"] > 0 for r in received)
    failed = [r for r in records if r.get("failure")]
    assert {r["failure"] for r in failed} >= {"C000"} and all(r["status"] == 409 for r in failed)

    text = server.audit.read_text()
    for path in samples:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName",
                        "AccessionNumber"):
            value = str(header.get(keyword) or "")
            assert not value or value not in text, f"{keyword} is in the audit log"
    assert TOKEN not in text and oct(server.audit.stat().st_mode)[-3:] == "600"


def _hash(path: Path) -> str:
    return hashlib.sha256(path.stem.encode()).hexdigest()


def test_audit_log_survives_a_cut_last_line_and_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(json.dumps({"time": "t", "event": "received"}).encode() + b"\n{\"time\": \"t\", \"ev")
    log = AuditLog(path)

    def write(n: int) -> None:
        for i in range(50):
            log.record(event="result", writer=n, index=i)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    records = read_audit(path)
    assert records[0] == {"time": "t", "event": "received"} and len(records) == 1 + 8 * 50
    assert sorted((r["writer"], r["index"]) for r in records[1:]) == [(n, i) for n in range(8) for i in range(50)]
    path.write_bytes(b"x" * (2 << 20))
    with pytest.raises(ValueError, match="not an audit log"):
        AuditLog(path)


def test_command_line_refuses_a_missing_results_folder(model_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(model_dir), "--results-dir", str(tmp_path / "missing")]) == 2
    assert "results folder does not exist" in capsys.readouterr().err
