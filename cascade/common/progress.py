"""The one progress channel: tqdm bars on stderr, shown only when stderr is a terminal.

A run saved to a log (``cascade train … > log 2>&1``) would otherwise fill it with carriage-return redraws; there
the per-epoch and summary lines the commands print are the record. ``CASCADE_PROGRESS=1`` forces the bars on
(``0`` forces them off).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any


def bars_enabled() -> bool:
    """Whether progress bars are drawn: ``CASCADE_PROGRESS`` when set, else whether stderr is a terminal."""
    forced = os.environ.get("CASCADE_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable[Any] | None = None, *, disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar on stderr (``kwargs`` as tqdm's), disabled when asked or when :func:`bars_enabled` says no."""
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=disable or not bars_enabled(), dynamic_ncols=True, **kwargs)
