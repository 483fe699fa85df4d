"""One JSON result per benchmark run: what ran, where, on which code, and the figures with their baselines.

Every script in benchmarks/ adds ``--json FILE`` with :func:`add_json_argument` and calls :func:`write_result` once
at the end. Without ``--json`` a run by a person writes ``benchmarks/results/<script>-<UTC date time>.json``; a run
under the test suite (``PYTEST_CURRENT_TEST`` set, which children inherit) writes nothing unless given ``--json``,
so tests never write into the repository. ``python benchmarks/report.py`` renders docs/benchmarks.md from the
committed files.

A result file::

    {"schema": 1, "benchmark": "rle", "command": "python benchmarks/rle.py ...", "date": "...Z",
     "commit": "<git HEAD>", "dirty": false, "machine": machine(), "versions": versions(),
     "settings": {argument: value}, "figures": {name: value}, "baselines": {name: value}}

A file transcribed from the documentation rather than measured by the script carries ``"transcribed": "<from
where>; not re-run"``, and the report shows that mark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = 1
BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
REPO = BENCHMARKS.parent

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
"""The /proc/cpuinfo flags that decide cascade's speed: bf16 (AVX512-BF16, AMX) and 8-bit dot products (VNNI)."""

PACKAGES = {"torch": "torch", "timm": "timm", "smp": "segmentation-models-pytorch", "onnxruntime": "onnxruntime",
            "numpy": "numpy", "cascade": "pneumothorax-cascade"}
"""Version keys → distribution names (read from the installed metadata, nothing imported)."""


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="write the result here (default: benchmarks/results/<script>-<UTC date time>.json; "
                             "nothing under the test suite)")


def cpu(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model name and the speed-relevant flags, from /proc/cpuinfo text (read from the file when not given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    present = [f for f in CPU_FLAGS if f in flags]
    return {
        "model": model or platform.processor() or platform.machine() or "unknown",
        "flags": present,
        "avx2": "avx2" in flags,
        "bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "amx": bool({"amx_bf16", "amx_int8", "amx_tile"} & flags),
    }


def memory_gib(meminfo: str | None = None) -> float | None:
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            return None
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def gpu() -> str | None:
    """The GPU torch sees (name, count), or None; torch is only asked when the script already imported it."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            n = torch.cuda.device_count()
            return f"{torch.cuda.get_device_name(0)}" + (f" x{n}" if n > 1 else "")
    except Exception:  # noqa: BLE001 - a broken CUDA setup is recorded as no GPU
        pass
    return None


def machine(cpuinfo: str | None = None, meminfo: str | None = None) -> dict[str, Any]:
    """Where a benchmark ran: CPU model and flags, cores, memory, GPU."""
    info = cpu(cpuinfo)
    return {"cpu": info.pop("model"), **info, "cores": os.cpu_count(), "memory_gib": memory_gib(meminfo),
            "gpu": gpu(), "os": platform.system()}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in PACKAGES.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def git_commit() -> tuple[str | None, bool | None]:
    """HEAD of the repository and whether the working tree differs from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return head, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def _plain(value: Any) -> Any:
    """JSON-able form of an argument or figure value (paths as text, numpy scalars as numbers)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def result(name: str, figures: dict[str, Any], baselines: dict[str, Any], args: argparse.Namespace | None,
           argv: list[str] | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The result record (what :func:`write_result` writes)."""
    argv = sys.argv[1:] if argv is None else argv
    commit, dirty = git_commit()
    settings = {k: v for k, v in vars(args).items() if k != "json"} if args is not None else {}
    return {
        "schema": SCHEMA,
        "benchmark": name,
        "command": shlex.join(["python", f"benchmarks/{name}.py", *argv]),
        "date": (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "dirty": dirty,
        "machine": machine(),
        "versions": versions(),
        "settings": _plain(settings),
        "figures": _plain(figures),
        "baselines": _plain(baselines),
    }


def default_path(name: str, now: datetime) -> Path | None:
    """benchmarks/results/<name>-<UTC>.json for a person's run; None under the test suite."""
    if os.environ.get("PYTEST_CURRENT_TEST"):
        return None
    return RESULTS / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"


def write_result(name: str, figures: dict[str, Any], baselines: dict[str, Any],
                 args: argparse.Namespace | None) -> Path | None:
    """Write one run's result to ``args.json`` (or the default path); say where on stderr; return the path."""
    now = datetime.now(timezone.utc)
    record = result(name, figures, baselines, args, now=now)
    path = getattr(args, "json", None) or default_path(name, now)
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"result written to {path}", file=sys.stderr)
    return path
