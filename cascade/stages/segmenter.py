"""The segmenter stage: a segmentation-models-pytorch architecture with an smp or timm (``tu-…``) encoder."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import segmentation_models_pytorch as smp
from torch import nn

from cascade.errors import ConfigError

ARCHS: Mapping[str, type[nn.Module]] = smp.MODEL_ARCHITECTURES_MAPPING
"""The architectures by lower-case class name (``unet``, ``fpn``, ``deeplabv3plus``, …): smp's own registry, the one
``smp.create_model`` looks names up in, so ``network.arch`` offers every family the installed smp has."""
CONFIG_JSON_FALLBACK: dict[str, Any] = {"arch": "unet", "encoder": "resnet34", "in_chans": 1}
"""What :func:`build_segmenter` assumes for a key a stage ``config.json`` lacks (as for the classifier's); the
training defaults are ``SPECS["seg"].defaults`` (:mod:`cascade.stages.specs`)."""


def build_segmenter(config: dict[str, Any]) -> nn.Module:
    """Build the network described by a segmenter ``config.json``; ``forward`` returns logits ``[B,1,H,W]``."""
    cfg = {**CONFIG_JSON_FALLBACK, **config}
    arch = str(cfg["arch"]).lower()
    if arch not in ARCHS:
        raise ConfigError(f"segmentation architecture {cfg['arch']!r} is not one of {', '.join(ARCHS)}")
    encoder = str(cfg["encoder"])
    if not encoder.startswith("tu-") and encoder not in smp.encoders.get_encoder_names():
        raise ConfigError(f"unknown encoder {encoder!r}: use an smp encoder name or 'tu-<timm model>'")
    try:
        return smp.create_model(
            arch, encoder_name=encoder, encoder_weights=None, in_channels=int(cfg["in_chans"]), classes=1
        )
    except (KeyError, RuntimeError, ValueError) as err:
        raise ConfigError(f"cannot build {cfg['arch']} with encoder {encoder!r}: {err}") from None


def set_foreground_prior(model: nn.Module, prior: float) -> None:
    """Start every pixel at foreground probability ``prior``: the bias of the segmentation head's last convolution
    becomes log(prior / (1 − prior)), RetinaNet's prior initialisation. From smp's default a random network answers
    about 0.5 everywhere; on mostly empty masks its first epochs then go to unlearning that, and it collapsed to
    all-empty masks for epochs 2–6 on realistic data, where this start did not (docs/training-recipe.md)."""
    convs = [m for m in model.segmentation_head.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    if not convs:
        raise ConfigError(f"{type(model).__name__} has no biased convolution in its segmentation head; set network.prior: null")
    nn.init.constant_(convs[-1].bias, math.log(prior / (1.0 - prior)))
