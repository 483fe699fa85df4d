"""The shared-encoder gate: the segmenter's own encoder (frozen) and a small head that decides whether an image
needs the decoder.

The encoder already holds what the pixel-level masks taught it; the head reads three of its feature levels (1/8,
1/16 and 1/32 of the input: :data:`LEVELS`), mixes them into one map of per-region logits at 1/8 resolution, and the
image's logit is that map's **maximum** (a small lesion is one hot region, which an average would dilute). The head
learns from the image labels **and** from the segmenter itself (distillation: the map is trained towards the
segmenter's own probability map, max-pooled to the head's grid), which gives it a dense target on every image
instead of one bit per image. Measured on realistic data (docs/gate.md): a head trained on labels only, or the
encoder's pooled features with a linear model, stayed well below; this one matched or passed the segmenter's own
maximum probability as a score.

At inference the encoder runs **once** per image (:mod:`cascade.inference.pipeline`): the head decides and the
decoder runs only on the images the gate passes. A stage folder holds the head's weights only, and its config names
the segmenter network and the sha256 of its encoder's tensors (:func:`encoder_sha256`), so a gate is attached to the
one segmenter it was trained on (:func:`attach_shared_gates`) and weights are never stored twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cascade.errors import ModelError
from cascade.stages.segmenter import build_segmenter

LEVELS = (3, 4, 5)
"""The encoder feature levels the head reads (smp's features list: level k is 1/2^k of the input side)."""
WIDTH = 32
"""Channels of the head's lateral convolutions and its mixing layer."""


def encoder_sha256(encoder: nn.Module) -> str:
    """sha256 of an encoder's tensors (names, shapes and float32 values in name order): which segmenter a gate
    belongs to, whatever folder or file it was read from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(value.shape)}\n".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


class GateHead(nn.Module):
    """Lateral 1x1 convolutions on the chosen feature levels, resized to the finest one, then BN-ReLU-3x3-BN-ReLU-1x1:
    a map of region logits ``[B, 1, h, w]``."""

    def __init__(self, channels: Sequence[int], width: int = WIDTH) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.mix = nn.Sequential(
            nn.BatchNorm2d(width * len(channels)), nn.ReLU(inplace=True),
            nn.Conv2d(width * len(channels), width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.Conv2d(width, 1, 1),
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        resized = [
            lateral(f) if f.shape[-2:] == size else F.interpolate(lateral(f), size=size, mode="nearest")
            for lateral, f in zip(self.lateral, features)
        ]
        return self.mix(torch.cat(resized, 1))


class SharedEncoderGate(nn.Module):
    """A classifier (logits ``[B]``) made of a segmenter's frozen encoder and a :class:`GateHead`.

    ``segmenter`` is the whole segmenter network (its encoder computes the features; in training its decoder is the
    distillation teacher); it is never trained here and always stays in eval mode, so its BatchNorm statistics are the
    segmenter's. In training mode ``forward`` returns ``(logits, region_logits, teacher_probabilities)`` for
    :class:`cascade.stages.losses.GateLoss`; otherwise the logits.
    """

    def __init__(self, segmenter: nn.Module, levels: Sequence[int] = LEVELS, width: int = WIDTH,
                 sha256: str | None = None) -> None:
        super().__init__()
        self.levels = tuple(levels)
        channels = segmenter.encoder.out_channels
        if any(not 0 < level < len(channels) for level in self.levels):
            raise ModelError(f"gate levels {list(self.levels)} are not feature levels of the encoder (1..{len(channels) - 1})")
        self.head = GateHead([channels[level] for level in self.levels], width)
        self.sha256 = sha256
        """The sha256 of the encoder it was trained on (:func:`encoder_sha256`); None before training starts."""
        self.segmenter = segmenter
        self.attached = False
        """Whether ``segmenter`` holds the trained segmenter's weights (a gate built from a config alone does not)."""
        self._freeze()

    def _freeze(self) -> None:
        for param in self.segmenter.parameters():
            param.requires_grad_(False)
        self.segmenter.eval()

    def attach(self, segmenter: nn.Module, *, check: bool = True) -> None:
        """Use ``segmenter`` (the very module, shared, so its encoder runs once per image) as the one this gate reads;
        with ``check``, its encoder must be the one the gate was trained on."""
        if check and self.sha256 is not None and encoder_sha256(segmenter.encoder) != self.sha256:
            raise ModelError("the gate was trained on another segmenter's encoder (sha256 differs)")
        self.segmenter = segmenter
        self.sha256 = self.sha256 or encoder_sha256(segmenter.encoder)
        self.attached = True
        self._freeze()

    def train(self, mode: bool = True) -> SharedEncoderGate:
        super().train(mode)
        self.segmenter.eval()
        return self

    def stored_state(self) -> dict[str, torch.Tensor]:
        """What a stage folder holds: the head's tensors only (the encoder is the segmenter's)."""
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def load_stored_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict({k[len("head."):]: v for k, v in state.items()}, strict=True)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature list (what the segmenter's decoder takes)."""
        if not self.attached:
            raise ModelError("a shared-encoder gate needs its segmenter attached before it runs")
        return self.segmenter.encoder(x)

    def regions(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Region logits ``[B, 1, h, w]`` from the encoder's features."""
        return self.head([features[level] for level in self.levels])

    def forward(self, x: torch.Tensor) -> Any:
        features = self.features(x)
        regions = self.regions(features)
        logits = regions.flatten(1).amax(1)
        if not self.training:
            return logits
        with torch.no_grad():
            teacher = torch.sigmoid(self.segmenter.segmentation_head(self.segmenter.decoder(features)).float())
            teacher = F.adaptive_max_pool2d(teacher, regions.shape[-2:])
        return logits, regions, teacher


def build_gate(config: dict[str, Any]) -> SharedEncoderGate:
    """The gate of a classifier ``config.json`` with ``gate: shared`` (its segmenter built from ``segmenter``, random
    until attached)."""
    segmenter = config.get("segmenter")
    if not isinstance(segmenter, dict):
        raise ModelError("a shared-encoder gate's config needs 'segmenter' (the segmenter's network keys)")
    seg = build_segmenter({**segmenter, "stage": "seg", "in_chans": 1})
    return SharedEncoderGate(seg, config.get("levels", LEVELS), config.get("width", WIDTH), config.get("encoder_sha256"))


def attach_shared_gates(classifiers: Sequence[tuple[nn.Module, dict[str, Any]]],
                        segmenters: Sequence[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Attach every shared-encoder gate among ``classifiers`` to the segmenter member whose encoder it was trained on;
    a ``ModelError`` when none is."""
    digests: dict[str, nn.Module] = {}
    for model, _ in classifiers:
        if not isinstance(model, SharedEncoderGate) or any(model.segmenter is seg for seg, _ in segmenters):
            continue  # a separate classifier, or a gate already attached to one of these segmenters
        if not digests:
            digests = {encoder_sha256(seg.encoder): seg for seg, _ in segmenters if hasattr(seg, "encoder")}
        match = digests.get(model.sha256 or "")
        if match is None:
            raise ModelError(
                "the classifier is a shared-encoder gate trained on a segmenter that is not among this cascade's "
                f"segmenters (encoder sha256 {str(model.sha256)[:12]}…): tune or load it with the segmenter run it "
                "was trained from"
            )
        model.attach(match, check=False)
