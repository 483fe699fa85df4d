"""`cascade predict`: a MODEL_DIR and DICOM files/folders → a challenge submission CSV (and the optional per-image
outputs of :data:`cascade.outputs.writers.OUTPUTS`: overlays, DICOM SEG)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from cascade.cli.argtypes import add_max_pixels_argument, add_speed_arguments, non_negative_int, positive_int
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


def _as_submission_row(pred: Any) -> Any:
    """``pred``, failed if its ImageId cannot be a submission row (the rest of the submission is still written,
    docs/robustness.md)."""
    from cascade.data.labels import submission_id_problem

    problem = submission_id_problem(pred.image_id)
    if problem is None:
        return pred
    return dataclasses.replace(pred, error=f"{pred.source}: ImageId {pred.image_id!r} {problem}: it cannot be a "
                               "submission row", positive=False)


def run(args: argparse.Namespace) -> int:
    from cascade.data.index import UNREADABLE_FOLDERS
    from cascade.errors import CascadeWarning, ConfigError, ModelError
    from cascade.fileio import check_output, input_file
    from cascade.outputs.writers import SubmissionWriter, write_all

    input_file(args.model_dir, ModelError, "model folder", folder=True)
    check_output(args.out, inputs=args.inputs, inside=[args.model_dir])
    input_folders = [p for p in args.inputs if Path(p).is_dir()]  # outputs there would be read back as inputs
    folders = {name: getattr(args, name.replace("-", "_")) for name in OUTPUTS}
    folders = {name: folder for name, folder in folders.items() if folder}
    for folder in folders.values():
        check_output(folder, folder=True, inputs=args.inputs, inside=[args.model_dir, *input_folders])
    paths, notes = collect_inputs(args.inputs)
    check_output(args.out, inputs=paths)

    from cascade.pipeline import Cascade  # torch: imported once the arguments have been checked
    from cascade.progress import progress_bar
    from cascade.sharding import current_shard, gather_in_order, process_group

    shard = current_shard()
    with process_group(shard):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CascadeWarning)
            model = Cascade.from_pretrained(
                args.model_dir, device=shard.device(args.device), tta=args.tta, precision=args.precision,
                backend=args.backend, compile=args.compile, cache_dir=args.cache_dir,
            )
            model.max_pixels = args.max_pixels
        for w in caught if shard.main else ():  # ours as warning lines, other libraries' as Python shows them
            if issubclass(w.category, CascadeWarning):
                print(f"cascade predict: warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        for warning in notes if shard.main else ():
            print(f"cascade predict: warning: {warning}", file=sys.stderr)
        if not paths:
            raise ConfigError(f"no DICOM files (*.dcm) found in {', '.join(args.inputs)}")

        writers = {name: OUTPUTS[name].writer(Path(folder)) for name, folder in folders.items()}
        start = time.perf_counter()
        mine = shard.take(paths)
        predictions = model.predict_many(mine, batch_size=args.batch_size, workers=args.workers,
                                         keep_image=any(w.needs_image for w in writers.values()))
        shown = progress_bar(predictions, total=len(mine), unit="img", desc="predict", disable=not shard.main)
        # per image: the prediction (arrays dropped), the outputs written, the outputs that failed
        written = write_all((_as_submission_row(pred) for pred in shown), writers)
        written = gather_in_order(written, shard)
        elapsed = time.perf_counter() - start
    predicted = [w.prediction for w in written]
    failures = [p.error for p in predicted if p.error is not None] + [f for w in written for f in w.failures]
    rows = sum(p.ok for p in predicted)
    if not shard.main:
        return 2 if failures or not rows else 0
    for failure in failures:
        print(f"cascade predict: failed: {failure}", file=sys.stderr)
    if not rows:
        print(f"cascade predict: error: none of the {len(paths)} files could be read; {args.out} not written",
              file=sys.stderr)
        return 2
    write_all(predicted, {"submission": SubmissionWriter(args.out)})
    summaries = "".join(
        f", {OUTPUTS[name].summary.format(count=sum(name in w.wrote for w in written), folder=folder)}"
        for name, folder in folders.items() if OUTPUTS[name].summary
    )
    print(
        f"{rows} images predicted, {sum(p.positive for p in predicted)} positive{summaries}, {len(failures)} failed, "
        f"{len(paths) / max(elapsed, 1e-9):.1f} images/s (device {model.device}"
        f"{f' x {shard.world} processes' if shard.world > 1 else ''}, {model.precision} on {model.backend}, "
        f"tta {'on' if model.tta else 'off'}) → {args.out}"
    )
    return 2 if failures or any(UNREADABLE_FOLDERS in w for w in notes) else 0
