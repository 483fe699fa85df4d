"""The ``torch`` engine: the eager networks under autocast at the runtime's precision, optionally through
``torch.compile``, on any device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cascade.common.devices import cpu_supports_bf16
from cascade.data.preprocess import Preprocessing, normalize
from cascade.inference.engines import Engine, mean_flip, register_engine
from cascade.inference.precision import autocast

if TYPE_CHECKING:
    from cascade.inference.runtime import Runtime


@register_engine("torch")
class TorchEngine(Engine):
    """PyTorch: channels-last networks on the runtime's device, autocast at its precision (fp32, bf16, fp16)."""

    backend = "torch"

    def __init__(
        self,
        members: Sequence[tuple[nn.Module, dict[str, Any]]],
        prep: Preprocessing,
        runtime: Runtime,
        graphs: Sequence[bytes] | None = None,
    ) -> None:
        super().__init__(members, prep, runtime, graphs)
        self.models = [model.to(runtime.device).to(memory_format=torch.channels_last) for model in self.models]
        self._runners = [torch.compile(m, dynamic=True) if runtime.compile else m for m in self.models]

    @classmethod
    def auto_precision(cls, device: torch.device) -> str:
        """bf16 where the hardware computes it natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32: emulated
        bf16 is slower than fp32 (:func:`cascade.common.devices.cpu_supports_bf16`)."""
        return "bf16" if device.type == "cuda" or cpu_supports_bf16() else "fp32"

    def _inputs(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).to(self.runtime.device)
        return normalize(x, self.prep).unsqueeze(1).contiguous(memory_format=torch.channels_last)

    def gate_with_features(self, images: np.ndarray) -> tuple[np.ndarray, list[torch.Tensor]]:
        """A shared-encoder gate's probabilities ``[B]`` and the encoder's features it computed them from, kept for
        :meth:`decode` (one member, no TTA: :class:`cascade.inference.pipeline._Stages` checks)."""
        (gate,) = self.models
        with torch.inference_mode(), autocast(self.runtime.device, self.runtime.precision):
            features = gate.features(self._inputs(images))
            probs = torch.sigmoid(gate.regions(features).flatten(1).amax(1).float())
        return probs.cpu().numpy().astype(np.float32, copy=False), features

    def decode(self, features: list[torch.Tensor]) -> np.ndarray:
        """The segmenter's probability maps ``[B,S,S]`` from its encoder's features (the decoder and head only)."""
        (segmenter,) = self.models
        with torch.inference_mode(), autocast(self.runtime.device, self.runtime.precision):
            logits = segmenter.segmentation_head(segmenter.decoder(features))
            return torch.sigmoid(logits.float())[:, 0].cpu().numpy().astype(np.float32, copy=False)

    def __call__(self, images: np.ndarray, tta: bool) -> np.ndarray:
        x = self._inputs(images)
        with torch.inference_mode(), autocast(self.runtime.device, self.runtime.precision):
            total = sum(
                mean_flip(lambda v, m=m: torch.sigmoid(m(v).float()), x, tta, lambda t: t.flip(-1))
                for m in self._runners
            )
            out = (total / len(self._runners)).cpu().numpy().astype(np.float32, copy=False)
        return out[:, 0] if out.ndim == 4 else out

