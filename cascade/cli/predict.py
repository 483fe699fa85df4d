"""`cascade predict`: a MODEL_DIR and DICOM files/folders → a challenge submission CSV (and optional overlays)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cascade.pipeline import Prediction

DESCRIPTION = """\
Predict pneumothorax masks for DICOM files and folders (searched recursively for *.dcm) and write the submission
CSV `ImageId,EncodedPixels` (one row per readable image, -1 when negative; the ImageId is the file stem). The
classifier gates the segmenter: only images it passes are segmented. Unreadable files are listed on stderr with
the reason and skipped, as is an image whose ImageId cannot be a CSV row (comma, quote, surrounding space, line
break); the others are still written. FIFOs and devices in a folder are skipped unopened. Exit status: 0 when
every image was predicted, 2 when some input failed or a sub-folder could not be read (or the model folder, the
output paths or the arguments are bad), 143 after SIGTERM."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predict masks for DICOM files and write a submission CSV", description=DESCRIPTION
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model folder written by 'cascade tune'")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="DICOM files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="SUBMISSION_CSV", help="CSV to write (atomically)")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="horizontal-flip test-time augmentation (default: as set in the model folder's cascade.json)",
    )
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per batch (default 16)")
    p.add_argument("--device", default="auto", metavar="D", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument(
        "--workers", type=int, default=None, metavar="N", help="decoding processes (default: half the cores)"
    )
    p.add_argument("--overlays", metavar="DIR", help="also write a PNG per positive image: mask outline + probability")
    p.set_defaults(func=run)


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """The DICOM files to predict (folders searched recursively), in ImageId order, and warnings (duplicates,
    unreadable sub-folders, ``*.dcm`` entries that are not regular files).

    A file named explicitly is taken whatever its extension; if it cannot be read, prediction reports it like any
    other bad file. Several files with one ImageId would give repeated submission rows: the first is kept.
    """
    from cascade.data.index import scan_dicoms

    index = scan_dicoms(*inputs)
    warnings = [
        f"ImageId {image_id} found more than once; kept {index.paths[image_id]}, skipped {', '.join(map(str, extra))}"
        for image_id, extra in sorted(index.duplicates.items())
    ] + index.warnings()
    return [index.paths[k] for k in sorted(index.paths)], warnings


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cascade.data.index import UNREADABLE_FOLDERS
    from cascade.data.labels import submission_id_problem, write_labels
    from cascade.errors import ConfigError, ModelError
    from cascade.fileio import check_output, input_file

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")
    input_file(args.model_dir, ModelError, "model folder", folder=True)
    check_output(args.out, inputs=args.inputs, inside=[args.model_dir])
    if args.overlays:
        check_output(args.overlays, folder=True, inputs=args.inputs, inside=[args.model_dir])
    paths, warnings = collect_inputs(args.inputs)
    check_output(args.out, inputs=paths)
    for warning in warnings:
        print(f"cascade predict: warning: {warning}", file=sys.stderr)
    if not paths:
        raise ConfigError(f"no DICOM files (*.dcm) found in {', '.join(args.inputs)}")
    from cascade.pipeline import Cascade  # torch: imported once the arguments have been checked

    model = Cascade.from_pretrained(args.model_dir, device=args.device, tta=args.tta)

    rows: list[tuple[str, str]] = []
    failures: list[str] = []
    positives = 0
    start = time.perf_counter()
    predictions = model.predict_many(paths, batch_size=args.batch_size, workers=args.workers)
    for pred in tqdm(predictions, total=len(paths), unit="img", desc="predict", file=sys.stderr):
        problem = submission_id_problem(pred.image_id)
        if problem is not None:  # the rest of the submission is still written (docs/robustness.md)
            failures.append(f"{pred.source}: ImageId {pred.image_id!r} {problem}: it cannot be a submission row")
            continue
        if not pred.ok:
            failures.append(str(pred.error))
            continue
        rows.append((pred.image_id, pred.rle))
        if pred.positive:
            positives += 1
            if args.overlays:
                write_overlay(Path(args.overlays) / f"{pred.image_id}.png", pred)
    elapsed = time.perf_counter() - start
    for failure in failures:
        print(f"cascade predict: failed: {failure}", file=sys.stderr)
    if not rows:
        print(f"cascade predict: error: none of the {len(paths)} files could be read; {args.out} not written",
              file=sys.stderr)
        return 2
    write_labels(args.out, rows)
    print(
        f"{len(rows)} images predicted, {positives} positive, {len(failures)} failed, "
        f"{len(paths) / max(elapsed, 1e-9):.1f} images/s (device {model.device}, tta {'on' if model.tta else 'off'})"
        f" → {args.out}"
    )
    return 2 if failures or any(UNREADABLE_FOLDERS in w for w in warnings) else 0


def write_overlay(path: Path, pred: Prediction) -> None:
    """A PNG of the image with the mask outline in red and the classifier probability, written atomically."""
    import cv2
    import numpy as np

    from cascade.data.dicom import read_dicom
    from cascade.data.preprocess import to_uint8
    from cascade.fileio import atomic_path

    grey = to_uint8(read_dicom(pred.source).pixels)
    image = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    scale = max(image.shape[:2]) / 1024
    contours, _ = cv2.findContours(pred.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(image, contours, -1, (0, 0, 255), max(1, round(3 * scale)))
    cv2.putText(
        image,
        f"p={pred.probability:.3f}",
        (round(16 * scale), round(48 * scale)),
        cv2.FONT_HERSHEY_SIMPLEX,
        1.2 * scale,
        (0, 255, 255),
        max(1, round(2 * scale)),
        cv2.LINE_AA,
    )
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
