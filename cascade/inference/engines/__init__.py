"""Engines: what runs one stage's networks, registered by name as timm registers models.

An engine is a class decorated with :func:`register_engine`; it is handed one stage's members (eager fp32 networks
with their configs), the stage's preprocessing and the resolved :class:`cascade.inference.runtime.Runtime`, and is then
called with uint8 images to give averaged sigmoid probabilities. :meth:`cascade.inference.runtime.Runtime.resolve` asks
the engine classes what they run (:meth:`Engine.check`, :meth:`Engine.auto_precision`, :attr:`Engine.requires`), so an
engine lives in one module of this package: ``torch`` (eager or compiled, under autocast), ``onnxruntime`` (exported
fp32 graphs) and ``onnxruntime-int8`` (the calibrated graphs of a model folder tuned at int8).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from cascade.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from cascade.data.preprocess import Preprocessing
    from cascade.inference.runtime import Runtime

ENGINES: dict[str, type[Engine]] = {}
"""The registered engines by name (complete once :func:`engine_class` has run)."""

E = TypeVar("E", bound="type[Engine]")


def register_engine(name: str) -> Callable[[E], E]:
    """Class decorator: register an engine under ``name`` (what ``Runtime.resolve(engine=...)`` and
    :attr:`Runtime.engine` say); a second class under one name is refused."""

    def register(cls: E) -> E:
        if ENGINES.get(name, cls) is not cls:
            raise ValueError(f"engine {name!r} is already registered ({ENGINES[name].__qualname__})")
        cls.name = name
        ENGINES[name] = cls
        return cls

    return register


def engine_names() -> list[str]:
    """Every registered engine's name: each module of this package is imported (so registered) on first use."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return list(ENGINES)


def engine_class(name: str) -> type[Engine]:
    """The engine registered as ``name``."""
    if name not in engine_names():
        raise ConfigError(f"unknown engine {name!r}: use {', '.join(ENGINES)}")
    return ENGINES[name]


class Engine:
    """One stage's members on one engine: ``engine(images uint8 [B,S,S], tta)`` → float32 probabilities, ``[B]``
    (classifier) or ``[B,S,S]`` (segmenter), averaged over the members (and the horizontal flip when ``tta``).

    ``models`` stay the eager fp32 networks whatever runs (what ``save_pretrained`` writes). ``graphs`` are
    ready-made graphs the model folder carries, one per member (an engine that needs none ignores them).
    """

    name: ClassVar[str] = ""
    """Set by :func:`register_engine`."""
    backend: ClassVar[str] = ""
    """The family it belongs to, what ``--backend`` and ``Cascade.backend`` name (``torch``, ``onnxruntime``)."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Python modules it needs; ``auto`` picks it only where they are installed."""

    def __init__(
        self,
        members: Sequence[tuple[nn.Module, dict[str, Any]]],
        prep: Preprocessing,
        runtime: Runtime,
        graphs: Sequence[bytes] | None = None,
    ) -> None:
        self.prep = prep
        self.runtime = runtime
        self.models = [model.eval() for model, _ in members]

    @classmethod
    def check(cls, device: torch.device, precision: str, compile: bool, asked: str) -> None:
        """Raise a ``ConfigError`` saying why this engine cannot run ``precision`` on ``device`` (``compile``
        and the engine ``asked`` for, as the user gave them, for the message); nothing when it can."""

    @classmethod
    def auto_precision(cls, device: torch.device) -> str:
        """What precision ``auto`` means on this engine and device."""
        return "fp32"

    @classmethod
    def installed(cls) -> bool:
        return all(importlib.util.find_spec(module) is not None for module in cls.requires)

    def warnings(self) -> list[str]:
        """Warnings about what was loaded (issued once by the cascade as :class:`PrecisionWarning`s)."""
        return []

    def __call__(self, images: np.ndarray, tta: bool) -> np.ndarray:
        raise NotImplementedError


def mean_flip(run: Callable[[Any], Any], x: Any, tta: bool, flip: Callable[[Any], Any]) -> Any:
    """``run(x)``, averaged with the mirrored ``run`` of the horizontally mirrored ``x`` when ``tta`` (``flip``
    mirrors the last axis of an input or a map; a classifier's ``[B, 1]`` output needs no mirroring)."""
    prob = run(x)
    if not tta:
        return prob
    flipped = run(flip(x))
    if flipped.ndim == 4:
        flipped = flip(flipped)
    return (prob + flipped) / 2
