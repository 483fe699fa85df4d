"""The fault sweep gains serve (issue 23): a real ``cascade serve`` process on a free loopback port, fed what a hostile
peer sends — a decompression bomb, a burst of concurrent uploads, over-long multipart boundaries, invented HTTP
methods, corrupt images whose decoders fail, a request with both Content-Length and Transfer-Encoding — and a soak
of all of it. The server's memory (VmRSS, VmHWM) and open file descriptors are read from /proc."""

from __future__ import annotations

import io
import os
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from conftest import make_model_dir  # noqa: E402
from robust_helpers import ServeProcess, serve_process, wait_until  # noqa: E402

from cascade.apps.serve.app import METHODS  # noqa: E402

TOKEN = "robust-serve-token-0123456789abcdef"
BUDGET = 2048 * 2048
"""--max-pixels of the server under test: 2048 x 2048 passes, anything bigger is refused from its header."""
MAX_IN_FLIGHT = 16
BURST = MAX_IN_FLIGHT
"""Concurrent 2048 x 2048 uploads in the memory test (all are served)."""
MIB = 1024 * 1024


class Server(ServeProcess):
    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``cascade serve`` with a token, a pixel budget, two decode threads and a 300 ms batch window (so a burst
    waits for its batch), in its own process: its memory and descriptors are its own."""
    folder = tmp_path_factory.mktemp("robust-serve")
    model = make_model_dir(folder / "model", seg_bias=-10.0)  # empty masks: a full 2048 x 2048 one costs 1 s of RLE
    (folder / "token").write_text(TOKEN)
    with serve_process(model, folder, "--token-file", folder / "token", "--max-upload-mb", 8, "--max-pixels", BUDGET,
                       "--decode-threads", 2, "--max-batch", 16, "--batch-window-ms", 300,
                       "--max-in-flight", MAX_IN_FLIGHT) as proc:
        yield Server(proc.base, proc.port, proc.pid, proc.log)


# --- what the server holds -------------------------------------------------------------------------------------


def _status(pid: int, key: str) -> int:
    """A /proc/PID/status size in bytes (VmRSS: now, VmHWM: peak since the last reset_peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def rss(pid: int) -> int:
    return _status(pid, "VmRSS")


def peak(pid: int) -> int:
    return _status(pid, "VmHWM")


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (``5 > clear_refs``, Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- DICOMs ------------------------------------------------------------------------------------------------------


def dicom(rows: int, cols: int, bits: int, syntax: UID, pixel_data: bytes) -> bytes:
    """A greyscale MONOCHROME2 DICOM file of the given size and transfer syntax around ``pixel_data``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = encapsulate([pixel_data]) if syntax.is_encapsulated else pixel_data
    ds["PixelData"].VR = "OB" if syntax.is_encapsulated else ("OW" if bits > 8 else "OB")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def film(size: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 picture (compresses to a few kB as JPEG)."""
    line = np.arange(size, dtype=np.float32) / size
    return (127 + 100 * np.cos(4 * line)[:, None] * np.sin(6 * line + seed)[None, :]).astype(np.uint8)


def pillow_frame(image: np.ndarray, fmt: str, **options: object) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, fmt, **options)
    return out.getvalue()


def good(size: int = 128, seed: int = 0) -> bytes:
    """A native 8-bit radiograph-like image."""
    return dicom(size, size, 8, ExplicitVRLittleEndian, film(size, seed).tobytes())


def jpeg(size: int, seed: int = 0) -> bytes:
    return dicom(size, size, 8, JPEGBaseline8Bit, pillow_frame(film(size, seed), "JPEG", quality=90))


def bomb(side: int = 16384) -> bytes:
    """The attack's decompression bomb: a JPEG-LS lossless file of ``side`` x ``side`` 16-bit pixels (512 MiB at
    16384) in a few hundred bytes: header and stream both declare the size, the scan is all zeros."""
    sof55 = b"\xff\xf7\x00\x0b\x10" + side.to_bytes(2, "big") * 2 + b"\x01\x01\x11\x00"
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x00\x00\x00"
    return dicom(side, side, 16, JPEGLSLossless, b"\xff\xd8" + sof55 + sos + bytes(200) + b"\xff\xd9")


def corrupt_j2k() -> bytes:
    """A JPEG 2000 stream whose main header (sizes) is intact and whose rest is zeros: every decoder plugin fails."""
    stream = pillow_frame(film(256), "JPEG2000", irreversible=False, no_jp2=True)
    return dicom(256, 256, 8, JPEG2000Lossless, stream[:60] + bytes(len(stream) - 60))


def oversize_jpeg() -> bytes:
    """A 512 x 512 JPEG in a file whose header says 64 x 64."""
    return dicom(64, 64, 8, JPEGBaseline8Bit, pillow_frame(film(512), "JPEG"))


def multipart(boundary: str, content: bytes) -> tuple[bytes, dict[str, str]]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.dcm\"\r\n"
            f"Content-Type: application/dicom\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


DICOM = {"content-type": "application/dicom"}


def assert_json_error(response: httpx.Response, status: int, needle: str = "") -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert needle in error and "\n" not in error, error


def assert_answers(client: httpx.Client, data: bytes = b"") -> None:
    """A good upload still gets its prediction."""
    response = client.post("/v1/predict", content=data or good(), headers=DICOM)
    assert response.status_code == 200, response.text
    assert 0.0 <= response.json()["probability"] <= 1.0


# --- the attacks -------------------------------------------------------------------------------------------------


def test_decompression_bomb_is_refused_from_its_header(server: Server) -> None:
    """The attack's 16384 x 16384 16-bit JPEG-LS (3 kB; 512 MiB decoded, 4 GB of server memory before the budget)
    and an image just over --max-pixels (one the default budget would take) get 400 at once; memory stays put."""
    data = bomb()
    assert len(data) < 4000
    with server.client() as client:
        assert_answers(client)
        before = rss(server.pid)
        reset_peak(server.pid)
        started = time.monotonic()
        assert_json_error(client.post("/v1/predict", content=data, headers=DICOM), 400,
                          f"over the pixel budget of {BUDGET:,} pixels")
        assert time.monotonic() - started < 2
        assert_json_error(client.post("/v1/predict", content=jpeg(2049), headers=DICOM), 400, "2049 x 2049")
        grown = peak(server.pid) - before
        print(f"bomb: RSS before {before / MIB:.0f} MiB, peak {peak(server.pid) / MIB:.0f} MiB, "
              f"after {rss(server.pid) / MIB:.0f} MiB")
        assert grown < 200 * MIB, f"the server grew by {grown / MIB:.0f} MiB on a refused bomb"
        assert_answers(client, jpeg(2048))


def test_a_burst_of_uploads_holds_no_decoded_images(server: Server) -> None:
    """BURST 2048 x 2048 JPEGs at once, gathered into batches by the 300 ms window: only the two decode threads ever
    hold a full-size float image (16 MiB; a decode peaks at about 48 MiB); the requests waiting for their batch hold
    the networks' inputs. Measured: +97 MiB; +206 MiB when each waiting request held its float image (the code
    before issue 23)."""
    uploads = [jpeg(2048, seed) for seed in range(BURST)]
    with server.client() as client:
        assert_answers(client, uploads[0])  # warm: the first 2048 decode's allocations
        before = rss(server.pid)
        reset_peak(server.pid)
        with ThreadPoolExecutor(BURST) as pool:
            answers = list(pool.map(lambda data: client.post("/v1/predict", content=data, headers=DICOM), uploads))
    assert [a.status_code for a in answers] == [200] * BURST
    assert max(a.json()["batch_size"] for a in answers) > 1
    grown = peak(server.pid) - before
    print(f"burst of {BURST}: RSS before {before / MIB:.0f} MiB, peak +{grown / MIB:.0f} MiB")
    assert grown < 150 * MIB, f"the server grew by {grown / MIB:.0f} MiB for {BURST} concurrent uploads"


def test_more_uploads_than_max_in_flight_get_503_before_their_body_is_read(server: Server) -> None:
    """MAX_IN_FLIGHT clients that send headers and no body hold every slot: the next one gets 503 at once, and the
    service answers again as soon as they go."""
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/dicom\r\nContent-Length: 100000\r\n\r\n").encode()
    stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(MAX_IN_FLIGHT)]
    try:
        for sock in stalled:
            sock.sendall(head)
        with server.client() as client:
            assert wait_until(lambda: client.post("/v1/predict", content=good(), headers=DICOM).status_code == 503, 10)
            assert_json_error(client.post("/v1/predict", content=good(), headers=DICOM), 503, "busy")
            assert client.get("/healthz").status_code == 200
    finally:
        for sock in stalled:
            sock.close()
    with server.client() as client:
        assert wait_until(lambda: client.post("/v1/predict", content=good(), headers=DICOM).status_code == 200, 10)


@pytest.mark.parametrize("length", [71, 1000, 5000])
def test_long_multipart_boundary_is_a_400(server: Server, length: int) -> None:
    boundary = "b" * length
    with server.client() as client:
        valid, headers = multipart(boundary, good())
        assert_json_error(client.post("/v1/predict", content=valid, headers=headers), 400, "boundary")
        assert_json_error(client.post("/v1/predict", content=b"junk" * 100, headers=headers), 400, "boundary")
        longest, headers = multipart("b" * 70, good())
        assert client.post("/v1/predict", content=longest, headers=headers).status_code == 200


MALFORMED = [
    ({"content-type": "multipart/form-data"}, b"--b\r\n\r\n"),
    ({"content-type": "multipart/form-data; boundary="}, b"----\r\n"),
    ({"content-type": "multipart/form-data; boundary=b"}, b"--b\r\nno colon here\r\n\r\nx\r\n--b--\r\n"),
    ({"content-type": "multipart/form-data; boundary=b"}, b"--b\r\nContent-Disposition: form-data\r\n"),
    ({"content-type": "multipart/form-data; boundary=b"}, b"preamble only"),
    ({"content-type": "multipart/form-data; boundary=\"b\\"}, b"--b\r\n"),
    ({"content-type": "multipart/form-data; boundary=b"},
     b"--b\r\nContent-Disposition: form-data; name*=UTF-8''%ff%fe; filename*=x''%zz\r\n\r\nx\r\n--b--\r\n"),
    ({"content-type": "multipart/form-data; boundary=b; boundary=c"}, b"--c\r\n\x00\xff\r\n--c--\r\n"),
    ({"content-type": "application/dicom; charset=\x7f"}, b"\x00" * 300),
    ({"content-type": "application/dicom"}, b"\0" * 128 + b"DICM" + b"\xff" * 500),
]


def test_malformed_bodies_are_4xx_json_errors(server: Server) -> None:
    with server.client() as client:
        for headers, body in MALFORMED:
            response = client.post("/v1/predict", content=body, headers=headers)
            assert 400 <= response.status_code < 500, (headers, response.status_code, response.text[:200])
            assert "\n" not in response.json()["error"]
        assert_answers(client)


def _series(metrics: str) -> list[dict[str, str]]:
    return [dict(re.findall(r'(\w+)="([^"]*)"', line)) for line in metrics.splitlines()
            if line.startswith("cascade_requests_total{")]


def test_invented_methods_and_paths_do_not_grow_the_metrics(server: Server) -> None:
    """Twenty-five invented methods and paths, with and without the token (401): one ``other`` method, one ``other``
    route; the methods logged are known ones or ``other``."""
    with server.client() as client:
        for i in range(25):
            assert client.request(f"FOO{i}", "/v1/predict").status_code == 405
            assert client.request(f"BAR{i}", f"/nothing/{i}").status_code == 404
            assert httpx.request(f"BAZ{i}", f"{server.base}/v1/model").status_code == 401
            assert httpx.get(f"{server.base}/v1/x{i}").status_code == 401
        series = _series(client.get("/metrics").text)
    methods = {s["method"] for s in series}
    routes = {s["route"] for s in series}
    assert methods <= METHODS | {"other"} and "other" in methods, methods
    assert "other" in routes and not any("nothing" in r or "/v1/x" in r for r in routes), routes
    assert len(series) < 30, len(series)
    assert not re.search(r"\b(FOO|BAR|BAZ)\d", server.log.read_text())


def test_decoders_that_fail_write_no_traceback_to_the_log(server: Server) -> None:
    """Corrupt JPEG 2000 and oversize JPEG uploads, concurrently with good ones (the decode threads overlap): clean
    400s, and the log holds one line per record and no traceback."""
    fine = good()
    uploads = [corrupt_j2k(), oversize_jpeg(), fine] * 6
    with server.client() as client, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda data: client.post("/v1/predict", content=data, headers=DICOM), uploads))
    for data, answer in zip(uploads, answers):
        assert answer.status_code == (200 if data is fine else 400), answer.text
    text = server.log.read_text()
    assert "Traceback" not in text and "pydicom" not in text, text[-3000:]
    record = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ [A-Z]+ |cascade serve: loading ")
    stray = [line for line in text.splitlines() if not record.match(line)]
    assert not stray, stray[:10]


def _raw(port: int, request: bytes, wait: float = 5) -> tuple[bytes, bool]:
    """Send ``request`` on one connection; return everything answered and whether the server closed it."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            return answer, False
        return answer, True


def test_content_length_with_chunked_is_refused_and_the_connection_closed(server: Server) -> None:
    """RFC 9112 §6.1: after such a request the connection must close, so the pipelined request behind it (which a
    proxy framing by Content-Length would see as part of the body) is never answered."""
    smuggled = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer, closed = _raw(server.port, smuggled)
    assert closed, "the connection was kept open"
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"connection: close" in answer.lower() and b"Content-Length and Transfer-Encoding" in answer


def test_soak(server: Server) -> None:
    """300 requests of every kind, in rounds: memory and descriptors after are what they were before (after one
    warm-up round), and the service still answers right."""
    junk_boundary = multipart("x" * 1000, b"junk")
    cases = [
        lambda c, i: (c.post("/v1/predict", content=good(seed=i), headers=DICOM), 200),
        lambda c, i: (c.post("/v1/predict", content=os.urandom(300), headers=DICOM), 400),
        lambda c, i: (c.post("/v1/predict", content=junk_boundary[0], headers=junk_boundary[1]), 400),
        lambda c, i: (c.request(f"M{i}", "/v1/predict"), 405),
        lambda c, i: (c.post("/v1/predict", content=bomb_bytes, headers=DICOM), 400),
        lambda c, i: (c.post("/v1/predict", content=j2k_bytes, headers=DICOM), 400),
        lambda c, i: (c.get(f"/nowhere/{i}"), 404),
        lambda c, i: (c.post("/v1/predict?format=png", content=good(seed=i), headers=DICOM), 200),
    ]
    bomb_bytes, j2k_bytes = bomb(), corrupt_j2k()

    def round_(client: httpx.Client, count: int) -> None:
        for i in range(count):
            response, status = cases[i % len(cases)](client, i)
            assert response.status_code == status, (i, response.status_code, response.text[:200])
            if i % 50 == 25:
                answer, closed = _raw(server.port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 400") and closed

    with server.client() as client:
        round_(client, 40)
        time.sleep(0.5)
        before_rss, before_fds = rss(server.pid), open_fds(server.pid)
        started = time.monotonic()
        round_(client, 300)
        seconds = time.monotonic() - started
        time.sleep(0.5)
        after_rss, after_fds = rss(server.pid), open_fds(server.pid)
        print(f"soak: 300 requests in {seconds:.1f} s; RSS {before_rss / MIB:.0f} -> {after_rss / MIB:.0f} MiB, "
              f"fds {before_fds} -> {after_fds}")
        assert after_rss - before_rss < 40 * MIB
        assert after_fds <= before_fds + 2
        assert_answers(client)
        assert client.get("/healthz").status_code == 200
