"""How the networks run, decided in one place: :class:`Runtime` (device, precision, engine, compile, cache folder).

A user's requests (``--device``, ``--precision``, ``--backend``, ``--compile``, ``--cache-dir``, or the same
keywords of :meth:`Runtime.resolve`) are resolved **once**, here, into concrete values; everything that runs the
networks (:class:`cascade.Cascade`, :func:`cascade.inference.pipeline.predict_probabilities`,
:func:`cascade.training.tuning.tune_runs`) takes the resolved :class:`Runtime`. The rules:

- device: :func:`cascade.common.devices.resolve_device` (``auto``: CUDA when present; under ``torchrun`` the
  process's GPU);
- precision ``int8`` runs the ``onnxruntime-int8`` engine; ``auto`` becomes int8 when the model folder carries int8
  graphs and they can run here (CPU, no ``--compile``, ``--backend`` auto or onnxruntime, onnx installed);
- otherwise precision ``auto`` is what the asked engine runs best here
  (:meth:`cascade.inference.engines.Engine.auto_precision`: torch bf16 on CUDA and native-bf16 CPUs else fp32, ONNX
  Runtime fp32); with ``--backend auto`` torch's rule;
- engine ``auto``: ONNX Runtime for fp32 on a CPU when installed (:data:`AUTO_ONNXRUNTIME`, measured), else torch;
- each engine refuses what it cannot run with one line (:meth:`cascade.inference.engines.Engine.check`).

torch is imported on use: the command lines read :data:`BACKENDS` for ``--help``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade.errors import ConfigError

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "torch", "onnxruntime")
"""What ``--backend`` accepts (``Runtime.resolve(engine=)`` also takes any registered engine's name)."""
INT8_ENGINE = "onnxruntime-int8"
"""The engine precision ``int8`` runs on."""

AUTO_ONNXRUNTIME = True
"""Whether ``auto`` picks ONNX Runtime for fp32 on the CPU. Measured (2-core AVX2 EPYC without native bf16, shared
and loaded, so ratios within one run only): at the shipped 512² networks, batch 1, ONNX Runtime 1.4-3.5x faster than
eager PyTorch fp32 for the resnet34 classifier and 1.7x for the U-Net, largest probability difference 2e-4 (random
weights) and no decision changed on the synthetic set; eager bf16 there was 17-27x slower than fp32 (emulated), so
``auto`` precision is fp32 on such a CPU. Re-measure with ``benchmarks/latency.py`` and flip this if it loses."""


@dataclass(frozen=True)
class Request:
    """What the user asked for, before resolution (kept by the :class:`Runtime`, which a model folder's int8
    graphs may resolve again: :meth:`Runtime.with_int8_graphs`)."""

    device: str | torch.device = "auto"
    precision: str = "auto"
    engine: str = "auto"
    compile: bool = False
    cache_dir: str | os.PathLike[str] | None = None
    local_rank: int | None = None


@dataclass(frozen=True)
class Runtime:
    """How the networks run, resolved: build it with :meth:`resolve`."""

    device: torch.device
    precision: str
    """``fp32``, ``bf16``, ``fp16`` or ``int8``."""
    engine: str
    """A registered engine's name (:mod:`cascade.inference.engines`): ``torch``, ``onnxruntime``,
    ``onnxruntime-int8``."""
    backend: str
    """The engine's family, what ``--backend`` names: ``torch`` or ``onnxruntime``."""
    compile: bool = False
    cache_dir: Path | None = None
    """Where exported graphs are cached (None: ``$CASCADE_ENGINE_CACHE`` or ``~/.cache/cascade/engines``)."""
    request: Request = field(default_factory=Request, compare=False, repr=False)

    @classmethod
    def resolve(
        cls,
        device: str | torch.device = "auto",
        precision: str = "auto",
        engine: str = "auto",
        compile: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        local_rank: int | None = None,
        int8_available: bool = False,
    ) -> Runtime:
        """Resolve the requests (``engine``: ``auto``, ``torch``, ``onnxruntime`` or another registered engine;
        ``local_rank``: a ``torchrun`` process's) for a model with int8 graphs or without; a ``ConfigError``
        names what cannot run."""
        return _resolve(Request(device, precision, engine, compile, cache_dir, local_rank), int8_available)

    def with_int8_graphs(self) -> Runtime:
        """This runtime for a model that carries int8 graphs: ``auto`` precision becomes int8 where it can run."""
        return _resolve(self.request, int8_available=True) if self.request.precision == "auto" else self

    def on_torch(self) -> Runtime:
        """The same precision on the torch engine (the fallback when an ONNX export fails under ``auto``)."""
        return dataclasses.replace(self, engine="torch", backend="torch")

    def describe(self) -> str:
        """One line: ``device cpu, fp32 on onnxruntime`` (``, compiled`` with torch.compile)."""
        return f"device {self.device}, {self.precision} on {self.backend}{', compiled' if self.compile else ''}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, what ``GET /v1/model`` and the model card report (``cascade.json`` records it as
        ``metrics.validation.runtime``); the cache folder, a local path, is left out."""
        return {"device": str(self.device), "precision": self.precision, "backend": self.backend,
                "engine": self.engine, "compile": self.compile}


def _resolve(request: Request, int8_available: bool) -> Runtime:
    """The rules of the module docstring, in order: device, precision, engine, the engine's own check."""
    from cascade.common.devices import resolve_device
    from cascade.inference.engines import engine_class, engine_names
    from cascade.inference.precision import PRECISIONS

    asked = request.engine
    if asked not in ("auto", *engine_names()):
        raise ConfigError(f"unknown backend {asked!r}: use {', '.join(BACKENDS)}")
    if request.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {request.precision!r}: use {', '.join(PRECISIONS)}")
    device = resolve_device(request.device, request.local_rank)
    precision = request.precision
    if precision == "auto" and int8_available and _runs_int8(device, request):
        precision = "int8"
    elif precision == "auto":
        precision = engine_class("torch" if asked == "auto" else asked).auto_precision(device)
    name = _engine_name(asked, device, precision, request.compile)
    chosen = engine_class(name)
    chosen.check(device, precision, request.compile, asked)
    cache_dir = None if request.cache_dir is None else Path(request.cache_dir)
    return Runtime(device, precision, name, chosen.backend, request.compile, cache_dir, request)


def _engine_name(asked: str, device: torch.device, precision: str, compile: bool) -> str:
    """int8 → its engine; a named engine → itself; ``auto`` → ONNX Runtime for fp32 on a CPU, else torch."""
    from cascade.inference.engines import engine_class

    if precision == "int8":
        return INT8_ENGINE
    if asked != "auto":
        return asked
    ort = device.type == "cpu" and precision == "fp32" and not compile and AUTO_ONNXRUNTIME
    return "onnxruntime" if ort and engine_class("onnxruntime").installed() else "torch"


def _runs_int8(device: torch.device, request: Request) -> bool:
    """Whether int8 graphs at hand would run here as asked (``auto`` precision then means int8)."""
    from cascade.inference.engines import engine_class

    int8 = engine_class(INT8_ENGINE)
    try:
        int8.check(device, "int8", request.compile, request.engine)
    except ConfigError:
        return False
    return int8.installed()

