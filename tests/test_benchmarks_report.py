"""Benchmark results as data: the shared helper's record, the rendered page, and the committed page kept in step.

Nothing here runs a benchmark: results are written by hand into tmp_path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


results = _module("results")
report = _module("report")

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
AVX2_ONLY = "model name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n"
MEMINFO = "MemTotal:       16303420 kB\nMemFree:         1000 kB\n"


def test_machine_reads_cpu_flags_from_cpuinfo() -> None:
    m = results.machine(CPUINFO, MEMINFO)
    assert m["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert m["bf16"] and m["vnni"] and m["amx"] and m["avx2"]
    assert m["flags"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"]
    assert m["memory_gib"] == 15.5 and m["cores"] >= 1
    epyc = results.machine(AVX2_ONLY, MEMINFO)
    assert epyc["cpu"] == "AMD EPYC 7B12" and epyc["flags"] == ["avx2"]
    assert epyc["avx2"] and not (epyc["bf16"] or epyc["vnni"] or epyc["amx"])
    assert "AVX2-only, no native bf16, no VNNI" in report.machine(epyc)
    assert "native bf16 (AMX), VNNI" in report.machine(results.machine(CPUINFO, MEMINFO))


def test_write_result_records_the_run(tmp_path: Path) -> None:
    args = argparse.Namespace(images=60, data=Path("/x"), json=tmp_path / "r" / "latency.json")
    written = results.write_result("latency", {"speed-up x": 1.5, "ok": True}, {"fp32 ms": 300.0}, args)
    assert written == args.json
    record = json.loads(written.read_text())
    assert record["benchmark"] == "latency" and record["command"].startswith("python benchmarks/latency.py")
    assert record["figures"] == {"speed-up x": 1.5, "ok": True} and record["baselines"] == {"fp32 ms": 300.0}
    assert record["settings"] == {"images": 60, "data": "/x"}
    assert record["date"].endswith("Z") and set(record["machine"]) >= {"cpu", "flags", "bf16", "vnni", "cores"}
    assert {"python", "torch", "timm", "smp", "onnxruntime"} <= set(record["versions"])


def test_no_default_result_file_under_the_test_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime(2026, 12, 5, 17, 0, 1, tzinfo=timezone.utc)
    assert results.default_path("rle", now) is None  # PYTEST_CURRENT_TEST is set while a test runs
    assert results.write_result("rle", {}, {}, argparse.Namespace(json=None)) is None
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    assert results.default_path("rle", now) == BENCHMARKS / "results" / "rle-20261205T170001Z.json"


def _result(folder: Path, name: str, date: str, figure: float, **extra) -> None:
    record = {"schema": 1, "benchmark": name, "command": f"python benchmarks/{name}.py", "date": date,
              "commit": "0123456789abcdef", "dirty": False, "versions": {"torch": "2.0"},
              "machine": results.machine(AVX2_ONLY if date < "2026-12" else CPUINFO, MEMINFO) | {"cores": 2,
                                                                                               "gpu": None},
              "figures": {"speed-up x": figure, "identical": True}, "baselines": {"loop ms": 250.0}, **extra}
    (folder / f"{name}-{date.replace(':', '')}.json").write_text(json.dumps(record))


def test_report_renders_runs_side_by_side_deterministically(tmp_path: Path) -> None:
    found = tmp_path / "results"
    found.mkdir()
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "rle.py").write_text('"""RLE codec against a loop."""\n')
    (scripts / "idle.py").write_text('"""Never run."""\n')
    (scripts / "results.py").write_text('"""Not a benchmark."""\n')
    _result(found, "rle", "2026-12-02T10:00:00Z", 223.0, transcribed="from README.md at commit abc; not re-run")
    _result(found, "rle", "2026-11-28T10:00:00Z", 269.0)
    page = report.render(found, scripts)
    assert page == report.render(found, scripts)
    lines = page.splitlines()
    assert [x for x in lines if x.startswith("## ")] == ["## idle", "## rle"]
    assert "No result recorded yet: run `python benchmarks/idle.py`." in page
    assert "RLE codec against a loop." in page
    table = lines[lines.index("| | run 1 | run 2 |"):]
    assert table[2] == "| date (UTC) | 2026-11-28 10:00:00 | 2026-12-02 10:00:00 |"  # oldest first
    assert table[3] == ("| machine | AMD EPYC 7B12, 2 cores, AVX2-only, no native bf16, no VNNI, 15.5 GiB, no GPU "
                        "| Intel(R) Xeon(R) Platinum 8480+, 2 cores, native bf16 (AMX), VNNI, 15.5 GiB, no GPU |")
    assert table[4] == "| commit | 0123456 | 0123456 |"
    assert "| source | measured by the script | transcribed from README.md at commit abc; not re-run |" in page
    assert "| speed-up x | 269 | 223 |" in page and "| identical | yes | yes |" in page
    assert "| baseline: loop ms | 250 | 250 |" in page


def test_committed_page_equals_the_rendered_results() -> None:
    page = ROOT / "docs" / "benchmarks.md"
    assert page.read_text(encoding="utf-8") == report.render(), (
        "docs/benchmarks.md differs from benchmarks/results/*.json: run python benchmarks/report.py")


def test_every_committed_result_is_complete() -> None:
    files = sorted((BENCHMARKS / "results").glob("*.json"))
    assert files
    for path in files:
        record = json.loads(path.read_text(encoding="utf-8"))
        assert {"benchmark", "command", "date", "commit", "machine", "figures", "baselines"} <= set(record), path
        assert record["figures"], path
        if record.get("transcribed"):
            assert record["transcribed"].endswith("not re-run"), path
