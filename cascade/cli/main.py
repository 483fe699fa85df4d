"""The ``cascade`` command: a thin dispatcher over one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (registering its arguments and ``func``) and keeps heavy
imports (torch, timm, smp) inside the function that runs, so ``cascade --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Sequence

from cascade import __version__
from cascade.errors import CascadeError, from_worker

SUBCOMMANDS = ("synth", "train", "tune", "predict", "evaluate", "export", "demo")


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


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt (a BaseException, so no ``except Exception`` in a
    decoder swallows it): the command unwinds, removing temporary files and stopping its workers."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 2 bad usage or input, 1 other failures,
    130 after Ctrl-C, 143 after SIGTERM)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handle = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, _terminate) if handle else None
    try:
        return int(args.func(args) or 0)
    except CascadeError as err:
        print(f"cascade {args.command}: error: {from_worker(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a file system refusal the checks could not foresee (disk full, a file vanished)
        where = f"{err.filename}: " if err.filename else ""
        print(f"cascade {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cascade {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"cascade {args.command}: terminated", file=sys.stderr)
        return 143
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
