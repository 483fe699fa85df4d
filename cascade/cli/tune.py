"""`cascade tune`: two training runs → a self-contained MODEL_DIR with thresholds tuned on their validation fold."""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cascade.tuning import TuneOutcome

DESCRIPTION = """\
Predict the validation fold shared by a classifier run and a segmenter run (both written by 'cascade train' with
the same --images, --labels, --folds, --fold and --seed; runs on different folds are refused), search the gate and
mask thresholds that maximise mean per-image Dice (the challenge metric, scored at each image's native size), and
write MODEL_DIR: cascade.json (thresholds, preprocessing, validation metrics, versions, sha256 of the weights),
classifier/ and segmenter/ (copied from each run's best/) and report/ (tune.json, validation.json,
operating_points.csv and PNG plots). The images and labels are found where the runs recorded them (data.json)
unless --images / --labels say otherwise."""


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="tune the thresholds on the validation fold and write a model folder", description=DESCRIPTION
    )
    p.add_argument("--cls", required=True, metavar="RUN_DIR", help="classifier run ('cascade train --stage cls')")
    p.add_argument("--seg", required=True, metavar="RUN_DIR", help="segmenter run ('cascade train --stage seg')")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write (replaced if it is one)")
    p.add_argument(
        "--min-sensitivity", type=_probability, metavar="X",
        help="best mean Dice among the thresholds whose image-level sensitivity is at least X (triage)",
    )
    p.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, default=False,
        help="horizontal-flip test-time augmentation while tuning; recorded in cascade.json for predict (default off)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="B", help="images per batch (default 16)")
    p.add_argument("--device", default="auto", metavar="D", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=_non_negative_int, metavar="N", help="decoding processes (default: half the CPUs)")
    p.add_argument("--images", metavar="DIR", help="images folder (default: the one the runs were trained on)")
    p.add_argument("--labels", metavar="CSV", help="label CSV (default: the one the runs were trained on)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def summary_lines(outcome: TuneOutcome) -> list[str]:
    """The lines ``cascade tune`` prints: what was searched, the chosen thresholds and their validation scores."""
    v = outcome.metrics["validation"]
    th = outcome.result.thresholds
    mode = "" if v["min_sensitivity"] is None else f" subject to sensitivity ≥ {v['min_sensitivity']:g}"
    c = v["confusion"]
    return [
        f"validation fold {v['fold']} of {v['folds']}: {v['images']} images, {v['positives']} positive"
        + (f", {v['unreadable_images']} unreadable (left out)" if v["unreadable_images"] else "")
        + f"; scored at native resolution{', flip TTA' if v['tta'] else ''}",
        f"thresholds{mode}: cls {th.cls:g}, top {th.top:g}, area {th.area:g} px, bottom {th.bottom:g}, "
        f"min_component {th.min_component:g} px (areas at 1024²)",
        f"mean Dice {_num(v['mean_dice'])} (all-empty baseline {_num(v['baseline_empty'])}), "
        f"Dice on true positives {_num(v['dice_positive'])}",
        f"sensitivity {_num(v['sensitivity'], 3)}, specificity {_num(v['specificity'], 3)} "
        f"(tp {c['tp']}, fp {c['fp']}, fn {c['fn']}, tn {c['tn']}), classifier AUC {_num(v['classifier_auc'])}",
        f"the gate sends {100 * v['segmented_share']:.1f}% of images to the segmenter",
        f"model folder {outcome.model_dir}, report in {outcome.report_dir} ({outcome.seconds:.1f} s)",
    ]


def run(args: argparse.Namespace) -> int:
    from cascade.tuning import tune_runs

    outcome = tune_runs(
        args.cls, args.seg, args.out,
        min_sensitivity=args.min_sensitivity, tta=args.tta, batch_size=args.batch_size, workers=args.workers,
        device=args.device, images=args.images, labels=args.labels, progress=not args.quiet,
    )
    for line in outcome.failed:
        print(f"cascade tune: warning: left out of the search: {line}", file=sys.stderr)
    for line in summary_lines(outcome):
        print(f"cascade tune: {line}")
    return 0
