"""Small helpers for the one-line messages every command prints."""

from __future__ import annotations

from collections.abc import Sequence

SHOWN = 5
"""How many items (ImageIds, files) a message lists before '+N more'."""


def first_few(items: Sequence[object], shown: int = SHOWN) -> str:
    """The first ``shown`` items, comma-separated, with a count of the rest: ``a, b, … (+3 more)``."""
    more = f", … (+{len(items) - shown} more)" if len(items) > shown else ""
    return ", ".join(map(str, items[:shown])) + more
