"""A plain PyTorch segmenter, the yardstick beside cascade's in benchmarks/small_data.py.

The same network (smp U-Net, the same encoder, random initialisation, one input channel), the same images (the
cascade run's training and validation folds, the same held-out set), the same input size and the same number of
images seen — trained the way a short tutorial would: BCE + soft Dice (over the batch), AdamW at lr 1e-3 with a
cosine schedule over every step, batches of 8, each epoch all training positives plus as many negatives drawn at
random (half of each epoch positive), no augmentation, in the precision cascade's ``runtime.amp: auto`` picks on
the machine (bf16 autocast on a CPU with native bf16, else fp32: the same arithmetic, so the same speed). Scored
with a plain rule, not cascade's tuned one: probability >= 0.5 at the image's native size, and an image counts as
empty when fewer pixels pass than a minimum area chosen on the validation fold (from ``MIN_AREAS``, shares of the
image); then the mean per-image Dice of the held-out set (an empty prediction on an empty truth scores 1), the
challenge metric.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

MIN_AREAS = (0.0, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
"""Minimum predicted area tried on the validation fold, as a share of the image's pixels."""
BATCH, LR, WEIGHT_DECAY, MEAN, STD = 8, 1e-3, 1e-4, 0.5, 0.25


def load(paths: list[Path], labels: Any, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Network inputs [N, 1, size, size] (float32, normalised) and each image's truth mask at its native size."""
    from cascade.data.dicom import read_dicom

    images, masks = [], []
    for path in paths:
        image = read_dicom(path)
        pixels = cv2.resize(image.pixels, (size, size), interpolation=cv2.INTER_AREA)
        images.append((pixels - MEAN) / STD)
        masks.append(labels.mask(image.image_id, image.height, image.width))
    return np.stack(images)[:, None].astype(np.float32), masks


def train(encoder: str, x: np.ndarray, masks: list[np.ndarray], epochs: int, seed: int,
          amp: Any = None) -> tuple[Any, float, int]:
    """The trained U-Net, its training seconds and the images it saw (``amp``: the autocast dtype, or None)."""
    import segmentation_models_pytorch as smp
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    size = x.shape[-1]
    y = np.stack([cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0.5 for m in masks])
    y = torch.from_numpy(y[:, None].astype(np.float32))
    x = torch.from_numpy(x)
    positive = np.flatnonzero(y.flatten(1).amax(1).numpy() > 0)
    negative = np.setdiff1d(np.arange(len(x)), positive)
    per_epoch = len(positive) + min(len(positive), len(negative))
    model = smp.Unet(encoder, encoder_weights=None, in_channels=1, classes=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * math.ceil(per_epoch / BATCH))
    model.train()
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        order = np.concatenate([positive, rng.choice(negative, min(len(positive), len(negative)), replace=False)])
        order = rng.permutation(order)
        for i in range(0, len(order), BATCH):
            index = torch.from_numpy(order[i : i + BATCH])
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                logits = model(x[index]).float()
            target = y[index]
            prob = torch.sigmoid(logits)
            dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
            loss = F.binary_cross_entropy_with_logits(logits, target) + dice
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(index)
    return model, time.perf_counter() - start, seen


def probabilities(model: Any, x: np.ndarray, masks: list[np.ndarray]) -> list[np.ndarray]:
    """Each image's probability map resized (bilinear) to its native size."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), BATCH):
            out += list(torch.sigmoid(model(torch.from_numpy(x[i : i + BATCH])))[:, 0].numpy())
    return [cv2.resize(p, (m.shape[1], m.shape[0]), interpolation=cv2.INTER_LINEAR) for p, m in zip(out, masks)]


def mean_dice(maps: list[np.ndarray], masks: list[np.ndarray], min_area: float) -> float:
    """Mean per-image Dice of ``map >= 0.5``, emptied below ``min_area`` (share of the image's pixels)."""
    from cascade.thresholds.metrics import dice

    scores = []
    for p, m in zip(maps, masks):
        pred = p >= 0.5
        if np.count_nonzero(pred) < min_area * pred.size:
            pred[:] = False
        scores.append(dice(pred, m))
    return float(np.mean(scores))


def run(encoder: str, size: int, epochs: int, seed: int, train_paths: list[Path], val_paths: list[Path],
        test_paths: list[Path], labels: Any, test_labels: Any) -> dict[str, Any]:
    """Train on ``train_paths``, choose the minimum area on ``val_paths``, score ``test_paths``."""
    import torch

    from cascade.stages.training import resolve_amp

    amp = resolve_amp("auto", torch.device("cpu"))
    x, masks = load(train_paths, labels, size)
    model, seconds, seen = train(encoder, x, masks, epochs, seed, amp)
    val_x, val_masks = load(val_paths, labels, size)
    val_maps = probabilities(model, val_x, val_masks)
    min_area = max(MIN_AREAS, key=lambda a: (mean_dice(val_maps, val_masks, a), -a))
    test_x, test_masks = load(test_paths, test_labels, size)
    return {
        "mean_dice": mean_dice(probabilities(model, test_x, test_masks), test_masks, min_area),
        "val_mean_dice": mean_dice(val_maps, val_masks, min_area),
        "min_area": min_area,
        "images_seen": seen,
        "images_per_second": seen / seconds if seconds > 0 else math.nan,
        "precision": "bf16" if amp is not None else "fp32",
    }
