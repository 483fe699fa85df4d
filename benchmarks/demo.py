"""`cascade demo` end to end, recorded: its held-out figures beside the all-empty and gate-open baselines of the run.

Runs the demo exactly as ``cascade demo`` does (the same :class:`cascade.apps.demo.DemoPlan`, each step through the
command line's entry point) into ``--out`` (default: a temporary folder, removed afterwards) and writes a result
file with the figures its report gives: wall time, held-out mean Dice, sensitivity, specificity, the gate's
validation and held-out ROC AUC, the tuned ``cls``, the share of held-out negatives kept from the segmenter, and the
held-out prediction time with the tuned gate and with the gate open (``cls`` 0). The two are predicted in the same
run, in turn, twice each, the fastest of each counted, so their ratio is the gate's speed-up on this machine. The
demo trains in fp32 everywhere but tunes and predicts on the ``auto`` engine (bf16 where the CPU has native bf16),
so the scores depend on the kind of CPU (the result names it).

Run: ``python benchmarks/demo.py`` (about 6 minutes on an idle 2-core CPU with native bf16); ``--quick`` runs
``cascade demo --quick``'s plan (checks the script, measures nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import add_json_argument, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="demo folder to create (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="the --quick plan: checks the script, measures nothing")
    add_json_argument(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from cascade.apps.demo import QUICK, DemoPlan, run_demo
    from cascade.cli.main import main as cascade

    plan = QUICK if args.quick else DemoPlan()
    args.plan = dataclasses.asdict(plan)  # recorded with the result: sizes, prevalence, epochs
    with tempfile.TemporaryDirectory(prefix="cascade-demo-bench-") as tmp:
        out = args.out or Path(tmp) / "demo"
        start = time.perf_counter()
        run = run_demo(out, plan, command=cascade, progress=False)
        wall = time.perf_counter() - start
    test, gate, validation = run.test, run.gate, run.validation
    figures = {
        "wall time s": round(wall),
        "held-out mean Dice": round(test["mean_dice"], 4),
        "held-out sensitivity": round(test["sensitivity"] or 0.0, 3),
        "held-out specificity": round(test["specificity"] or 0.0, 3),
        "classifier validation AUC": round(validation.get("classifier_auc") or float("nan"), 4),
        "classifier held-out AUC": round(gate["gate"]["classifier_auc"], 4),
        "tuned cls": run.thresholds["cls"],
        "held-out negatives kept from the segmenter %": round(100 * gate["gate"]["skipped_negatives"]),
        "gate predict s": round(gate["gate"]["seconds"], 2),
        "speed-up vs gate-open x": round(gate["gate"]["speedup"], 2),
    }
    baselines = {
        "all-empty mean Dice": round(run.baseline, 4),
        "gate-open mean Dice": round(gate["open"]["mean_dice"], 4),
        "gate-open predict s": round(gate["open"]["seconds"], 2),
    }
    for name, value in {**figures, **baselines}.items():
        print(f"{name:46s} {value}")
    write_result("demo", figures, baselines, args)


if __name__ == "__main__":
    main()
