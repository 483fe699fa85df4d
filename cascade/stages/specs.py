"""The two stages as specs: what differs between the classifier and the segmenter, registered once.

Code outside this module looks a stage up by its code (:func:`stage_spec`) instead of branching on it: building
the network, the part pretrained weights fill and freezing freezes, the checks of a saved ``config.json``, the
training configuration's defaults, the datasets, the per-image validation statistics and metrics, and the metric
that picks ``best/``. One vocabulary: ``code`` (``cls``/``seg``) is the ``stage`` value of every configuration and
of ``--stage``; ``noun`` (``classifier``/``segmenter``) names MODEL_DIR's stage folders and what messages say.

Adding a segmenter family (an smp architecture or encoder) touches :mod:`cascade.stages.segmenter` only; a new
stage is one more :class:`StageSpec` in :data:`SPECS` (plus its network module and a test).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from cascade.data.datasets import ClassifierDataset, SegmenterDataset
from cascade.errors import CascadeError, ModelError
from cascade.stages import is_shared_gate
from cascade.stages.classifier import POOLS, build_classifier
from cascade.stages.gate import LEVELS, SharedEncoderGate, build_gate
from cascade.stages.segmenter import build_segmenter
from cascade.thresholds.metrics import best_min_area, confusion, dice_from_counts, roc_auc, sensitivity, specificity

if TYPE_CHECKING:
    import albumentations as A

    from cascade.data.cache import PreprocessCache
    from cascade.data.preprocess import Preprocessing
    from cascade.stages.training import RunData

Stats = dict[str, np.ndarray]


@dataclass(frozen=True)
class StageSpec:
    """Everything stage-specific that the shared code (checkpoint, weights, training, config, tune) needs."""

    code: str
    noun: str
    build: Callable[[dict[str, Any]], nn.Module]
    """The network of a stage ``config.json`` (random weights)."""
    backbone: Callable[[nn.Module], tuple[nn.Module, tuple[str, ...]]]
    """The part of a built network that pretrained weights fill and freezing freezes, and its head's name prefixes
    (left as built)."""
    backbone_key: str
    """The network key naming the backbone (``--encoder`` sets it; hub weights are looked up by it)."""
    network_names: tuple[str, ...]
    """The ``config.json`` keys naming networks (checked as short strings before anything is built)."""
    check_config: Callable[[Mapping[str, Any], str], None]
    """The stage's own checks of a saved ``config.json`` (``ModelError`` naming the file and field)."""
    defaults: dict[str, Any]
    """The training configuration's stage sections (``network``, ``loss``, ``sampling``) and the common keys the
    stage sets otherwise (the segmenter's ``runtime.ema``): the one place the network defaults live."""
    datasets: Callable[[RunData, Preprocessing, PreprocessCache, A.Compose | None, Mapping[str, Any]],
                       tuple[Dataset, Dataset]]
    """Training (augmented) and validation datasets of a run, given its configuration."""
    batch_stats: Callable[[torch.Tensor, torch.Tensor], Stats]
    """Per-image validation statistics of one batch (logits, targets)."""
    metrics: Callable[[Stats], dict[str, Any]]
    """The stage's validation metrics from every rank's per-image statistics."""
    best_key: str
    """The validation metric that picks ``best/`` (higher is better)."""


def stage_spec(code: Any, error: type[CascadeError] = ModelError) -> StageSpec:
    """The spec of stage ``code``; ``error`` naming the known stages otherwise."""
    if isinstance(code, str) and code in SPECS:
        return SPECS[code]
    raise error(f"stage {code!r} is not one of {', '.join(repr(c) for c in SPECS)}")


# ---------------------------------------------------------------------------------------------------- classifier


def _build_classifier(config: dict[str, Any]) -> nn.Module:
    """A timm classifier, or the shared-encoder gate when ``config["gate"]`` is ``shared``."""
    return build_gate(config) if is_shared_gate(config) else build_classifier(config)


def _classifier_backbone(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    if isinstance(model, SharedEncoderGate):  # its encoder is the segmenter's, frozen: nothing to fill or free
        return nn.Module(), ()
    backbone = model.backbone
    head = backbone.pretrained_cfg.get("classifier", "fc")
    heads = head if isinstance(head, (list, tuple)) else (head,)
    return backbone, tuple(f"{h}." for h in heads)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_classifier(config: Mapping[str, Any], where: str) -> None:
    if config.get("gate", "separate") not in ("shared", "separate"):
        raise ModelError(f"{where}: gate must be 'shared' or 'separate'")
    if is_shared_gate(dict(config)):
        _check_gate(config, where)
    if config.get("pool", "avg") not in POOLS:
        raise ModelError(f"{where}: pool must be one of {', '.join(POOLS)}")
    drop = config.get("drop_rate", 0.0)
    if not _number(drop) or not 0.0 <= drop < 1.0:
        raise ModelError(f"{where}: drop_rate must be a number in [0, 1)")


def _check_gate(config: Mapping[str, Any], where: str) -> None:
    segmenter = config.get("segmenter")
    if not isinstance(segmenter, dict) or not all(
        isinstance(segmenter.get(k), str) and 0 < len(segmenter[k]) <= 200 for k in ("arch", "encoder")
    ):
        raise ModelError(f"{where}: a shared gate needs segmenter.arch and segmenter.encoder (network names)")
    levels = config.get("levels", list(LEVELS))
    if not isinstance(levels, list) or not 0 < len(levels) <= 5 or not all(type(v) is int and 0 < v <= 5 for v in levels):
        raise ModelError(f"{where}: levels must be a list of encoder levels 1..5")
    width = config.get("width", 32)
    if type(width) is not int or not 0 < width <= 1024:
        raise ModelError(f"{where}: width must be an integer in 1..1024")
    sha = config.get("encoder_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ModelError(f"{where}: encoder_sha256 must be the 64-digit sha256 of the segmenter's encoder")


def _classifier_datasets(
    run: RunData, prep: Preprocessing, cache: PreprocessCache, augment: A.Compose | None, config: Mapping[str, Any]
) -> tuple[Dataset, Dataset]:
    masks = run.labels if config["loss"]["mask"] > 0 else None  # the auxiliary mask loss trains on masks
    return ClassifierDataset(run.train, prep, cache, augment, masks), ClassifierDataset(run.val, prep, cache)


def _classifier_batch(logits: torch.Tensor, y: torch.Tensor) -> Stats:
    return {"score": torch.sigmoid(logits).cpu().numpy(), "truth": y.cpu().numpy() > 0.5}


def _classifier_metrics(stats: Stats) -> dict[str, Any]:
    scores, truth = stats["score"], stats["truth"].astype(bool)
    c = confusion(scores >= 0.5, truth)
    return {"val_auc": roc_auc(scores, truth), **c.to_dict(), "sensitivity": sensitivity(c),
            "specificity": specificity(c)}


# ---------------------------------------------------------------------------------------------------- segmenter


def _no_check(config: Mapping[str, Any], where: str) -> None:
    """Nothing beyond the network names (smp refuses a bad combination with a ConfigError when built)."""


def _segmenter_datasets(
    run: RunData, prep: Preprocessing, cache: PreprocessCache, augment: A.Compose | None, config: Mapping[str, Any]
) -> tuple[Dataset, Dataset]:
    return (
        SegmenterDataset(run.train, prep, cache, run.labels, augment),
        SegmenterDataset(run.val, prep, cache, run.labels),
    )


def _segmenter_batch(logits: torch.Tensor, y: torch.Tensor) -> Stats:
    pred = (logits > 0).flatten(1)
    truth = (y > 0.5).flatten(1)
    return {"inter": (pred & truth).sum(1).cpu().numpy(), "pred": pred.sum(1).cpu().numpy(),
            "area": truth.sum(1).cpu().numpy()}


def _segmenter_metrics(stats: Stats) -> dict[str, Any]:
    dices = dice_from_counts(stats["inter"], stats["pred"], stats["area"])
    positive = stats["area"] > 0
    area_dice, min_area = best_min_area(stats["inter"], stats["pred"], stats["area"])
    return {
        "val_mean_dice": float(dices.mean()),
        "val_mean_dice_area": area_dice,
        "val_min_area": min_area,
        "val_dice_pos": float(dices[positive].mean()) if positive.any() else math.nan,
        "val_dice_neg": float(dices[~positive].mean()) if (~positive).any() else math.nan,
    }


SPECS: dict[str, StageSpec] = {
    "cls": StageSpec(
        code="cls",
        noun="classifier",
        build=_build_classifier,
        backbone=_classifier_backbone,
        backbone_key="model",
        network_names=("model",),
        check_config=_check_classifier,
        defaults={
            "network": {"model": "resnet34", "pool": "avg", "drop_rate": 0.0, "init_from": None, "gate": "auto",
                        "shared_encoder": None},
            "loss": {"bce": 1.0, "dice": 0.0, "focal": 0.0, "focal_gamma": 2.0, "mask": 1.0, "dice_per": "image",
                     "distill": 1.0},
            "sampling": {"positive_share": None},
        },
        datasets=_classifier_datasets,
        batch_stats=_classifier_batch,
        metrics=_classifier_metrics,
        best_key="val_auc",
    ),
    "seg": StageSpec(
        code="seg",
        noun="segmenter",
        build=build_segmenter,
        backbone=lambda model: (model.encoder, ()),
        backbone_key="encoder",
        network_names=("arch", "encoder"),
        check_config=_no_check,
        defaults={
            "network": {"arch": "unet", "encoder": "resnet34", "prior": 0.01},
            "loss": {"bce": 1.0, "dice": 1.0, "focal": 0.0, "focal_gamma": 2.0, "mask": 0.0, "dice_per": "batch",
                     "distill": 0.0},
            "sampling": {"positive_share": "auto"},
            "runtime": {"ema": 0.99},  # evaluated and saved: the average of the last ~100 steps' weights
        },
        datasets=_segmenter_datasets,
        batch_stats=_segmenter_batch,
        metrics=_segmenter_metrics,
        best_key="val_mean_dice_area",  # mean Dice at 0.5 with the best minimum area, as the tuned rule will use it
    ),
}
"""Every stage, by code (the order is the order stages are listed in messages and MODEL_DIR)."""
