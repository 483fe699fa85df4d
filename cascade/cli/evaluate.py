"""`cascade evaluate`: score a submission CSV against a label CSV with the challenge metric."""

from __future__ import annotations

import argparse

SHOWN_IDS = 5


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a submission CSV against labels (mean per-image Dice, confusion matrix, ...)",
        description="Print the challenge metric (mean per-image Dice; an image with empty truth and empty "
        "prediction scores 1), the mean Dice on true positives, the image-level confusion matrix, sensitivity "
        "and specificity. Both files are read like label files: several rows of one ImageId are united into one "
        "mask (so a '-1' row beside an RLE row adds nothing). Images in the labels but not in the submission "
        "count as empty predictions and are listed; a submission ImageId absent from the labels is an error.",
    )
    p.add_argument("submission", metavar="SUBMISSION_CSV", help="ImageId,EncodedPixels file to score")
    p.add_argument("--labels", required=True, metavar="CSV", help="the truth: a label CSV (.gz allowed)")
    p.add_argument("--report", metavar="DIR", help="also write evaluate.json and PNG plots into DIR")
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



def _first(ids: list[str]) -> str:
    more = f", … (+{len(ids) - SHOWN_IDS} more)" if len(ids) > SHOWN_IDS else ""
    return ", ".join(ids[:SHOWN_IDS]) + more


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from cascade.data.labels import read_labels
    from cascade.errors import ConfigError, LabelError
    from cascade.fileio import check_output
    from cascade.thresholds.metrics import dice, format_number, summarize

    height, width = args.size
    if height <= 0 or width <= 0:
        raise ConfigError(f"--size must be two positive integers, got {height} {width}")
    if args.report:
        check_output(args.report, folder=True, inputs=[args.submission, args.labels])
    truth = read_labels(args.labels)
    sub = read_labels(args.submission)
    unknown = [i for i in sub.image_ids if i not in truth]
    if unknown:
        raise LabelError(
            f"{args.submission}: {len(unknown)} ImageId(s) not in the labels {args.labels}: {_first(unknown)}"
        )
    missing = [i for i in truth.image_ids if i not in sub]
    dices = np.ones(len(truth), dtype=np.float64)
    pred_pos = np.zeros(len(truth), dtype=bool)
    true_pos = np.zeros(len(truth), dtype=bool)
    ids = tqdm(truth.image_ids, desc="evaluate", unit="img", disable=args.quiet)
    for k, image_id in enumerate(ids):
        true_pos[k] = truth.is_positive(image_id)
        pred_pos[k] = image_id in sub and sub.is_positive(image_id)
        if true_pos[k] or pred_pos[k]:  # both empty: Dice 1 without decoding anything
            predicted = sub.mask(image_id, height, width) if pred_pos[k] else np.zeros((height, width), bool)
            dices[k] = dice(predicted, truth.mask(image_id, height, width))
    summary = summarize(dices, pred_pos, true_pos)
    c = summary.confusion
    print(f"images           {summary.images} ({int(true_pos.sum())} positive in the labels)")
    print(f"mean Dice        {format_number(summary.mean_dice)}")
    print(f"Dice positive    {format_number(summary.dice_positive)} (mean over the {c.tp} true positives)")
    print(f"sensitivity      {format_number(summary.sensitivity)}")
    print(f"specificity      {format_number(summary.specificity)}")
    print(f"confusion        tp {c.tp}  fp {c.fp}  fn {c.fn}  tn {c.tn}")
    if missing:
        note = f"{len(missing)} labelled image(s) absent from the submission, scored as empty"
        print(f"missing          {note}: {_first(missing)}")
    if args.report:
        from cascade.thresholds.report import write_evaluate_report

        extra = {
            "submission": str(args.submission),
            "labels": str(args.labels),
            "size": [height, width],
            "missing_from_submission": {"count": len(missing), "first": missing[:SHOWN_IDS]},
        }
        paths = write_evaluate_report(summary, dices, true_pos, args.report, extra)
        print(f"report           {', '.join(str(p) for p in paths)}")
    return 0
