"""`cascade serve`: the real ASGI app on the real SIIM sample DICOMs with a tiny real model, every bad input, the token,
micro-batching, the DICOM SEG and PNG answers, and the command line (a real uvicorn process on a loopback port)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from fastapi.testclient import TestClient  # noqa: E402

import cascade.apps.serve.app as serve_app  # noqa: E402
from cascade import __version__  # noqa: E402
from cascade.apps.serve import create_app  # noqa: E402
from cascade.cli.main import main  # noqa: E402
from cascade.data.rle import rle_decode  # noqa: E402
from cascade.inference.pipeline import Cascade, Prediction, native_map, predict_probabilities  # noqa: E402
from cascade.inference.runtime import Runtime  # noqa: E402
from cascade.storage.modeldir import read_model_dir  # noqa: E402
from cascade.thresholds.rule import Thresholds  # noqa: E402
from conftest import make_model_dir  # noqa: E402

CPU = Runtime.resolve("cpu")

THRESHOLDS = Thresholds(cls=0.504, top=0.0, area=0.0, bottom=0.68, min_component=0.0)
"""With the tiny networks of ``make_model_dir``: 6 of the 11 SIIM samples pass the gate, masks cover 1-20%."""
POSITIVE = "1.2.276.0.7230010.3.1.4.8323329.4904.1517875185.355709"
"""A real SIIM positive (labelled so) that the tiny model also calls positive."""
LIMIT_MB = 1
DICOM = {"content-type": "application/dicom"}
TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve") / "model", THRESHOLDS)


@pytest.fixture(scope="module")
def samples(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))


@pytest.fixture(scope="module")
def reference(model_dir: Path, samples: list[Path]) -> dict[str, Prediction]:
    """``Cascade.predict`` on each file: what every answer of the service must equal."""
    model = Cascade.from_pretrained(model_dir, runtime=CPU)
    return {path.stem: model.predict(path) for path in samples}


def wait_ready(get, timeout: float = 60.0) -> None:  # noqa: ANN001 - a client's get
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get("/healthz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"the service was not ready within {timeout} s")


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    app = create_app(model_dir, runtime=CPU, max_upload_mb=LIMIT_MB, batch_window_ms=50, max_batch=8)
    with TestClient(app) as test_client:
        wait_ready(test_client.get)
        yield test_client


@pytest.fixture(scope="module")
def seg_maps(model_dir: Path, samples: list[Path]) -> dict[str, np.ndarray]:
    """Each sample's segmenter map at its native size, one image per forward (where the rule is applied)."""
    probs = predict_probabilities([model_dir / "classifier"], [model_dir / "segmenter"], samples, batch_size=1,
                                  workers=0, runtime=Runtime.resolve("cpu"))
    return {p.image_id: native_map(p) for p in probs}


def assert_equivalent(answer: dict, pred: Prediction, seg_map: np.ndarray) -> None:
    """The answer of a batched forward: the same as ``predict`` but for float rounding of the batched convolutions
    (about 1e-7): the probability within 1e-6, mask pixels different only where the map is within 1e-5 of the
    mask threshold."""
    assert answer["image_id"] == pred.image_id and answer["positive"] == pred.positive
    assert abs(answer["probability"] - pred.probability) <= 1e-6
    mask = rle_decode(answer["rle"], answer["height"], answer["width"])
    differ = mask != pred.mask
    assert np.all(np.abs(seg_map[differ] - THRESHOLDS.bottom) < 1e-5), "only pixels at the threshold may differ"
    assert differ.sum() <= 1e-4 * mask.size


def assert_same(answer: dict, pred: Prediction) -> None:
    assert answer["image_id"] == pred.image_id
    assert answer["probability"] == pred.probability
    assert answer["positive"] == pred.positive
    assert answer["rle"] == pred.rle
    assert answer["mask_pixels"] == int(pred.mask.sum())
    assert (answer["height"], answer["width"]) == pred.mask.shape


def test_json_answers_equal_cascade_predict_on_every_sample(
    client: TestClient, model_dir: Path, samples: list[Path], reference: dict[str, Prediction],
    caplog: pytest.LogCaptureFixture,
) -> None:
    info = client.get("/v1/model").json()
    digest = info["weights_sha256"]
    assert digest == read_model_dir(model_dir).weights_sha256 and info["version"] == __version__
    assert info["thresholds"] == THRESHOLDS.to_dict()
    assert info["stages"]["classifier"]["input_size"] == 64 and info["stages"]["segmenter"]["members"][0]["sha256"]
    decisions = set()
    with caplog.at_level(logging.INFO, logger="cascade.serve"):
        for path in samples:
            response = client.post("/v1/predict", content=path.read_bytes(), headers=DICOM)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert_same(answer, reference[path.stem])
            assert answer["thresholds"] == THRESHOLDS.to_dict()
            assert answer["model"] == {"name": "model", "version": __version__, "weights_sha256": digest}
            timing = answer["timing_ms"]
            assert set(timing) == {"decode", "queue", "classifier", "segmenter", "total"}
            assert timing["total"] >= timing["decode"] + timing["classifier"] > 0
            assert (timing["segmenter"] > 0) == (answer["probability"] >= THRESHOLDS.cls)
            decisions.add(answer["positive"])
    assert decisions == {True, False}, "the samples give both decisions"
    lines = [r.getMessage() for r in caplog.records if "/v1/predict" in r.getMessage()]
    assert len(lines) == len(samples)
    assert f"image={hashlib.sha256(samples[0].stem.encode()).hexdigest()[:12]}" in lines[0]
    assert not any(path.stem in line for line in lines for path in samples), "no identifier is logged"
    multipart = client.post("/v1/predict", files={"file": ("x.dcm", samples[0].read_bytes(), "application/dicom")})
    assert_same(multipart.json(), reference[samples[0].stem])


def test_concurrent_requests_share_forward_passes_and_answer_the_same(
    client: TestClient, samples: list[Path], reference: dict[str, Prediction], seg_maps: dict[str, np.ndarray]
) -> None:
    def post(path: Path) -> dict:
        response = client.post("/v1/predict", content=path.read_bytes(), headers=DICOM)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(len(samples)) as pool:
        answers = list(pool.map(post, samples))
    for path, answer in zip(samples, answers):
        assert_equivalent(answer, reference[path.stem], seg_maps[path.stem])
    assert max(a["batch_size"] for a in answers) > 1, "concurrent requests were stacked into one forward"
    metrics = client.get("/metrics").text
    assert 'cascade_requests_total{method="POST",route="/v1/predict",status="200"}' in metrics
    assert "cascade_batch_size_count" in metrics and "cascade_model_ready 1.0" in metrics


def test_seg_and_png_answers(client: TestClient, samples: list[Path], reference: dict[str, Prediction],
                             tmp_path: Path) -> None:
    source = next(p for p in samples if p.stem == POSITIVE)
    response = client.post("/v1/predict?format=seg", content=source.read_bytes(), headers=DICOM)
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    path = tmp_path / "seg.dcm"
    path.write_bytes(response.content)
    seg = pydicom.dcmread(path)
    src = pydicom.dcmread(source, stop_before_pixels=True)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "36118008"
    assert np.array_equal(seg.pixel_array.astype(bool), reference[POSITIVE].mask)
    if shutil.which("dciodvfy"):
        done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
        assert not [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]

    negative = next(p for p in samples if not reference[p.stem].positive)
    response = client.post("/v1/predict?format=seg", content=negative.read_bytes(), headers=DICOM)
    assert response.status_code == 204 and not response.content

    png = client.post("/v1/predict?format=png", content=source.read_bytes(), headers=DICOM)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (1024, 1024, 3)
    red = (image[..., 2] > 200) & (image[..., 1] < 60) & (image[..., 0] < 60)
    outline = cv2.dilate(reference[POSITIVE].mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert red.sum() > 100 and outline[red].mean() > 0.99, "the red outline follows the predicted mask"


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dicom3tools' validator prints for ``path`` (none when it is not installed)."""
    if not shutil.which("dciodvfy"):
        return []
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def test_sr_and_secondary_capture_answers(
    client: TestClient, samples: list[Path], reference: dict[str, Prediction], tmp_path: Path
) -> None:
    """?format=sr answers the SR of a positive (naming its SEG) and of a negative; ?format=sc the Secondary Capture
    of a positive and 204 for a negative; each names the model's version and digest."""
    digest = client.get("/v1/model").json()["weights_sha256"]
    positive = next(p for p in samples if p.stem == POSITIVE)
    negative = next(p for p in samples if not reference[p.stem].positive)
    for source, present in ((positive, "Present"), (negative, "Absent")):
        response = client.post("/v1/predict?format=sr", content=source.read_bytes(), headers=DICOM)
        assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
        assert "cascade-sr.dcm" in response.headers["content-disposition"]
        path = tmp_path / f"sr-{present}.dcm"
        path.write_bytes(response.content)
        sr = pydicom.dcmread(path)
        src = pydicom.dcmread(source, stop_before_pixels=True)
        assert sr.Modality == "SR" and sr.StudyInstanceUID == src.StudyInstanceUID
        values = {str(element.value) for element in sr.iterall() if element.VR in ("CS", "LO", "UI", "UT", "SH")}
        assert present in values and f"weights_sha256: {digest}" in values and sr.SoftwareVersions == __version__
        assert ("1.2.840.10008.5.1.4.1.1.66.4" in values) == (present == "Present"), "a positive's SR names its SEG"
        assert not dciodvfy_errors(path)
    response = client.post("/v1/predict?format=sc", content=positive.read_bytes(), headers=DICOM)
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    path = tmp_path / "sc.dcm"
    path.write_bytes(response.content)
    sc = pydicom.dcmread(path)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.BurnedInAnnotation == "YES"
    assert sc.Columns == 1024 and sc.Rows > 1024 and digest in str(sc.DerivationDescription)
    assert not dciodvfy_errors(path)
    response = client.post("/v1/predict?format=sc", content=negative.read_bytes(), headers=DICOM)
    assert response.status_code == 204 and not response.content and response.headers["x-cascade-positive"] == "false"


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def declares_2gb(data: bytes) -> bytes:
    """The real file with its pixel data element declaring 2 GiB: must fail at once, not allocate 2 GiB."""
    tag = bytes.fromhex("e07f1000") + b"OB" + b"\x00\x00"
    at = data.index(tag) + len(tag)
    return data[:at] + (2**31).to_bytes(4, "little") + data[at + 4:]


@pytest.mark.parametrize(
    ("name", "make", "headers", "status", "reason"),
    [
        ("empty", lambda d: b"", DICOM, 400, "empty upload"),
        ("random bytes", lambda d: np.random.default_rng(0).bytes(5000), DICOM, 400, "upload: not a"),
        ("truncated", truncated, DICOM, 400, "upload: "),
        ("2 GB declared length", declares_2gb, DICOM, 400, "2147483648"),
        ("over the limit", lambda d: d * 8, DICOM, 413, "limit"),
        ("wrong content type", lambda d: d, {"content-type": "image/jpeg"}, 415, "application/dicom"),
        ("no content type", lambda d: d, {"content-type": ""}, 415, "application/dicom"),
        ("multipart without file", lambda d: b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
         {"content-type": "multipart/form-data; boundary=b"}, 400, "exactly one file"),
    ],
)
def test_bad_input_gets_a_json_error_and_the_next_request_is_fine(
    client: TestClient, samples: list[Path], reference: dict[str, Prediction],
    name: str, make, headers: dict, status: int, reason: str,  # noqa: ANN001
) -> None:
    response = client.post("/v1/predict", content=make(samples[0].read_bytes()), headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert reason in error and "\n" not in error
    good = client.post("/v1/predict", content=samples[1].read_bytes(), headers=DICOM)
    assert_same(good.json(), reference[samples[1].stem])


def test_bad_query_and_routes(client: TestClient, samples: list[Path]) -> None:
    response = client.post("/v1/predict?format=jpeg", content=samples[0].read_bytes(), headers=DICOM)
    assert response.status_code == 400 and "format" in response.json()["error"]
    assert client.get("/v1/nothing").json() == {"error": "Not Found"}
    assert client.get("/v1/predict").status_code == 405
    stow = client.post("/dicomweb/studies", content=b"", headers={"content-type": "multipart/related; boundary=b"})
    assert stow.status_code == 404 and "--results-dir" in stow.json()["error"], "STOW-RS is off without a folder"


def post_stream(client: TestClient, headers: list[tuple[bytes, bytes]]) -> tuple[int, str, int]:
    """POST an endless body of 1 MiB chunks to the running app, as a server would hand it over (the test client
    itself would read a streamed body whole first); return the status, the error and how many chunks were read."""
    reads = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"\0" * 2**20, "more_body": reads < 2000}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/dicom"), *headers], "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80), "state": {},
    }
    client.portal.call(client.app, scope, receive, send)
    return sent[0]["status"], json.loads(sent[1]["body"])["error"], reads


def test_oversized_upload_is_refused_while_streaming(client: TestClient) -> None:
    """No Content-Length (chunked): 413 once just over the limit has arrived, not after the 2,000 MiB sent."""
    status, error, reads = post_stream(client, [])
    assert status == 413 and "limit" in error
    assert reads == LIMIT_MB + 1


def test_declared_2gb_content_length_is_refused_before_reading(client: TestClient) -> None:
    status, error, reads = post_stream(client, [(b"content-length", str(2 * 1024**3).encode())])
    assert status == 413 and "2147483648" in error
    assert reads == 0


def test_the_service_runs_the_engine_it_was_given_and_says_which(client: TestClient, model_dir: Path) -> None:
    default = Cascade.from_pretrained(model_dir, runtime=CPU)
    assert client.get("/v1/model").json()["runtime"] == default.runtime.as_dict()
    with TestClient(create_app(model_dir, runtime=Runtime.resolve("cpu", "fp32", "torch"))) as forced:
        wait_ready(forced.get)
        assert forced.get("/v1/model").json()["runtime"] == {
            "device": "cpu", "precision": "fp32", "backend": "torch", "engine": "torch", "compile": False}


def test_token_is_required_when_configured(model_dir: Path, samples: list[Path]) -> None:
    app = create_app(model_dir, runtime=CPU, token=TOKEN)
    with TestClient(app) as client:
        wait_ready(client.get)
        data = samples[0].read_bytes()
        assert client.post("/v1/predict", content=data, headers=DICOM).status_code == 401
        wrong = client.post("/v1/predict", content=data, headers={**DICOM, "authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "token" in wrong.json()["error"]
        assert client.get("/metrics").status_code == 401 and client.get("/v1/model").status_code == 401
        good = {"authorization": f"Bearer {TOKEN}"}
        assert client.post("/v1/predict", content=data, headers={**DICOM, **good}).status_code == 200
        assert client.get("/metrics", headers=good).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200


def test_503_while_the_model_loads(model_dir: Path, samples: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_load = serve_app._load

    def slow_load(state):  # noqa: ANN001, ANN202 - the real loader, held until the test lets it go
        release.wait(30)
        return real_load(state)

    monkeypatch.setattr(serve_app, "_load", slow_load)
    with TestClient(create_app(model_dir, runtime=CPU)) as client:
        assert client.get("/healthz").status_code == 503
        assert "loading" in client.get("/v1/model").json()["error"]
        response = client.post("/v1/predict", content=samples[0].read_bytes(), headers=DICOM)
        assert response.status_code == 503 and "loading" in response.json()["error"]
        release.set()
        wait_ready(client.get)
        assert client.post("/v1/predict", content=samples[0].read_bytes(), headers=DICOM).status_code == 200


def test_model_that_fails_to_load_says_why(model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "segmenter" / "model.safetensors").write_bytes(b"changed")
    reasons: list[str] = []
    with TestClient(create_app(broken, runtime=CPU, on_load_failure=reasons.append)) as client:
        deadline = time.monotonic() + 30
        while not reasons and time.monotonic() < deadline:
            time.sleep(0.05)
        response = client.get("/healthz")
        assert response.status_code == 503 and "sha256" in response.json()["error"]
    assert reasons and "sha256" in reasons[0]


def test_command_line_refuses_unsafe_or_bad_settings(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(model_dir), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cascade serve: error: ") and "--token-file" in err and err.count("\n") == 1
    short = tmp_path / "token"
    short.write_text("short\n")
    assert main(["serve", str(model_dir), "--host", "0.0.0.0", "--token-file", str(short)]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(model_dir), "--max-batch", "0"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll ``base``/healthz until it answers 200, the time is up, or ``alive()`` turns false (bounded)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def raw_answer(port: int, request: bytes, timeout: float = 20) -> bytes:
    """Send raw bytes and return the status line and headers of the answer (a client that sends no body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_server_process_serves_refuses_a_2gb_upload_and_stops(
    model_dir: Path, samples: list[Path], reference: dict[str, Prediction]
) -> None:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "cascade", "serve", str(model_dir), "--port", str(port), "--device", "cpu",
               "--max-upload-mb", str(LIMIT_MB)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 90, alive=lambda: server.poll() is None)
        assert server.poll() is None, "the server exited early"
        answer = httpx.post(f"{base}/v1/predict", content=samples[0].read_bytes(), headers=DICOM, timeout=30)
        assert_same(answer.json(), reference[samples[0].stem])

        started = time.monotonic()
        declared = raw_answer(port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
                                    b"Content-Length: 2147483648\r\n\r\n")
        assert declared.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 10
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    finally:
        server.terminate()
        try:
            out, err = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            out, err = server.communicate()
    # uvicorn shuts down cleanly, then re-raises the signal it stopped on: cascade's handler exits 143, as every command
    assert server.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM), err[-2000:]
    assert "Application shutdown complete" in err
    assert "/v1/predict 200" in err and samples[0].stem not in err + out


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture()
def live_server(model_dir: Path) -> Iterator[str]:
    """The app under a real uvicorn on a free loopback port, in a thread of this process; stopped after the test."""
    import uvicorn

    port = free_port()
    app = create_app(model_dir, runtime=CPU)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 60)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=20)
    assert not thread.is_alive(), "the server thread did not stop"


def screenshot(driver: object, folder: Path, name: str) -> None:
    """Save a screenshot of the page as ``folder/name`` and, when ``$CASCADE_SCREENSHOTS`` names a folder, there."""
    targets = [folder / name]
    if os.environ.get("CASCADE_SCREENSHOTS"):
        targets.append(Path(os.environ["CASCADE_SCREENSHOTS"]) / name)
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(target)) and target.stat().st_size > 5_000  # type: ignore[attr-defined]


def test_page_in_a_real_browser_shows_the_apis_answer(
    live_server: str, samples: list[Path], reference: dict[str, Prediction], tmp_path: Path
) -> None:
    """Headless Chromium opens the page: before any upload no result panel, image or download link shows; then it
    uploads a real SIIM positive and waits for the overlay: the probability shown is the API's, the SEG, SR and
    Secondary Capture links show; nothing is fetched from anywhere but the service; the SOP Instance UID shows only
    on request. Both states are screenshotted (also into ``$CASCADE_SCREENSHOTS`` when set, for the docs)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("chromium / chromedriver are absent (Debian: chromium chromium-driver; .ci/run installs them)")
    import httpx
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    source = next(p for p in samples if p.stem == POSITIVE)
    api = httpx.post(f"{live_server}/v1/predict", content=source.read_bytes(), headers=DICOM, timeout=30).json()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(live_server + "/")
        assert driver.find_element(By.ID, "drop").is_displayed()
        hidden = ("result", "overlay", "download-seg", "download-sr", "download-sc", "download-png")
        assert not any(driver.find_element(By.ID, name).is_displayed() for name in hidden), "empty page, no result"
        assert not [a for a in driver.find_elements(By.TAG_NAME, "a") if a.is_displayed() and "DICOM" in a.text]
        screenshot(driver, tmp_path, "serve-page-empty.png")
        driver.find_element(By.ID, "file").send_keys(str(source))
        WebDriverWait(driver, 60).until(
            lambda d: d.execute_script("const i = document.getElementById('overlay');"
                                       "return !document.getElementById('result').hidden && i.complete"
                                       " && i.naturalWidth > 0;")
            or "error" in d.find_element(By.ID, "status").get_attribute("class")
        )
        assert driver.find_element(By.ID, "status").text.startswith("Done")
        shown = driver.find_element(By.ID, "probability")
        assert shown.text == f"{api['probability']:.4f}"
        assert float(shown.get_attribute("data-value")) == api["probability"] == reference[POSITIVE].probability
        assert driver.find_element(By.ID, "decision").text == "pneumothorax"
        assert driver.execute_script("return document.getElementById('overlay').naturalWidth") == 1024
        assert "total" in driver.find_element(By.ID, "timing").text
        for name in ("download-seg", "download-sr", "download-sc"):
            link = driver.find_element(By.ID, name)
            assert link.is_displayed() and link.get_attribute("class") == "" and "DICOM" in link.text
        screenshot(driver, tmp_path, "serve-page.png")
        uid = driver.find_element(By.ID, "uid")
        assert not uid.is_displayed() and POSITIVE not in driver.find_element(By.TAG_NAME, "body").text
        driver.find_element(By.ID, "show-uid").click()
        assert uid.is_displayed() and uid.text == POSITIVE
        assert driver.find_element(By.ID, "download-rle").get_attribute("href").startswith("blob:")
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(r.startswith((live_server, "blob:")) for r in resources), resources
    finally:
        driver.quit()
