"""`cascade evaluate`: score a submission CSV against a label CSV with the challenge metric."""

from __future__ import annotations

import argparse

LABEL_WIDTH = 24
"""Width of the label column of the printed summary (values start at this column)."""

DESCRIPTION = """\
Print the challenge metric (mean per-image Dice; an image with empty truth and empty prediction scores 1) beside
the all-empty baseline (the score of predicting nothing anywhere: the share of negative images), the Dice on true
positives (images both labelled and predicted positive), the Dice on all positives (misses as 0), the image-level
confusion matrix, sensitivity and specificity. Both files are read like label files: several rows of one ImageId
are united into one mask. By default every labelled image is scored, and a labelled image absent from the
submission counts as an empty prediction (as in the challenge) and is listed; --only-submitted scores just the
images the submission names. A submitted ImageId without a label is an error unless --ignore-unknown."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a submission CSV against labels (mean per-image Dice, baseline, confusion matrix, ...)",
        description=DESCRIPTION,
    )
    p.add_argument("submission", metavar="SUBMISSION_CSV", help="ImageId,EncodedPixels file to score")
    p.add_argument("--labels", required=True, metavar="CSV", help="the truth: a label CSV (.gz allowed)")
    p.add_argument("--report", metavar="DIR", help="also write evaluate.json and PNG plots into DIR")
    p.add_argument(
        "--only-submitted", action="store_true",
        help="score only the labelled images the submission names (e.g. one fold), not every labelled image",
    )
    p.add_argument(
        "--ignore-unknown", action="store_true",
        help="leave out submitted ImageIds that have no label (counted) instead of failing",
    )
    p.add_argument(
        "--size",
        nargs=2,
        type=int,
        default=(1024, 1024),
        metavar=("H", "W"),
        help="height and width the RLE strings refer to (default 1024 1024, the SIIM images)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def summary_lines(evaluation: object) -> list[str]:
    """The lines ``cascade evaluate`` prints for an :class:`~cascade.training.evaluation.Evaluation`."""
    from cascade.common.messages import first_few
    from cascade.thresholds.metrics import format_number
    from cascade.training.evaluation import Evaluation

    assert isinstance(evaluation, Evaluation)
    s = evaluation.summary
    c = s.confusion
    rows = [
        ("images", f"{s.images} ({c.tp + c.fn} positive in the labels)"),
        ("mean Dice", f"{format_number(s.mean_dice)} (all-empty baseline {format_number(s.baseline_empty)}, "
                      f"difference {format_number(s.mean_dice - s.baseline_empty)})"),
        ("Dice on true positives", f"{format_number(s.dice_positive)} (mean over the {c.tp} images labelled and "
                                   "predicted positive)"),
        ("Dice on all positives", f"{format_number(s.dice_all_positives)} (mean over the {c.tp + c.fn} labelled "
                                  "positives, misses as 0)"),
        ("sensitivity", format_number(s.sensitivity)),
        ("specificity", format_number(s.specificity)),
        ("confusion", f"tp {c.tp}  fp {c.fp}  fn {c.fn}  tn {c.tn}"),
    ]
    if evaluation.missing:
        rows.append(("missing", f"{len(evaluation.missing)} labelled image(s) absent from the submission, scored "
                                f"as empty (--only-submitted skips them): {first_few(evaluation.missing)}"))
    if evaluation.unknown:
        rows.append(("ignored", f"{len(evaluation.unknown)} submitted ImageId(s) without a label: "
                                f"{first_few(evaluation.unknown)}"))
    return [f"{label:<{LABEL_WIDTH}}{value}" for label, value in rows]


def run(args: argparse.Namespace) -> int:
    from cascade.storage.fileio import check_output
    from cascade.training.evaluation import score_submission

    if args.report:
        check_output(args.report, folder=True, inputs=[args.submission, args.labels])
    evaluation = score_submission(
        args.submission, args.labels, size=tuple(args.size), only_submitted=args.only_submitted,
        ignore_unknown=args.ignore_unknown, progress=not args.quiet,
    )
    for line in summary_lines(evaluation):
        print(line)
    if args.report:
        from cascade.thresholds.report import write_evaluate_report

        extra = {
            "submission": str(args.submission),
            "labels": str(args.labels),
            "size": list(args.size),
            "only_submitted": args.only_submitted,
            **{k: v for k, v in evaluation.to_dict().items() if k not in evaluation.summary.to_dict()},
        }
        paths = write_evaluate_report(
            evaluation.summary, evaluation.dices, evaluation.true_positive, args.report, extra
        )
        print(f"{'report':<{LABEL_WIDTH}}{', '.join(str(p) for p in paths)}")
    return 0
