"""Render docs/benchmarks.md from the committed benchmark results (benchmarks/results/*.json).

One section per benchmark (every script in benchmarks/ that writes a result, and every name found among the
results), its runs side by side in one table — a column per run, oldest first: date, machine, commit, command,
then the figures and their baselines. A result transcribed from the documentation instead of measured by the
script says so in its column. The output depends only on the files, so the committed page can be checked against
them (``--check``, and tests/test_benchmarks_report.py).

    python benchmarks/report.py                  # writes docs/benchmarks.md
    python benchmarks/report.py --check          # exit 1 when docs/benchmarks.md differs from what it would write
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
PAGE = BENCHMARKS.parent / "docs" / "benchmarks.md"
NOT_SCRIPTS = {"results", "report", "plain_baseline"}
"""Modules in benchmarks/ that are not benchmarks."""


def load(folder: Path) -> list[dict[str, Any]]:
    """Every result in ``folder``, each with its file name under ``_file``."""
    out = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        record["_file"] = path.name
        out.append(record)
    return out


def scripts(folder: Path) -> dict[str, str]:
    """Benchmark name → the first line of its script's docstring."""
    out = {}
    for path in sorted(folder.glob("*.py")):
        if path.stem in NOT_SCRIPTS:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        out[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def number(value: Any) -> str:
    """A figure as text: integers with thousands separators, floats to 4 significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if value is None:
        return "—"
    return str(value)


def machine(m: dict[str, Any]) -> str:
    """The machine in words: as the source described it, else CPU model, cores, bf16/VNNI/AMX, memory, GPU."""
    if m.get("described"):
        return str(m["described"])
    parts = [str(m.get("cpu") or "unknown CPU")]
    if m.get("cores"):
        parts.append(f"{m['cores']} cores")
    if m.get("bf16"):
        parts.append("native bf16" + (" (AMX)" if m.get("amx") else ""))
    else:
        parts.append("AVX2-only, no native bf16" if m.get("avx2") else "no native bf16")
    parts.append("VNNI" if m.get("vnni") else "no VNNI")
    if m.get("memory_gib"):
        parts.append(f"{number(m['memory_gib'])} GiB")
    parts.append(f"GPU {m['gpu']}" if m.get("gpu") else "no GPU")
    return ", ".join(parts)


def commit(r: dict[str, Any]) -> str:
    c = r.get("commit")
    text = c[:7] if c else "—"
    return text + (" (uncommitted changes)" if r.get("dirty") else "")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section(name: str, about: str, runs: list[dict[str, Any]]) -> list[str]:
    lines = [f"## {name}", ""]
    if about:
        lines += [about, ""]
    if not runs:
        return lines + [f"No result recorded yet: run `python benchmarks/{name}.py`.", ""]
    runs = sorted(runs, key=lambda r: (r.get("date") or "", r["_file"]))
    rows: list[tuple[str, list[str]]] = [
        ("date (UTC)", [(r.get("date") or "—").replace("T", " ").replace("Z", "") for r in runs]),
        ("machine", [machine(r.get("machine") or {}) for r in runs]),
        ("commit", [commit(r) for r in runs]),
        ("command", [f"`{r.get('command', '')}`" for r in runs]),
        ("source", [f"transcribed {r['transcribed']}" if r.get("transcribed") else "measured by the script"
                    for r in runs]),
        ("torch", [number((r.get("versions") or {}).get("torch")) for r in runs]),
    ]
    for field, prefix in (("figures", ""), ("baselines", "baseline: ")):
        keys: list[str] = []
        for r in runs:
            keys += [k for k in (r.get(field) or {}) if k not in keys]
        rows += [(prefix + k, [number((r.get(field) or {}).get(k)) if k in (r.get(field) or {}) else "—"
                               for r in runs]) for k in keys]
    if any(r.get("note") for r in runs):
        rows.append(("note", [str(r.get("note") or "") for r in runs]))
    rows.append(("file", [f"`{r['_file']}`" for r in runs]))
    lines.append("| | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |")
    lines.append("|---|" + "---|" * len(runs))
    lines += ["| " + cell(label) + " | " + " | ".join(cell(v) for v in values) + " |" for label, values in rows]
    return lines + [""]


def render(results: Path = RESULTS, scripts_folder: Path = BENCHMARKS) -> str:
    found = load(results)
    about = scripts(scripts_folder)
    names = sorted(set(about) | {r["benchmark"] for r in found})
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit by hand (a test "
        "checks that this page equals what the script renders). Each script in `benchmarks/` writes one such file "
        "per run (`--json FILE`, default `benchmarks/results/<script>-<UTC date time>.json`) with the command line, "
        "the git commit, the machine (CPU model and its bf16 / VNNI / AMX flags, cores, memory, GPU), the library "
        "versions and the figures beside their baselines. Runs of one benchmark stand side by side, oldest first. "
        "A column marked *transcribed* holds figures copied from the documentation, not re-run: its machine is as "
        "the text described it, and its commit is the one whose documentation first stated the figure (the code "
        "measured is that commit or an earlier one).",
        "",
        "Compare ratios within one run, not timings across runs or machines: on a shared 2-core CPU timings move by "
        "10–30% between runs.",
        "",
    ]
    for name in names:
        lines += section(name, about.get(name, ""), [r for r in found if r["benchmark"] == name])
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of result files")
    parser.add_argument("--out", type=Path, default=PAGE, help="page to write (default docs/benchmarks.md)")
    parser.add_argument("--check", action="store_true", help="only compare with --out; exit 1 when it differs")
    args = parser.parse_args(argv)
    text = render(args.results)
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'differs from the results; run python benchmarks/report.py'}")
        return 0 if same else 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
