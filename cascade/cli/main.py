"""The ``cascade`` command: a thin dispatcher over one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (registering its arguments and ``func``) and keeps heavy
imports (torch, timm, smp) inside the function that runs, so ``cascade --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn

from cascade import __version__
from cascade.errors import CascadeError, from_worker
from cascade.storage.fileio import remove_pending

SUBCOMMANDS = ("synth", "train", "tune", "predict", "evaluate", "export", "serve", "listen", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``cascade <cmd>: error: …``, exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand registered."""
    parser = _Parser(
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


def _terminate(command: str) -> Callable[[int, object], None]:
    """The SIGTERM handler of ``command``: remove the temporary files of writes in progress, stop the worker
    processes and exit 143 at once.

    Exiting from the handler, rather than raising into the running code, cannot be lost: an exception raised while
    the main thread is inside a ``__del__`` (a DataLoader shutting its workers down) is printed and ignored, and
    the command would go on. Outputs are only ever renamed into place whole, so none is half-written.
    """

    def handler(signum: int, frame: object) -> None:
        remove_pending()
        for child in multiprocessing.active_children():
            child.kill()
        print(f"\ncascade {command}: terminated", file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGTERM)

    return handler


def _one_line_warning(command: str) -> Callable[..., None]:
    """Library warnings on the command line: ``cascade <cmd>: warning: <message>``, one line, no source excerpt."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 (warnings' API)
        print(f"cascade {command}: warning: {message}", file=file or sys.stderr)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 2 bad usage or input, 1 other failures,
    130 after Ctrl-C; SIGTERM exits 143 from its handler)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handle = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, _terminate(args.command)) if handle else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return int(args.func(args) or 0)
    except CascadeError as err:
        print(f"cascade {args.command}: error: {from_worker(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a file system refusal the checks could not foresee (disk full, a file vanished)
        where = f"{err.filename}: " if err.filename else ""
        print(f"cascade {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not bad input: one line, the traceback only on request
        if os.environ.get("CASCADE_TRACEBACK"):
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"cascade {args.command}: internal error: {type(err).__name__}: {first} (set CASCADE_TRACEBACK=1 for "
              "the traceback, and please report it)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cascade {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
