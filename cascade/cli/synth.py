"""`cascade synth`: write a synthetic data set in the SIIM-ACR layout (DICOMs + stage-1 style label CSV)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from cascade.data.synth_spec import DEFAULT_SIZE, LESION_STYLES

    p = sub.add_parser(
        "synth",
        help="write synthetic chest radiographs with known pneumothorax masks (SIIM-ACR layout)",
        description="Write OUT/dicom-images-train/<study>/<series>/<uid>.dcm (8-bit JPEG Baseline, like the "
        "challenge) and OUT/train-rle.csv (stage-1 style, one row per annotation). Lesions are peripheral "
        "regions without lung markings, darker, edged by a pleural line. The same seed gives the same files.",
    )
    p.add_argument("out", metavar="OUT", help="output folder (new, or without a data set in it)")
    p.add_argument("--images", type=int, default=200, metavar="N", help="number of images (default 200)")
    p.add_argument(
        "--positive-fraction",
        type=float,
        default=0.22,
        metavar="F",
        help="share of images with a pneumothorax, 0..1 (default 0.22, as in the challenge)",
    )
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, metavar="PX", help=f"image side (default {DEFAULT_SIZE})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument(
        "--difficulty",
        choices=sorted(LESION_STYLES),
        default="easy",
        help="lesion contrast and size: easy (learnable in a few CPU epochs) or realistic (subtle)",
    )
    p.add_argument(
        "--mask-bank",
        metavar="LABELS_CSV",
        help="take lesion shapes from the positives of a 1024x1024 label file (e.g. the challenge's train-rle.csv)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cascade.data.synth import generate
    from cascade.storage.fileio import check_output

    check_output(args.out, folder=True, inputs=[args.mask_bank] if args.mask_bank else [])
    summary = generate(
        args.out,
        images=args.images,
        positive_fraction=args.positive_fraction,
        size=args.size,
        seed=args.seed,
        difficulty=args.difficulty,
        mask_bank=args.mask_bank,
        progress=not args.quiet,
    )
    print(
        f"wrote {summary.images} images ({summary.positives} positive, {summary.annotations} annotations, "
        f"{summary.patients} patients) and {summary.labels}"
    )
    return 0
