"""`cascade predict`: a MODEL_DIR and DICOM files/folders → a challenge submission CSV (and the optional per-image
outputs of :data:`cascade.outputs.writers.OUTPUTS`: overlays, DICOM SEG)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cascade.cli.argtypes import (
    add_max_pixels_argument,
    add_speed_arguments,
    non_negative_int,
    positive_int,
    runtime_from_args,
)
from cascade.outputs.writers import OUTPUTS

DESCRIPTION = """\
Predict pneumothorax masks for DICOM files and folders (searched recursively for *.dcm) and write the submission
CSV `ImageId,EncodedPixels` (one row per readable image, -1 when negative; the ImageId is the file stem). The
classifier gates the segmenter: only images it passes are segmented. Unreadable files are listed on stderr with
the reason and skipped, as is an image whose ImageId cannot be a CSV row (comma, quote, surrounding space, line
break); the others are still written. FIFOs and devices in a folder are skipped unopened. Exit status: 0 when
every image was predicted, 2 when some input failed or a sub-folder could not be read (or the model folder, the
output paths or the arguments are bad), 143 after SIGTERM.

Speed: --precision auto runs bf16 where the hardware computes it natively (CUDA, CPUs with AVX512-BF16/AMX) and
fp32 elsewhere; --backend auto picks the measured fastest engine (ONNX Runtime for fp32 on a CPU, exported once into
--cache-dir); a model folder tuned with --precision int8 runs its calibrated int8 graphs (CPU). Sharded: `torchrun
--nproc_per_node N -m cascade predict …` splits the inputs across N processes (one per GPU, or CPU processes), and
rank 0 writes the one CSV, identical to a single-process run."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predict masks for DICOM files and write a submission CSV", description=DESCRIPTION
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model folder written by 'cascade tune'")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="DICOM files and/or folders (searched recursively)")
    p.add_argument(
        "--out", required=True, metavar="SUBMISSION_CSV",
        help="CSV to write, atomically; an existing file there is replaced (it is never one of the inputs)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="horizontal-flip test-time augmentation (default: as set in the model folder's cascade.json)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="B", help="images per batch (default 16)")
    p.add_argument("--device", default="auto", metavar="D", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=non_negative_int, metavar="N", help="decoding processes (default: half the cores)")
    for output in OUTPUTS.values():
        p.add_argument(f"--{output.name}", metavar="DIR", help=output.help)
    add_speed_arguments(p)
    add_max_pixels_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cascade.errors import ModelError
    from cascade.inference.predicting import collect_inputs
    from cascade.storage.fileio import check_output, input_file

    input_file(args.model_dir, ModelError, "model folder", folder=True)
    check_output(args.out, inputs=args.inputs, inside=[args.model_dir])
    input_folders = [p for p in args.inputs if Path(p).is_dir()]  # outputs there would be read back as inputs
    folders = {name: getattr(args, name.replace("-", "_")) for name in OUTPUTS}
    folders = {name: folder for name, folder in folders.items() if folder}
    for folder in folders.values():
        check_output(folder, folder=True, inputs=args.inputs, inside=[args.model_dir, *input_folders])
    files = collect_inputs(args.inputs)
    check_output(args.out, inputs=files.paths)

    from cascade.inference.pipeline import Cascade  # torch: imported once the arguments have been checked
    from cascade.inference.predicting import caught_warnings, predict_files
    from cascade.inference.sharding import current_shard

    shard = current_shard()
    with caught_warnings() as loading:
        model = Cascade.from_pretrained(args.model_dir, runtime=runtime_from_args(args, shard), tta=args.tta)
        model.max_pixels = args.max_pixels
    for line in [*loading, *files.notes] if shard.main else ():
        print(f"cascade predict: warning: {line}", file=sys.stderr)
    writers = {name: OUTPUTS[name].writer(Path(folder)) for name, folder in folders.items()}
    summary = predict_files(model, files, writers, submission=args.out, shard=shard, batch_size=args.batch_size,
                            workers=args.workers)
    failed = bool(summary.failures) or not summary.rows
    if not shard.main:
        return 2 if failed else 0
    for line in summary.warnings:
        print(f"cascade predict: warning: {line}", file=sys.stderr)
    for failure in summary.failures:
        print(f"cascade predict: failed: {failure}", file=sys.stderr)
    if not summary.rows:
        print(f"cascade predict: error: none of the {len(files.paths)} files could be read; {args.out} not written",
              file=sys.stderr)
        return 2
    outputs = "".join(
        f", {OUTPUTS[name].summary.format(count=summary.count(name), folder=folder)}"
        for name, folder in folders.items() if OUTPUTS[name].summary
    )
    processes = f" x {shard.world} processes" if shard.world > 1 else ""
    print(
        f"{summary.rows} images predicted, {summary.positives} positive{outputs}, {len(summary.failures)} failed, "
        f"{summary.images_per_second:.1f} images/s ({model.runtime.describe()}{processes}, "
        f"tta {'on' if model.tta else 'off'}) → {args.out}"
    )
    return 2 if failed or files.folder_unreadable else 0
