"""The ONNX Runtime engines, on the CPU: ``onnxruntime`` runs each member's exported fp32 graph (exported once into
the engine cache, :func:`cascade.inference.onnx_export.cached_graph`); ``onnxruntime-int8`` runs the calibrated int8
graphs a model folder tuned at int8 carries (:mod:`cascade.inference.quantize`). onnx and onnxruntime are imported on
use (the ``onnx`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cascade.data.preprocess import Preprocessing
from cascade.errors import ConfigError
from cascade.inference.engines import Engine, mean_flip, register_engine

if TYPE_CHECKING:
    from cascade.inference.runtime import Runtime

STALE_INT8 = (
    "these int8 graphs were made by cascade's first int8 recipe (before 2026-12-02), which quantized the output "
    "layer: probabilities are rounded to 256 levels and clipped at the calibration images' maximum; tune the model "
    "folder again with 'cascade tune --precision int8' (docs/speed.md)"
)


@register_engine("onnxruntime")
class OnnxRuntimeEngine(Engine):
    """ONNX Runtime CPU sessions of the members' fp32 graphs (no bf16 convolutions in its CPU provider)."""

    backend = "onnxruntime"
    requires = ("onnx", "onnxruntime")

    def __init__(
        self,
        members: Sequence[tuple[nn.Module, dict[str, Any]]],
        prep: Preprocessing,
        runtime: Runtime,
        graphs: Sequence[bytes] | None = None,
    ) -> None:
        super().__init__(members, prep, runtime, graphs)
        self.sessions = [session(source) for source in self._graphs(members, graphs)]

    def _graphs(self, members: Sequence[tuple[nn.Module, dict[str, Any]]],
                graphs: Sequence[bytes] | None) -> Sequence[Path | bytes]:
        """The graph each member runs: its fp32 export, from the engine cache."""
        return [cached_graph(model, config, self.prep, self.runtime.cache_dir) for model, config in members]

    @classmethod
    def check(cls, device: torch.device, precision: str, compile: bool, asked: str) -> None:
        if device.type != "cpu" or precision != "fp32":
            raise ConfigError(
                f"backend onnxruntime runs fp32 on the CPU only; got device {device.type} at {precision} "
                "(use --backend torch, or --device cpu --precision fp32)"
            )
        if compile:
            raise ConfigError("torch.compile applies to the torch backend only (use --backend torch)")

    def __call__(self, images: np.ndarray, tta: bool) -> np.ndarray:
        x = images[:, None]
        probs = [
            mean_flip(lambda v, s=s: s.run(["probability"], {"image": np.ascontiguousarray(v)})[0], x, tta,
                      lambda a: a[..., ::-1])
            for s in self.sessions
        ]
        out = np.mean(probs, axis=0, dtype=np.float32) if len(probs) > 1 else probs[0]
        out = out.astype(np.float32, copy=False)
        return out[:, 0] if out.ndim == 4 else out


@register_engine("onnxruntime-int8")
class OnnxRuntimeInt8Engine(OnnxRuntimeEngine):
    """ONNX Runtime CPU sessions of the calibrated int8 graphs, one per member, that a model folder tuned at int8
    carries (or ``cascade tune --precision int8`` has just made)."""

    def _graphs(self, members: Sequence[tuple[nn.Module, dict[str, Any]]],
                graphs: Sequence[bytes] | None) -> Sequence[Path | bytes]:
        if graphs is None:
            raise ConfigError(
                "precision int8 needs the calibrated graphs of a model folder tuned at int8 "
                "('cascade tune --precision int8')"
            )
        if len(graphs) != len(members):
            raise ConfigError(f"precision int8 needs one int8 graph per member: {len(graphs)} for {len(members)}")
        return graphs

    @classmethod
    def check(cls, device: torch.device, precision: str, compile: bool, asked: str) -> None:
        if device.type != "cpu" or asked not in ("auto", "onnxruntime", cls.name) or compile:
            raise ConfigError(
                f"precision int8 runs on ONNX Runtime on the CPU only; got device {device.type}, backend {asked}"
                f"{' with --compile' if compile else ''} (use --device cpu --backend auto, or another precision)"
            )

    @classmethod
    def auto_precision(cls, device: torch.device) -> str:
        return "int8"

    def warnings(self) -> list[str]:
        """Graphs of the first int8 recipe (no recipe stamp), which clipped the probabilities, are named."""
        from cascade.inference.quantize import stale_recipe

        return [STALE_INT8] if any(stale_recipe(s) for s in self.sessions) else []


def cached_graph(model: nn.Module, config: dict[str, Any], prep: Preprocessing, cache_dir: Any) -> Path:
    """The member's fp32 ONNX graph (:func:`cascade.inference.onnx_export.cached_graph`; imported here, as onnx is
    optional)."""
    try:
        from cascade.inference.onnx_export import cached_graph as graph
    except ImportError:
        raise ConfigError("backend onnxruntime needs onnx: pip install 'pneumothorax-cascade[onnx]'") from None
    return graph(model, config, prep, cache_dir)


def session(graph: Path | bytes) -> Any:
    """An ONNX Runtime CPU session of a graph (a file, or bytes already checked), with as many threads as torch."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("backend onnxruntime needs onnxruntime: pip install 'pneumothorax-cascade[onnx]'") from None

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # threads spin between the operators of a run (the int8 U-Net has many short ones: 11% faster at 512² on 2
    # cores, the other graphs unchanged) but stop as soon as a run returns, as the decoding workers of predict_many
    # (and torch, in one process) need the cores between runs: predict_many with a decoding worker ran at the same
    # speed either way (3 runs each, within their 10% spread)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
