"""The ``cascade`` command: a thin dispatcher over one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (registering its arguments and ``func``) and keeps heavy
imports (torch, timm, smp) inside the function that runs, so ``cascade --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from cascade import __version__
from cascade.errors import CascadeError

SUBCOMMANDS = ("synth", "train", "tune", "predict", "evaluate", "export", "serve", "listen", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="cascade",
        description="Pneumothorax detection on chest radiographs: a classifier gates a segmenter, "
        "with thresholds tuned for the SIIM-ACR metric (mean per-image Dice).",
        epilog="Typical order: synth (or bring SIIM-ACR data) → train --stage seg → train --stage cls "
        "→ tune → predict → evaluate. Run 'cascade COMMAND --help' for each.",
    )
    parser.add_argument("--version", action="version", version=f"cascade {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"cascade.cli.{name}").add_parser(sub)
    return parser


def _one_line_warning(command: str):  # noqa: ANN202 (the signature is warnings.showwarning's)
    """Library warnings on the command line: ``cascade <cmd>: warning: <message>``, one line, no source excerpt."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"cascade {command}: warning: {message}", file=file or sys.stderr)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 2 bad usage or input, 1 other failures)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return int(args.func(args) or 0)
    except CascadeError as err:
        print(f"cascade {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cascade {args.command}: interrupted", file=sys.stderr)
        return 130
