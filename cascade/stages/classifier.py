"""The classifier stage: any timm model with a one-logit head, by default on one input channel."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from cascade.errors import ConfigError

POOLS = ("avg", "max", "avgmax", "catavgmax")
DEFAULTS: dict[str, Any] = {"stage": "cls", "model": "resnet18", "in_chans": 1, "pool": "avg", "drop_rate": 0.0}


class Classifier(nn.Module):
    """A timm backbone with a single-logit head; ``forward`` returns logits of shape ``[B]``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).squeeze(1)


def build_classifier(config: dict[str, Any]) -> Classifier:
    """Build the network described by a classifier ``config.json`` (random weights; weights load separately)."""
    cfg = {**DEFAULTS, **config}
    if cfg["pool"] not in POOLS:
        raise ConfigError(f"classifier pool {cfg['pool']!r} is not one of {', '.join(POOLS)}")
    if not timm.is_model(cfg["model"]):
        raise ConfigError(f"unknown timm model {cfg['model']!r} (see timm.list_models())")
    backbone = timm.create_model(
        cfg["model"],
        pretrained=False,
        in_chans=int(cfg["in_chans"]),
        num_classes=1,
        global_pool=cfg["pool"],
        drop_rate=float(cfg["drop_rate"]),
    )
    return Classifier(backbone)
