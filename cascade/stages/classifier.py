"""The classifier stage: any timm model with a one-logit head, by default on one input channel."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from cascade.errors import ConfigError

POOLS = ("avg", "max", "avgmax", "catavgmax")
CONFIG_JSON_FALLBACK: dict[str, Any] = {"model": "resnet18", "in_chans": 1, "pool": "avg", "drop_rate": 0.0}
"""What :func:`build_classifier` assumes for a key a stage ``config.json`` lacks (a hand-written folder; the folders
cascade writes record every key), unchanged since the first version so such a folder keeps loading the same
network. Not the training defaults: those are ``SPECS["cls"].defaults`` (:mod:`cascade.stages.specs`)."""


class Classifier(nn.Module):
    """A timm backbone with a single-logit head; ``forward`` returns logits of shape ``[B]``.

    For training on few positives it may carry an auxiliary mask head (:meth:`add_mask_head`): a 1×1 convolution on
    the backbone's last feature map, taught where the lesion is (deep supervision), so the features the image-level
    head pools are localized. In training mode ``forward`` then returns ``(logits [B], mask logits [B,1,h,w])``; in
    eval mode, and in every saved model folder (:meth:`deployable`), it is an ordinary classifier.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.mask_head: nn.Conv2d | None = None

    def add_mask_head(self) -> Classifier:
        """Attach the auxiliary mask head (bias set so the first predictions say 1% of cells are lesion)."""
        features = int(getattr(self.backbone, "num_features", 0))
        if not features or not hasattr(self.backbone, "forward_features"):
            raise ConfigError("loss.mask needs a convolutional timm classifier (one with forward_features)")
        self.mask_head = nn.Conv2d(features, 1, kernel_size=1)
        nn.init.zeros_(self.mask_head.weight)
        nn.init.constant_(self.mask_head.bias, -4.6)
        return self

    def deployable(self) -> Classifier:
        """This classifier without the auxiliary head (same backbone modules, nothing copied): what is saved."""
        return self if self.mask_head is None else Classifier(self.backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.mask_head is None or not self.training:
            return self.backbone(x).squeeze(1)
        features = self.backbone.forward_features(x)
        if features.ndim != 4:
            raise ConfigError("loss.mask needs a classifier whose features are a [B,C,H,W] map (a CNN)")
        return self.backbone.forward_head(features).squeeze(1), self.mask_head(features)


def build_classifier(config: dict[str, Any]) -> Classifier:
    """Build the network described by a classifier ``config.json`` (random weights; weights load separately)."""
    cfg = {**CONFIG_JSON_FALLBACK, **config}
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
