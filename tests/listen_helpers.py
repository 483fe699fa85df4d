"""Helpers for the `cascade listen` tests: a pynetdicom SCU, the node as a subprocess, and Orthanc (with its
DICOMweb plugin) started from the README's own configuration. Everything binds loopback and every wait is
bounded."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def findings(out: Path) -> list[dict[str, str]]:
    path = out / "findings.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def wait_findings(out: Path, count: int, timeout: float = 90.0) -> list[dict[str, str]]:
    return wait_for(lambda: rows if len(rows := findings(out)) >= count else None, timeout, f"{count} findings")


def require(tool: str) -> str:
    """The full path of a system tool (dcmtk, Orthanc); skips when absent. pynetdicom installs apps named
    ``storescu``/``echoscu`` into the virtual environment, which comes first on PATH when it is active: those are
    passed over, since the point is a client no one here wrote."""
    venv_bin = os.path.realpath(os.path.dirname(sys.executable))
    search = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                             if d and os.path.realpath(d) != venv_bin)
    path = shutil.which(tool, path=search)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs dcmtk and orthanc with apt)")
    return path


def store(port: int, datasets: Iterable[Any], calling: str = "SCU", called: str = "CASCADE") -> list[int]:
    """C-STORE each dataset (a path or a pydicom Dataset) in one association; the status of each."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
    from pynetdicom import AE

    from cascade.apps.listen import IMAGE_STORAGE

    ae = AE(ae_title=calling)
    for sop_class in IMAGE_STORAGE:
        ae.add_requested_context(sop_class, JPEGBaseline8Bit)
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "the node refused the association"
    try:
        return [int(assoc.send_c_store(ds if not isinstance(ds, (str, Path)) else dcmread(ds)).Status)
                for ds in datasets]
    finally:
        assoc.release()


def copies(sources: list[Path], folder: Path, count: int) -> dict[str, Path]:
    """``count`` copies of the sources (cycled) with new SOP Instance UIDs: UID → the source it copies."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for i in range(count):
        source = sources[i % len(sources)]
        ds = dcmread(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm")
        made[str(ds.SOPInstanceUID)] = source
    return made


class NodeProcess:
    """`cascade listen` as a subprocess on a free port (``--port 0``), its stderr in a file."""

    def __init__(self, model_dir: Path, out: Path, log: Path, *extra: str) -> None:
        self.log = log
        self.stderr = open(log, "ab")
        self.offset = self.stderr.tell()  # earlier runs' lines stay above
        command = [sys.executable, "-m", "cascade", "listen", str(model_dir), "--out", str(out), "--port", "0",
                   "--device", "cpu", *extra]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.stderr)
        line = wait_for(self._listening, 120, "the node to listen", interval=0.2)
        self.port = int(line)

    def _listening(self) -> str | None:
        if self.proc.poll() is not None:
            pytest.fail(f"cascade listen exited with {self.proc.returncode}:\n{self.log.read_text()}")
        found = re.findall(r"listening on 127\.0\.0\.1:(\d+)", self.log.read_text()[self.offset:])
        return found[-1] if found else None

    def terminate(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self._wait(timeout)

    def kill(self) -> int:
        self.proc.kill()
        return self._wait(30)

    def _wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            pytest.fail(f"cascade listen did not stop within {timeout:.0f} s")
        finally:
            self.stderr.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.stderr.close()


def readme_block(language: str, marker: str) -> str:
    """The README's fenced ``language`` block containing ``marker`` (the worked Orthanc example)."""
    for found, body in re.findall(r"```([\w-]*)\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        if found == language and marker in body:
            return body
    raise AssertionError(f"README has no {language} block with {marker!r}")


class Orthanc:
    """Orthanc with the README's configuration on free loopback ports, storage in ``folder``; restartable."""

    def __init__(self, folder: Path, node_port: int) -> None:
        require("Orthanc")
        self.folder = folder
        self.dicom_port, self.http_port = free_port(), free_port()
        config = json.loads(readme_block("json", "DicomModalities"))
        lua = folder / "route-to-cascade.lua"
        lua.write_text(readme_block("lua", "OnStoredInstance"), encoding="utf-8")
        config.update(
            DicomPort=self.dicom_port,
            HttpPort=self.http_port,
            StorageDirectory=str(folder / "db"),
            IndexDirectory=str(folder / "db"),
            LuaScripts=[str(lua)],
        )
        config["DicomModalities"]["cascade"][2] = node_port
        assert config["RemoteAccessAllowed"] is False
        plugin = Path(config["Plugins"][0])
        if not plugin.exists():
            pytest.skip(f"{plugin} is absent (.ci/run installs orthanc-dicomweb with apt)")
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config), encoding="utf-8")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([shutil.which("Orthanc"), str(self.config)], stdout=log, stderr=log)
        log.close()
        wait_for(self._up, 30, "Orthanc to answer", interval=0.1)

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as answer:
            return json.load(answer)

    @property
    def stow_url(self) -> str:
        """The DICOMweb plugin's STOW-RS endpoint (the README's ``DicomWeb`` root)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web/studies"

    def study_modalities(self, study_uid: str) -> list[str]:
        """The Modality of each series of the study (REST /studies/{id}/series), sorted; [] when Orthanc lacks it."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/tools/lookup", data=study_uid.encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            found = [r["ID"] for r in json.load(answer) if r["Type"] == "Study"]
        if not found:
            return []
        return sorted(s["MainDicomTags"].get("Modality", "") for s in self.get(f"/studies/{found[0]}/series"))

    def count(self, modality: str) -> int:
        """How many instances of ``modality`` Orthanc holds (REST /tools/find)."""
        query = json.dumps({"Level": "Instance", "Query": {"Modality": modality}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/tools/find", data=query, method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return len(json.load(answer))

    def instances(self) -> list[dict[str, Any]]:
        """Every instance: its simplified tags plus ``_study`` (Orthanc's study id, what the viewer groups by)."""
        found = []
        for instance in self.get("/instances"):
            tags = self.get(f"/instances/{instance}/simplified-tags")
            series = self.get(f"/instances/{instance}")["ParentSeries"]
            tags["_study"] = self.get(f"/series/{series}")["ParentStudy"]
            found.append(tags)
        return found

    def segs_by_source(self) -> dict[str, dict[str, Any]]:
        """SEG instances keyed by the SOP Instance UID of the image they reference."""
        segs = {}
        for tags in self.instances():
            if tags.get("Modality") == "SEG":
                ref = tags["ReferencedSeriesSequence"][0]["ReferencedInstanceSequence"][0]
                segs[ref["ReferencedSOPInstanceUID"]] = tags
        return segs
