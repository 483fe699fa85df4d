"""Arguments shared by the subcommands: types (argparse turns their ValueErrors into a usage error, exit 2) and the
speed options of the commands that run the networks."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cascade.inference.runtime import BACKENDS

if TYPE_CHECKING:
    from cascade.inference.runtime import Runtime
    from cascade.inference.sharding import Shard


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer ≥ 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = float(text)
    if not (0.0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """--precision, --backend, --compile and --cache-dir: how the networks run (shared with commands that predict)."""
    p.add_argument(
        "--precision", choices=("auto", "fp32", "bf16", "fp16", "int8"), default="auto",
        help="network precision (default auto: bf16 on CUDA and on CPUs with native bf16, else fp32 - always fp32 with "
        "--backend onnxruntime; int8 for a model folder tuned at int8); a precision other than the one the thresholds were tuned at warns. int8: CPU, ONNX "
        "Runtime, graphs calibrated by 'cascade tune --precision int8' (docs/speed.md)",
    )
    p.add_argument(
        "--backend", choices=BACKENDS, default="auto",
        help="engine (default auto: ONNX Runtime for fp32 on the CPU when installed, else PyTorch)",
    )
    p.add_argument("--compile", action="store_true", help="torch backend: run the networks through torch.compile")
    p.add_argument(
        "--cache-dir", metavar="DIR",
        help="where ONNX graphs are exported on first use (default $CASCADE_ENGINE_CACHE or ~/.cache/cascade/engines)",
    )


def runtime_from_args(args: argparse.Namespace, shard: Shard | None = None) -> Runtime:
    """The one reading of ``--device``, ``--precision``, ``--backend``, ``--compile`` and ``--cache-dir``: the
    resolved :class:`cascade.inference.runtime.Runtime` (under ``torchrun``, ``shard`` gives this process its own
    GPU)."""
    from cascade.inference.runtime import Runtime

    device = args.device if shard is None else shard.device(args.device)
    return Runtime.resolve(device, args.precision, args.backend, args.compile, args.cache_dir)


def add_max_pixels_argument(p: argparse.ArgumentParser) -> None:
    """--max-pixels: the pixel budget of one input image, checked from its header before decoding."""
    from cascade.data.limits import MAX_PIXELS

    p.add_argument(
        "--max-pixels", type=positive_int, default=MAX_PIXELS, metavar="N",
        help=f"refuse an image of more than N pixels (Rows x Columns x samples x frames) from its header, before "
        f"anything is decoded: a few-KB compressed file can declare gigabytes (default {MAX_PIXELS:,}, which covers "
        "the largest real radiographs)",
    )
