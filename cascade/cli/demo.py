"""`cascade demo`: synthetic data → both stages trained → tuned → predicted → evaluated → report.md."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole workflow on synthetic data (a few minutes on 2 CPU cores)",
        description="Generate a synthetic SIIM-layout dataset and a held-out test folder, train the segmenter, "
        "train the classifier from the segmenter's encoder, tune the thresholds, predict the test folder, "
        "evaluate it and write DIR/report.md (headline numbers beside the all-empty baseline, what the classifier "
        "gate saves and costs on the held-out set, tuning plots, confusion matrix, overlays). Each step is printed as the 'cascade' command it runs, so the demo doubles "
        "as a walk-through of the real workflow. Needs no data, no GPU and no network.",
    )
    p.add_argument("--out", default="cascade-demo", metavar="DIR", help="folder to create (default ./cascade-demo)")
    p.add_argument("--quick", action="store_true", help="a much smaller run (under a minute): checks the path, not the results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cascade.apps.demo import QUICK, DemoPlan, run_demo
    from cascade.cli.main import main
    from cascade.storage.fileio import check_output

    check_output(args.out, folder=True)
    result = run_demo(args.out, QUICK if args.quick else DemoPlan(), command=main, progress=not args.quiet)
    test, gate = result.test, result.gate
    print(
        f"\ndemo finished in {sum(result.seconds.values()):.0f} s: held-out mean Dice {test['mean_dice']:.4f} "
        f"(all-empty baseline {result.baseline:.4f}), sensitivity {test['sensitivity'] or 0:.3f}, "
        f"specificity {test['specificity'] or 0:.3f}\n"
        f"the gate (held-out AUC {gate['gate']['classifier_auc']:.3f}) kept "
        f"{100 * gate['gate']['skipped_negatives']:.0f}% of the negatives from the segmenter: mean Dice "
        f"{gate['gate']['mean_dice']:.4f} with it, {gate['open']['mean_dice']:.4f} with the gate open, "
        f"{gate['gate']['speedup']:.2f}× the gate-open speed\n"
        f"report: {result.report}"
    )
    return 0
