"""The one training loss of both stages: a weighted sum of BCE, soft Dice (segmenter only) and binary focal loss.

Logits are ``[B]`` (classifier) or ``[B,1,H,W]`` (segmenter); the loss is computed in float32 whatever the autocast
dtype, so bf16/fp16 training does not lose the small Dice gradients. Soft Dice is per image with +1 smoothing, so
an image with an empty mask scores 1 only when the prediction is (softly) empty too — the challenge's convention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, per: str = "image") -> torch.Tensor:
    """Soft Dice loss with ``p = sigmoid(logits)``: per ``"image"``, ``1 - mean over images of (2·Σpt + s) /
    (Σp + Σt + s)``; per ``"batch"``, the same ratio with the sums taken over the whole batch.

    Per image, an empty image's term is ``1 - s/(Σp + s)``: any probability mass on a negative image costs nearly
    the whole term, which on small, mostly negative data drives the segmenter to empty masks. Per batch, a false
    positive costs in proportion to the lesion area of the batch."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    if per == "batch":
        return 1.0 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
    dice = (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1.0 - dice.mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Binary focal loss ``mean((1 - p_t)^γ · BCE)``: easy pixels/images count less."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)
    return ((1.0 - p_t) ** gamma * bce).mean()


class ComboLoss(nn.Module):
    """``bce·BCE + dice·SoftDice + focal·Focal`` with the weights of a config's ``loss`` section."""

    def __init__(
        self, bce: float = 1.0, dice: float = 0.0, focal: float = 0.0, focal_gamma: float = 2.0, dice_per: str = "image"
    ) -> None:
        super().__init__()
        self.bce, self.dice, self.focal, self.gamma, self.dice_per = bce, dice, focal, focal_gamma, dice_per

    @classmethod
    def from_config(cls, loss: dict[str, Any]) -> ComboLoss:
        return cls(loss["bce"], loss["dice"], loss["focal"], loss["focal_gamma"], loss["dice_per"])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.to(logits.dtype).reshape(logits.shape)
        total = logits.new_zeros(())
        if self.bce:
            total = total + self.bce * F.binary_cross_entropy_with_logits(logits, target)
        if self.dice:
            total = total + self.dice * soft_dice_loss(logits, target, per=self.dice_per)
        if self.focal:
            total = total + self.focal * focal_loss(logits, target, self.gamma)
        return total


class MaskAuxLoss(nn.Module):
    """The classifier's loss plus ``weight`` × (BCE + soft Dice over the batch) of its auxiliary mask head, whose
    target is the lesion mask max-pooled to the head's grid (a cell is lesion when any of its pixels is).

    ``outputs`` is ``(logits [B], mask logits [B,1,h,w])`` and ``targets`` is ``(labels [B], masks [B,1,H,W])``;
    a plain logits tensor (eval mode) is scored on the labels alone.
    """

    def __init__(self, main: ComboLoss, weight: float) -> None:
        super().__init__()
        self.main, self.weight = main, weight
        self.aux = ComboLoss(bce=1.0, dice=1.0, dice_per="batch")

    def forward(self, outputs: Any, targets: Any) -> torch.Tensor:
        labels, masks = targets
        if not isinstance(outputs, tuple):
            return self.main(outputs, labels)
        logits, mask_logits = outputs
        cells = F.adaptive_max_pool2d(masks.float(), mask_logits.shape[-2:])
        return self.main(logits, labels) + self.weight * self.aux(mask_logits, cells)


class GateLoss(nn.Module):
    """The shared-encoder gate's loss: the classifier's loss on the image logit (the maximum of the region map) plus
    ``distill`` × BCE between the region logits and the segmenter's own probability map max-pooled to their grid
    (:class:`cascade.stages.gate.SharedEncoderGate`: ``outputs`` is ``(logits, region_logits, teacher)`` in training
    mode, plain logits in eval mode)."""

    def __init__(self, main: ComboLoss, distill: float) -> None:
        super().__init__()
        self.main, self.distill = main, distill

    def forward(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, tuple):
            return self.main(outputs, labels)
        logits, regions, teacher = outputs
        total = self.main(logits, labels)
        if self.distill:
            total = total + self.distill * F.binary_cross_entropy_with_logits(regions.float(), teacher.float())
        return total
