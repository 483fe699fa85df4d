"""`cascade tune`: training runs → a self-contained MODEL_DIR with thresholds tuned on their validation fold(s)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from cascade.cli.argtypes import add_speed_arguments, non_negative_int, positive_int, probability, runtime_from_args

if TYPE_CHECKING:
    from cascade.training.tuning import TuneOutcome

DESCRIPTION = """\
Predict the validation fold shared by a classifier run and a segmenter run (trained with the same --images,
--labels, --folds, --fold and --seed), search the thresholds that maximise mean per-image Dice (the challenge
metric, at each image's native size), and write MODEL_DIR: cascade.json, MODEL_CARD.md, the stage folders and
report/ (tune.json, frontier and operating-point tables, PNG plots). Images and labels default to where the runs
recorded them. Several runs per --cls/--seg (one per fold) make an out-of-fold tuned fold ensemble
(docs/fold-ensembles.md). A gate that does not pay (classifier AUC below 0.6, or the best gate keeping under 5% of
the validation negatives from the segmenter) is opened: cls 0, and a "gate open" line says why. Warnings name a
validation fold too small to trust and a best point on the edge of a searched range (--grid widens it)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="tune the thresholds on the validation fold and write a model folder", description=DESCRIPTION
    )
    p.add_argument(
        "--cls", required=True, nargs="+", metavar="RUN_DIR",
        help="classifier run ('cascade train --stage cls'); several: one per fold, a fold ensemble",
    )
    p.add_argument(
        "--seg", required=True, nargs="+", metavar="RUN_DIR",
        help="segmenter run ('cascade train --stage seg'); several: one per fold, paired with --cls by fold",
    )
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write (replaced if it is one)")
    p.add_argument(
        "--min-sensitivity", type=probability, metavar="X",
        help="best mean Dice among the thresholds whose image-level sensitivity is at least X (triage)",
    )
    p.add_argument(
        "--max-segmenter-share", type=probability, metavar="S",
        help="best mean Dice among the gates that send at most a share S of the images to the segmenter (speed)",
    )
    p.add_argument(
        "--dice-tolerance", type=probability, metavar="D",
        help="choose, among the thresholds within D mean Dice of the best, the gate that sends the fewest images to "
        "the segmenter (default 0.005: speed for a cost well inside a validation fold's noise; 0: the best mean "
        "Dice alone)",
    )
    p.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, default=False,
        help="horizontal-flip test-time augmentation while tuning; recorded in cascade.json for predict (default off)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="B", help="images per batch (default 16)")
    p.add_argument("--device", default="auto", metavar="D", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=non_negative_int, metavar="N", help="decoding processes (default: half the CPUs)")
    add_speed_arguments(p)
    p.add_argument("--images", metavar="DIR", help="images folder (default: the one the runs were trained on)")
    p.add_argument("--labels", metavar="CSV", help="label CSV (default: the one the runs were trained on)")
    p.add_argument(
        "--grid", metavar="YAML",
        help="values to search per threshold (cls, top, area, bottom, min_component: lists), replacing the "
        "default's for the names given; tune warns when the best point sits on the edge of a range",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)



def summary_lines(outcome: TuneOutcome) -> list[str]:
    """The lines ``cascade tune`` prints: what was searched, the chosen thresholds and their validation scores."""
    from cascade.thresholds.metrics import format_number

    v = outcome.metrics["validation"]
    th = outcome.result.thresholds
    limits = [f"sensitivity ≥ {v['min_sensitivity']:g}"] if v["min_sensitivity"] is not None else []
    if v.get("max_segmented_share") is not None:
        limits.append(f"segmented share ≤ {v['max_segmented_share']:g}")
    mode = f" subject to {' and '.join(limits)}" if limits else ""
    c = v["confusion"]
    oof = v.get("out_of_fold")
    where = (
        f"validation fold {v['fold']} of {v['folds']}" if oof is None
        else f"out-of-fold on folds {', '.join(map(str, oof['folds']))} of {v['folds']} (each by its own pair)"
    )
    members = (
        "" if oof is None else f" with {len(oof['folds'])} classifiers and {len(oof['folds'])} segmenters (averaged)"
    )
    return [
        f"{where}: {v['images']} images, {v['positives']} positive"
        + (f", {v['unreadable_images']} unreadable (left out)" if v["unreadable_images"] else "")
        + f"; scored at native resolution{', flip TTA' if v['tta'] else ''}, networks at {v['precision']}"
        + (f" ({outcome.runtime.describe()})" if outcome.runtime else ""),
        f"thresholds{mode}: {th.describe()}",
        f"mean Dice {format_number(v['mean_dice'])} (all-empty baseline {format_number(v['baseline_empty'])}), "
        f"Dice on true positives {format_number(v['dice_positive'])}",
        f"sensitivity {format_number(v['sensitivity'], 3)}, specificity {format_number(v['specificity'], 3)} "
        f"(tp {c['tp']}, fp {c['fp']}, fn {c['fn']}, tn {c['tn']}), "
        f"classifier AUC {format_number(v['classifier_auc'])}",
        f"the gate sends {100 * v['segmented_share']:.1f}% of images to the segmenter and keeps "
        f"{format_number(100 * v['skipped_negatives'] if v['skipped_negatives'] is not None else None, 1)}% of the "
        "negatives from it (report/frontier.png: Dice against segmenter share)",
        *([f"speed: {v['mean_dice'] - v['best_mean_dice']:+.4f} mean Dice against the best point's "
           f"{v['best_mean_dice']:.4f}, for the gate that segments the fewest images within --dice-tolerance "
           f"{v['dice_tolerance']:g}"] if v.get("best_mean_dice") is not None and v["mean_dice"] < v["best_mean_dice"]
          else []),
        *([v["gate_open"]] if v.get("gate_open") else []),
        f"model folder {outcome.model_dir}{members}, report in {outcome.report_dir} ({outcome.seconds:.1f} s)",
    ]


def run(args: argparse.Namespace) -> int:
    from cascade.errors import ConfigError
    from cascade.storage.fileio import check_output, input_file

    for flag, runs in (("--cls", args.cls), ("--seg", args.seg)):
        for run in runs:
            input_file(run, ConfigError, f"run folder (give {flag} a folder written by 'cascade train')", folder=True)
    check_output(args.out, folder=True, inside=[*args.cls, *args.seg],
                 inputs=[p for p in (args.images, args.labels) if p])
    from cascade.thresholds.search import read_grid
    from cascade.training.tuning import tune_runs  # torch: imported once the output has been checked

    grid = read_grid(args.grid) if args.grid else None
    outcome = tune_runs(
        args.cls, args.seg, args.out,
        min_sensitivity=args.min_sensitivity, max_segmented_share=args.max_segmenter_share,
        **({} if args.dice_tolerance is None else {"dice_tolerance": args.dice_tolerance}), tta=args.tta,
        batch_size=args.batch_size, workers=args.workers, runtime=runtime_from_args(args), images=args.images,
        labels=args.labels, grid=grid, progress=not args.quiet,
    )
    for line in outcome.failed:
        print(f"cascade tune: warning: left out of the search: {line}", file=sys.stderr)
    for line in outcome.result.warnings():
        print(f"cascade tune: warning: {line}", file=sys.stderr)
    for line in summary_lines(outcome):
        print(f"cascade tune: {line}")
    return 0
