"""`cascade demo --quick`: the quick start's whole path runs and writes a report whose every picture exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cascade.cli.main import main


def test_quick_demo_writes_a_complete_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for command in ("synth", "train --stage seg", "train --stage cls", "tune", "predict", "evaluate"):
        assert f"$ cascade {command}" in printed
    assert "--init-from" in printed  # the gate comes from the segmenter, as the README recommends
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "The gate: a shared-encoder gate" in report  # what --init-from makes with no other flag
    assert json.loads((out / "model" / "classifier" / "config.json").read_text())["gate"] == "shared"
    assert "all-empty baseline" in report and "mean Dice" in report
    evaluation = json.loads((out / "evaluation" / "evaluate.json").read_text())
    assert f"| mean Dice (challenge metric) | **{evaluation['mean_dice']:.4f}** | {evaluation['baseline_empty']:.4f} |" \
        in report  # the report's headline is the evaluation's number
    gate = re.search(r"\| tuned gate .*? \| ([0-9.]+) \| (\d+)% \|", report)
    assert gate is not None and float(gate.group(1)) == pytest.approx(evaluation["mean_dice"], abs=5e-5)
    assert "| gate open | " in report
    assert "40% positive in both" in report  # the quick plan's share; the full demo's is SIIM's 22%
    speed = re.search(r"Classifier ROC AUC on the held-out images ([0-9.]+|n/a)\. Predicting them with the tuned "
                      r"gate took ([0-9.]+) s against ([0-9.]+) s with the gate open: ([0-9.]+)× the gate-open speed",
                      report)
    assert speed is not None, "the report gives the gate's held-out AUC and speed-up"
    gated, opened, ratio = (float(speed.group(k)) for k in (2, 3, 4))
    assert ratio == pytest.approx(opened / gated, abs=0.01 + 0.01 * ratio / min(gated, opened))  # within rounding
    printed_speed = re.search(r"the gate \(held-out AUC ([0-9.]+|nan)\) kept .* ([0-9.]+)× the gate-open speed",
                              printed)
    assert printed_speed is not None and printed_speed.group(2) == speed.group(4)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 6
    for image in images:
        assert (out / image).is_file(), image
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 2  # refuses to overwrite a finished demo
