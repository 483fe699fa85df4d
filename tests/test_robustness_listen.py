"""The fault sweep gains `cascade listen`: hostile peers against a real node on a free loopback port. A
decompression bomb sent by dcmtk's storescu is refused at C-STORE time; a peer holding its share of associations
idle neither starves other callers nor keeps them past the idle timeout; an association addressed to another AE
title is refused; a soak of good, duplicate, corrupt and over-budget images leaves the node's memory and open files
where they were, and its answers right. The results it sends: a full disk under ``sr/`` loses nothing and leaves
nothing half-written; destinations that hang up mid-transfer (STOW-RS and DIMSE) leave every result in its outbox;
STOW-RS answers are read instance by instance.

One `cascade listen` subprocess (its memory and file descriptors read from /proc) serves the bomb, the called-AE
and the soak cases, in that order; the association limits use a node in the test process with a short idle
timeout. About 40 s on two loaded cores; ``-rP`` shows the memory and file figures measured.
"""

from __future__ import annotations

import math
import re
import subprocess
import threading
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, generate_uid

from cascade.apps.listen import IMAGE_STORAGE, Node, uid_hash
from cascade.apps.listen.node import BUDGET_COMMENT, OVER_BUDGET
from cascade.data.dicom import MAX_PIXELS
from cascade.inference.pipeline import Cascade, Prediction
from conftest import make_model_dir
from listen_helpers import NodeProcess, findings, require, wait_findings, wait_for

SIDE = 8192
"""The bomb's side: 67 million 16-bit pixels (128 MiB decoded, 256 MiB as float32) in about 1 KB of JPEG-LS."""
assert SIDE * SIDE > MAX_PIXELS
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def samples(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("robust-listen") / "model")


@pytest.fixture(scope="module")
def expected(model_dir: Path, samples: list[Path]) -> dict[str, Prediction]:
    """The library's answer for each sample, by SOP Instance UID: the node must give the same."""
    model = Cascade.from_pretrained(model_dir, device="cpu")
    return {p.image_id: p for p in model.predict_many(samples, workers=0)}


@pytest.fixture(scope="module")
def bomb(samples: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, decodable JPEG-LS lossless image of SIDE x SIDE 16-bit zeros: about 1 KB on the wire."""
    ds = pydicom.dcmread(samples[0])
    ds.decompress()
    ds.Rows = ds.Columns = SIDE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.compress(JPEGLSLossless, np.zeros((SIDE, SIDE), dtype=np.uint16))
    path = tmp_path_factory.mktemp("bomb") / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    assert path.stat().st_size < 4096
    return path


@pytest.fixture(scope="module")
def node(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """`cascade listen` with its defaults but the AE title."""
    folder = tmp_path_factory.mktemp("robust-node")
    proc = NodeProcess(model_dir, folder / "out", folder / "node.log", "--ae-title", "TRIAGE")
    yield proc
    assert proc.terminate() == 0


def status(pid: int, field: str) -> int:
    """A /proc/PID/status memory figure in bytes (VmRSS, VmHWM)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.M).group(1)) * 1024


def open_files(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def renamed(ds: Dataset) -> Dataset:
    """A copy of ``ds`` under a new SOP Instance UID."""
    copy = deepcopy(ds)
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return copy


def send(port: int, datasets: list[Dataset], called: str = "TRIAGE", bind: str = "127.0.0.1") -> list[Dataset]:
    """C-STORE each dataset in one association from ``bind``; the status Dataset of each."""
    from pynetdicom import AE

    ae = AE(ae_title="SCU")
    for sop_class in IMAGE_STORAGE:
        for syntax in (JPEGBaseline8Bit, JPEGLSLossless, ExplicitVRLittleEndian):
            ae.add_requested_context(sop_class, syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=called, bind_address=(bind, 0))
    assert assoc.is_established, "the node refused the association"
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def test_a_decompression_bomb_from_storescu_is_refused_at_c_store_and_never_kept(
    node: NodeProcess, samples: list[Path], bomb: Path
) -> None:
    storescu = require("storescu")
    out = node.log.parent / "out"
    warm = subprocess.run([storescu, "-xy", "-aec", "TRIAGE", "127.0.0.1", str(node.port), str(samples[0])],
                          capture_output=True, text=True, timeout=60)
    assert warm.returncode == 0, warm.stderr
    wait_findings(out, 1)
    before = status(node.proc.pid, "VmRSS")
    Path(f"/proc/{node.proc.pid}/clear_refs").write_text("5")  # VmHWM (peak resident) restarts from now
    sent = subprocess.run([storescu, "-v", "-xt", "-aec", "TRIAGE", "127.0.0.1", str(node.port), str(bomb)],
                          capture_output=True, text=True, timeout=60)
    assert "Received Store Response (Error: CannotUnderstand)" in sent.stderr, sent.stderr  # 0xC001, a failure
    peak, after = status(node.proc.pid, "VmHWM"), status(node.proc.pid, "VmRSS")
    print(f"bomb: node VmRSS before {before / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, after {after / MIB:.0f} MiB")
    assert peak - before < 64 * MIB, f"{(peak - before) / MIB:.0f} MiB more at peak"
    uid = bomb.stem
    assert uid not in {r["ImageId"] for r in findings(out)}
    assert not any((out / folder / bomb.name).exists() for folder in ("incoming", "seg", "outbox"))
    assert f"{uid_hash(uid)} refused: over the pixel budget of {MAX_PIXELS:,} pixels" in node.log.read_text()


def test_an_association_addressed_to_another_ae_title_is_refused(node: NodeProcess) -> None:
    echoscu = require("echoscu")
    wrong = subprocess.run([echoscu, "-aec", "CASCADE", "127.0.0.1", str(node.port)], capture_output=True, text=True,
                           timeout=30)
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr, wrong.stderr
    right = subprocess.run([echoscu, "-aec", "TRIAGE", "127.0.0.1", str(node.port)], capture_output=True, text=True,
                           timeout=30)
    assert right.returncode == 0, right.stderr
    assert "it was addressed to another AE title than this node's" in node.log.read_text()


def test_one_peer_cannot_hold_the_node_and_idle_associations_are_dropped(model_dir: Path, tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = Node(Cascade.from_pretrained(model_dir, device="cpu"), tmp_path, port=0, idle_timeout=1.5,
                max_associations=3, max_per_peer=2)
    node.start()
    held = []
    try:
        ae = AE(ae_title="HOG")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 30

        def associate(bind: str):  # noqa: ANN202
            return ae.associate("127.0.0.1", node.address[1], ae_title="CASCADE", bind_address=(bind, 0))

        held = [associate("127.0.0.1") for _ in range(2)]
        assert all(a.is_established for a in held)
        extra = associate("127.0.0.1")
        assert extra.is_rejected  # the peer's third, while it holds two
        answer = extra.acceptor.primitive
        assert (answer.result, answer.result_source, answer.diagnostic) == (0x02, 0x03, 0x02)  # transient, limit
        wait_for(lambda: len(node._ae.active_associations) == 2, 10, "the refused association to end")
        other = associate("127.0.0.2")  # another caller gets in meanwhile
        assert other.is_established and other.send_c_echo().Status == 0
        third = associate("127.0.0.3")  # but no more than max_associations in all
        assert third.is_rejected
        held.append(other)
        wait_for(lambda: all(a.is_aborted for a in held), 10, "the node to abort the idle associations")
        again = associate("127.0.0.1")  # the peer's share is free once its associations are gone
        assert again.is_established and again.send_c_echo().Status == 0
        again.release()
    finally:
        for assoc in held:
            assoc.abort()
        node.stop()


def soak_batches(samples: list[Path], bomb: Path) -> tuple[list[list[Dataset]], dict[str, str], set[str]]:
    """Three associations' worth, 150 C-STOREs: 12 new copies of the samples, 36 copies of already-analysed ones,
    48 corrupt images (acknowledged, recorded as failures), 54 bombs (refused). Returns the batches, the new
    copies' source (by UID) and the corrupt ones' UIDs."""
    originals = [pydicom.dcmread(p) for p in samples]
    bombs = pydicom.dcmread(bomb)
    order = np.random.default_rng(0).permutation(["good"] * 12 + ["again"] * 36 + ["corrupt"] * 48 + ["bomb"] * 54)
    good, corrupt, kinds = {}, set(), []
    for i, kind in enumerate(order):
        source = originals[i % len(originals)]
        if kind == "good":
            ds = renamed(source)
            good[str(ds.SOPInstanceUID)] = str(source.SOPInstanceUID)
        elif kind == "again":
            ds = source
        elif kind == "corrupt":
            ds = renamed(source)
            ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(1000)])
            corrupt.add(str(ds.SOPInstanceUID))
        else:
            ds = renamed(bombs)
        kinds.append(ds)
    return [kinds[i::3] for i in range(3)], good, corrupt


def test_soak_of_good_duplicate_corrupt_and_over_budget_images_leaves_memory_and_files_as_they_were(
    node: NodeProcess, samples: list[Path], bomb: Path, expected: dict[str, Prediction]
) -> None:
    out = node.log.parent / "out"
    pid = node.proc.pid
    assert all(s.Status == 0 for s in send(node.port, [pydicom.dcmread(p) for p in samples]))
    wait_findings(out, len(samples))  # the bomb test's warm-up image is one of them
    batches, good, corrupt = soak_batches(samples, bomb)
    rss, fds = status(pid, "VmRSS"), open_files(pid)
    answers: list[list[Dataset]] = [[] for _ in batches]
    threads = [threading.Thread(target=lambda i=i: answers[i].extend(send(node.port, batches[i])))
               for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for batch, statuses in zip(batches, answers):
        assert len(statuses) == len(batch)
        for ds, answer in zip(batch, statuses):
            if ds.Rows == SIDE:
                assert (answer.Status, answer.ErrorComment) == (OVER_BUDGET, BUDGET_COMMENT)
            else:
                assert answer.Status == 0
    rows = {r["ImageId"]: r for r in wait_findings(out, len(samples) + len(good) + len(corrupt))}
    wait_for(lambda: not list((out / "incoming").iterdir()), 30, "incoming/ to empty")
    assert len(rows) == len(samples) + len(good) + len(corrupt)
    for uid, source in good.items():
        assert math.isclose(float(rows[uid]["probability"]), expected[source].probability, abs_tol=1e-6)
        assert rows[uid]["error"] == "" and (out / rows[uid]["seg"]).is_file()
    assert all(rows[uid]["error"] and rows[uid]["probability"] == "" for uid in corrupt)
    grown = status(pid, "VmRSS") - rss
    print(f"soak: node VmRSS {rss / MIB:.0f} -> {(rss + grown) / MIB:.0f} MiB, open files {fds} -> {open_files(pid)}")
    assert grown < 48 * MIB, f"the node's memory grew by {grown / MIB:.0f} MiB"
    assert open_files(pid) <= fds, "the node holds more open files than before"
    # and it still answers right
    last = renamed(pydicom.dcmread(samples[1]))
    assert send(node.port, [last])[0].Status == 0
    row = {r["ImageId"]: r for r in wait_findings(out, len(rows) + 1)}[str(last.SOPInstanceUID)]
    assert math.isclose(float(row["probability"]), expected[samples[1].stem].probability, abs_tol=1e-6)


# the results the node sends (SR, SEG, Secondary Capture): a full disk, peers that hang up, STOW-RS refusals


def test_a_full_disk_under_sr_loses_nothing_and_leaves_no_half_written_result(
    model_dir: Path, samples: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """fsync fails with ENOSPC for files in the SR folder (a full disk shows there first): the image is still
    acknowledged (incoming/ is elsewhere), gets no finding and no result under a final name, stays in incoming/,
    and is analysed once the disk has room (the next start)."""
    import errno
    import os

    import cascade.storage.fileio

    sr_dir = tmp_path / "sr"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(sr_dir)):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(cascade.storage.fileio.os, "fsync", fsync)
    node = Node(Cascade.from_pretrained(model_dir, device="cpu"), tmp_path, port=0, secondary_capture=True)
    node.start()
    try:
        assert [s.Status for s in send(node.address[1], [pydicom.dcmread(samples[0])], called="CASCADE")] == [0]
        wait_for(lambda: "No space left on device" in caplog.text, 30, "the error to be logged")
    finally:
        node.stop()
    assert "cannot record results (OSError: No space left on device)" in caplog.text
    assert findings(tmp_path) == []
    assert (tmp_path / "incoming" / samples[0].name).exists()
    assert not list(sr_dir.iterdir()), "a result (or its temporary file) was left in sr/"
    monkeypatch.undo()
    node = Node(Cascade.from_pretrained(model_dir, device="cpu"), tmp_path, port=0, secondary_capture=True)
    node.start()
    try:
        row = wait_findings(tmp_path, 1)[0]
    finally:
        node.stop()
    assert row["ImageId"] == samples[0].stem and (tmp_path / row["sr"]).is_file()
    assert not list((tmp_path / "incoming").iterdir())
    if row["positive"] == "1":
        assert pydicom.dcmread(tmp_path / row["sc"]).BurnedInAnnotation == "YES"


def test_peers_that_hang_up_mid_transfer_keep_every_result_in_the_outbox(
    model_dir: Path, samples: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A STOW-RS peer that closes the connection after reading part of the request, and a DICOM peer that
    aborts the association in the middle of a C-STORE: each failure is logged clearly and every result stays in
    its outbox, whole, for the next round."""
    import socket

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage, SegmentationStorage

    from cascade.apps.listen import Destination

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def hang_up() -> None:  # reads the headers and a few KB of the body, then closes
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
    threading.Thread(target=hang_up, daemon=True).start()

    def abort(event) -> int:  # noqa: ANN001
        event.assoc.abort()
        return 0

    peer = AE(ae_title="BROKEN")
    for sop_class in (ComprehensiveSRStorage, SegmentationStorage):
        peer.add_supported_context(sop_class)
    server = peer.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, abort)])
    node = Node(Cascade.from_pretrained(model_dir, device="cpu"), tmp_path, port=0, retry_max=1.0,
                forward=Destination("BROKEN", "127.0.0.1", server.server_address[1]),
                forward_stow=f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web/studies")
    node.start()
    try:
        assert [s.Status for s in send(node.address[1], [pydicom.dcmread(samples[0])], called="CASCADE")] == [0]
        wait_findings(tmp_path, 1)
        wait_for(lambda: "no answer to STOW-RS" in caplog.text and "no answer to C-STORE" in caplog.text, 30,
                 "both failures to be logged")
    finally:
        node.stop()
        server.shutdown()
        stop.set()
        listener.close()
    row = findings(tmp_path)[0]
    for box in ("outbox", "outbox-stow"):
        kept = tmp_path / box / "sr" / samples[0].name
        assert kept.read_bytes() == (tmp_path / row["sr"]).read_bytes()  # whole, the result itself
    assert not list(tmp_path.glob("**/.*.tmp"))
    assert "kept in" in caplog.text


def test_stow_rs_answers_are_read_instance_by_instance(tmp_path: Path) -> None:
    """A 202 answer: the instance in ReferencedSOPSequence leaves the outbox; one failed with 0xC000 (cannot
    understand) is dropped, not retried; one failed with 0xA700 (out of resources) stays for the next round."""
    import httpx

    from cascade.apps.listen import Outbox
    from cascade.apps.listen.forward import DROPPED, STORED, StowSender

    outbox = Outbox(tmp_path / "outbox-stow")
    items, uids = [], []
    for _ in range(3):
        ds = Dataset()
        ds.SOPInstanceUID = generate_uid()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
        ds.ensure_file_meta()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        source = generate_uid()
        path = tmp_path / f"{source}.dcm"
        ds.save_as(path, enforce_file_format=True)
        outbox.link(("sr", source), path)
        items.append(("sr", source))
        uids.append(str(ds.SOPInstanceUID))

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"].startswith('multipart/related; type="application/dicom"')
        failed = [{"00081155": {"vr": "UI", "Value": [uids[1]]}, "00081197": {"vr": "US", "Value": [0xC000]}},
                  {"00081155": {"vr": "UI", "Value": [uids[2]]}, "00081197": {"vr": "US", "Value": [0xA700]}}]
        body = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uids[0]]}}]},
                "00081198": {"vr": "SQ", "Value": failed}}
        return httpx.Response(202, json=body)

    sender = StowSender("http://pacs.invalid/dicom-web/studies",
                        lambda: httpx.Client(transport=httpx.MockTransport(answer)))
    answered, problem = sender.send([(item, outbox.path(item)) for item in items], threading.Event())
    assert answered == [(items[0], STORED, 202), (items[1], DROPPED, 0xC000), (items[2], None, 0xA700)]
    assert problem == "STOW-RS answered HTTP 202; 1 instance(s) not confirmed"
