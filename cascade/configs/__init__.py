"""Shipped training configurations: YAML package data, found by name with ``--config NAME``.

Kept free of heavy imports: ``cascade train --help`` lists the names from here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cascade.errors import ConfigError


def shipped_configs() -> list[str]:
    """Names of the configurations shipped with cascade (the YAML files of this package)."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def shipped_config(name: str) -> Path:
    """Path of a shipped configuration by name (e.g. ``seg-unet-resnet34-512``)."""
    path = resources.files(__name__) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no shipped configuration named {name!r} (shipped: {', '.join(shipped_configs())})")
    return Path(str(path))
