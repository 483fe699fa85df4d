"""`cascade export`: a MODEL_DIR's networks as ONNX files, checked against PyTorch with ONNX Runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Export both stages of a model folder (every member of a fold ensemble) to ONNX: `classifier.onnx`,
`segmenter.onnx`, … in DIR, with cascade.json (thresholds, preprocessing) and export.json beside them. Each graph
takes the uint8 image at the stage's input size ([batch, 1, H, W]) and returns probabilities; batch is dynamic,
and height/width too where the network allows. ONNX Runtime (the optional extra `onnx`) then runs every file on
random inputs and must match PyTorch within 1e-4 in probability, or the command fails. A folder tuned with
--precision int8 also gives `classifier.int8.onnx`, … (its calibrated int8 graphs, same input and output): its
thresholds were tuned on those."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the networks of a model folder to ONNX", description=DESCRIPTION)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model folder written by 'cascade tune'")
    p.add_argument("--format", choices=["onnx"], required=True, help="export format (onnx)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the exported files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cascade.errors import ModelError
    from cascade.storage.fileio import check_output, input_file, read_json_object

    input_file(args.model_dir, ModelError, "model folder", folder=True)
    check_output(args.out, folder=True, inside=[args.model_dir])
    if Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        raise ModelError(f"{args.out}: exists and is not empty; choose a new --out (export never mixes into a folder)")
    # torch: imported once the output has been checked
    from cascade.inference.onnx_export import TOLERANCE, describe, export_onnx

    results = export_onnx(args.model_dir, args.out)
    print(describe(results))
    print(f"ONNX Runtime matches PyTorch within {TOLERANCE:.0e} on every network → {args.out}")
    int8 = read_json_object(Path(args.out) / "export.json", "written just now")["int8"]
    if int8:
        print(f"int8 graphs, on which the thresholds were tuned (run these with them): {', '.join(int8)}")
    return 0
