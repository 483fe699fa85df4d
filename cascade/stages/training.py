"""One training loop for both stages, on one CPU, one GPU or several GPUs under ``torchrun``.

A run: check the inputs (labels, images, split, configuration) and only then write into RUN_DIR; train with AdamW,
a per-step warm-up + cosine learning rate, gradient accumulation and clipping, autocast (bf16, or fp16 with a
GradScaler), channels_last, optional ``torch.compile`` and an optional EMA of the weights; validate once per epoch
over the true validation fold (each rank predicts a disjoint slice, the per-image statistics are gathered); and
write, on rank 0 only and atomically, ``last/`` and ``best/`` (stage folders), ``metrics.csv`` and ``state.pt``.

Reproducibility: every random draw of an epoch (sampler order, augmentation, dropout, DataLoader worker seeds) is
seeded from ``(seed, epoch, rank)`` when the epoch starts, and the learning rate is a function of the step's
position, so ``state.pt`` (weights, optimizer, GradScaler, EMA, epoch, best score, metric history) is all a resumed
run needs to continue exactly as an uninterrupted one would (bit-identical on CPU with the same worker count).
Whether the backbone is frozen (``optim.freeze_backbone_epochs``) is a function of the epoch too, and a frozen
parameter has no AdamW state to lose. A classifier may start from a segmenter run's encoder (``network.init_from``,
:func:`cascade.stages.weights.init_from_segmenter`); a resumed run takes its weights from ``state.pt`` instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cascade.data.augment import build_augment, seed_augment, seed_worker
from cascade.data.cache import PreprocessCache, default_cache_dir
from cascade.data.datasets import ClassifierDataset, Item, SegmenterDataset, make_items
from cascade.data.index import match, scan_dicoms
from cascade.data.labels import Labels, read_labels
from cascade.data.preprocess import Preprocessing
from cascade.data.splits import make_folds, read_groups, split_fingerprint
from cascade import rundir
from cascade.errors import CascadeError, ConfigError, from_worker
from cascade.precision import cpu_supports_bf16
from cascade.processes import die_with_parent
from cascade.stages.checkpoint import build_model
from cascade.stages.config import apply_recipe, positive_share, to_yaml
from cascade.stages.classifier import Classifier
from cascade.stages.losses import ComboLoss, MaskAuxLoss
from cascade.stages.sampling import PositiveShareSampler
from cascade.stages.weights import init_from_segmenter, init_source, load_pretrained, set_backbone_trainable
from cascade.thresholds.metrics import confusion, dice_from_counts, json_float, roc_auc, sensitivity, specificity

BEST_KEY = {"cls": "val_auc", "seg": "val_mean_dice"}
"""The validation metric that picks ``best/`` (higher is better)."""


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its rank among ``world`` processes, device and autocast dtype."""

    rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class RunData:
    """The checked inputs of a run: labels, the fold of every image, and the training and validation items."""

    labels: Labels
    folds: dict[str, int]
    positive: dict[str, bool]
    train: list[Item]
    val: list[Item]
    fingerprint: str
    sources: dict[str, str] = field(default_factory=dict)
    """``images`` and ``labels``: the absolute paths the run was trained from (what ``data.json`` records)."""
    description: str = ""
    """What was read and how it was split, in a few lines for the user."""


# ---------------------------------------------------------------------------------------------------- runtime


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``runtime.amp`` on ``device`` (``None``: full precision)."""
    if mode == "none":
        return None
    if device.type == "cuda":
        if mode == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if mode == "bf16" else torch.float16
    if mode == "fp16":
        raise ConfigError("runtime.amp: fp16 needs a CUDA device; use bf16 or none on CPU")
    if mode == "bf16" or cpu_supports_bf16():
        return torch.bfloat16
    return None


def setup_runtime(config: dict[str, Any]) -> Runtime:
    """Join the process group when started by ``torchrun`` and pick the device and autocast dtype."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = config["runtime"]["device"]
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: cuda was asked for but no CUDA device is available")
    use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(rank, world, device, resolve_amp(config["runtime"]["amp"], device))


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random (the epoch's draws are all derived from here)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one rank."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**31


# ---------------------------------------------------------------------------------------------------- inputs


def load_run_data(config: dict[str, Any], images: Path, labels_path: Path, progress: bool = True) -> RunData:
    """Read labels, find the images, split into folds (grouped by patient) and check the run can train."""
    labels = read_labels(labels_path)
    index = scan_dicoms(images)
    matched = match(index, labels)
    if matched.labels_without_images:
        first = sorted(matched.labels_without_images)[0]
        skipped = "".join(f"; {line}" for line in index.warnings())  # e.g. the sub-folders that could not be read
        raise ConfigError(
            f"{labels_path}: {len(matched.labels_without_images)} labelled image(s) have no DICOM file under "
            f"{images} (first: {first}){skipped}"
        )
    items = make_items(index.paths, labels)
    if not items:
        raise ConfigError(f"{images}: no DICOM file matches an ImageId of {labels_path}")
    ids = [item.image_id for item in items]
    positive = {item.image_id: item.positive for item in items}
    data = config["data"]
    sizes: dict[str, tuple[int, int]] = {}
    groups = read_groups({item.image_id: item.path for item in items}, progress, sizes)
    for item in items:  # a label past its image's edge is refused now, not after decoding the whole data set
        if item.positive and item.image_id in sizes:
            labels.check_fits(item.image_id, *sizes[item.image_id])
    folds = make_folds(ids, positive, groups, data["folds"], config["seed"])
    train = [item for item in items if folds[item.image_id] != data["fold"]]
    val = [item for item in items if folds[item.image_id] == data["fold"]]
    where = f"{labels_path} (fold {data['fold']} of {data['folds']}, {len(items)} images)"
    if not train or not val:
        raise ConfigError(f"{where}: the {'training' if not train else 'validation'} split is empty")
    n_pos = sum(item.positive for item in train)
    if config["stage"] == "seg" and n_pos == 0:
        raise ConfigError(f"{where}: no positive image in the training split; the segmenter needs masks to learn")
    if config["sampling"]["positive_share"] is not None and n_pos == 0:
        raise ConfigError(f"{where}: sampling.positive_share needs positive images in the training split")
    sources = {"images": str(images.resolve()), "labels": str(labels_path.resolve())}
    description = (
        f"labels: {labels.summary}\nimages: {matched.report()}"
        + (f", {len(index.duplicates)} duplicate ImageIds (first file kept)" if index.duplicates else "")
        + f"\nsplit: fold {data['fold']} of {data['folds']} validates: {len(train)} training images "
        f"({n_pos} positive), {len(val)} validation images ({sum(item.positive for item in val)} positive)"
    )
    return RunData(labels, folds, positive, train, val, split_fingerprint(folds), sources, description)


def make_cache(config: dict[str, Any], images: Path) -> PreprocessCache:
    """The preprocessing cache: on disk (``data.cache_dir`` or the default folder) or, with ``data.cache: false``,
    in each process's memory."""
    size = config["preprocessing"]["size"]
    if not config["data"]["cache"]:
        return PreprocessCache(None, size)
    root = config["data"]["cache_dir"] or default_cache_dir(images)
    return PreprocessCache(root, size)


def make_datasets(config: dict[str, Any], run: RunData, cache: PreprocessCache) -> tuple[Dataset, Dataset]:
    """Training (augmented) and validation datasets of the stage."""
    prep = Preprocessing(**config["preprocessing"])
    augment = build_augment(config["data"]["augment"])
    if config["stage"] == "cls":
        masks = run.labels if config["loss"]["mask"] > 0 else None  # the auxiliary mask loss trains on masks
        return ClassifierDataset(run.train, prep, cache, augment, masks), ClassifierDataset(run.val, prep, cache)
    return (
        SegmenterDataset(run.train, prep, cache, run.labels, augment),
        SegmenterDataset(run.val, prep, cache, run.labels),
    )


# ---------------------------------------------------------------------------------------------------- pieces


def lr_factor(progress: float, epochs: int, warmup: float, min_ratio: float) -> float:
    """Learning-rate multiplier at ``progress`` epochs: linear warm-up, then cosine down to ``min_ratio``."""
    if progress < warmup:
        return (progress + 1e-3) / (warmup + 1e-3)
    span = max(epochs - warmup, 1e-9)
    t = min((progress - warmup) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class Ema:
    """Exponential moving average of a model's state (floats averaged, integer buffers copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``; the decay ramps up over the first steps ((1+n)/(10+n))."""
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.state[key].lerp_(value.detach(), 1.0 - d)
            else:
                self.state[key].copy_(value)


def build_training_model(config: dict[str, Any]) -> nn.Module:
    """The network a run trains: the stage's network, plus the classifier's auxiliary mask head when
    ``loss.mask`` weighs it (the head is dropped from every saved stage folder, kept in ``state.pt``)."""
    model = build_model(network_config(config))
    if config["stage"] == "cls" and config["loss"]["mask"] > 0:
        model.add_mask_head()
    return model


def training_loss(config: dict[str, Any]) -> nn.Module:
    """The loss a run trains with: the combined loss, with the classifier's auxiliary mask term when weighted."""
    loss = ComboLoss.from_config(config["loss"])
    if config["stage"] == "cls" and config["loss"]["mask"] > 0:
        return MaskAuxLoss(loss, config["loss"]["mask"])
    return loss


def network_config(config: dict[str, Any]) -> dict[str, Any]:
    """What ``build_model`` needs to rebuild the run's network (``network.init_from`` only says where training
    started, so it stays in ``config.yaml``)."""
    network = {k: v for k, v in config["network"].items() if k != "init_from"}
    return {"stage": config["stage"], "in_chans": 1, **network}


def stage_config(config: dict[str, Any], run: RunData, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a saved stage folder: network keys, preprocessing, split and the epoch's metrics."""
    return {
        **network_config(config),
        "preprocessing": Preprocessing(**config["preprocessing"]).to_dict(),
        "split_fingerprint": run.fingerprint,
        "fold": config["data"]["fold"],
        "folds": config["data"]["folds"],
        "seed": config["seed"],
        "epoch": epoch,
        "metrics": metrics,
    }


# ---------------------------------------------------------------------------------------------------- epochs


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    data_wait: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _timed(loader: DataLoader) -> Iterator[tuple[float, Any]]:
    """Yield ``(seconds waited for the batch, batch)``."""
    it = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield time.perf_counter() - start, batch


def loader_workers(data: dict[str, Any]) -> int:
    """``data.workers`` capped for this machine: at most the cores when images are decoded each epoch
    (``cache: false``), else cores − 1, leaving one core to the training step (more processes than cores only
    fight over them: the GPU configurations' 8 workers on a 2-core machine ran slower than 1)."""
    cores = os.cpu_count() or 1
    return min(data["workers"], cores if not data["cache"] else max(0, cores - 1))


def make_loader(
    dataset: Dataset, config: dict[str, Any], rt: Runtime, sampler: Any = None, generator_seed: int = 0
) -> DataLoader:
    """A DataLoader whose worker seeds come from ``generator_seed`` (so an epoch's augmentation is repeatable)."""
    workers = loader_workers(config["data"])
    return DataLoader(
        dataset,
        batch_size=config["optim"]["batch_size"],
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=rt.device.type == "cuda",
        worker_init_fn=_init_worker if workers else None,
        generator=torch.Generator().manual_seed(generator_seed),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def _init_worker(worker_id: int) -> None:
    """A training loader worker: dies with the main process, then seeds its augmentation."""
    die_with_parent(worker_id)
    seed_worker(worker_id)


def _to_device(target: Any, device: torch.device) -> Any:
    """A batch's target on ``device``: a tensor, or a tuple of them (label and mask for the auxiliary loss)."""
    if isinstance(target, (tuple, list)):
        return tuple(t.to(device, non_blocking=True) for t in target)
    return target.to(device, non_blocking=True)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: Ema | None,
    raw_model: nn.Module,
    config: dict[str, Any],
    rt: Runtime,
    epoch: int,
    progress: bool,
) -> EpochStats:
    """One pass over ``loader``: forward under autocast, backward, and an optimizer step every ``accumulate``."""
    from cascade.progress import progress_bar

    optim = config["optim"]
    accumulate, base_lr = optim["accumulate"], optim["lr"]
    channels_last = config["runtime"]["channels_last"]
    steps = len(loader)
    model.train()
    total = torch.zeros((), device=rt.device)
    images, waited, start = 0, 0.0, time.perf_counter()
    bar = progress_bar(
        total=steps, desc=f"epoch {epoch + 1}/{optim['epochs']}", unit="batch", leave=False,
        disable=not (progress and rt.main),
    )
    for i, (wait, (x, y)) in enumerate(_timed(loader)):
        waited += wait
        x = x.to(rt.device, non_blocking=True)
        y = _to_device(y, rt.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        stepping = (i + 1) % accumulate == 0 or i + 1 == steps
        sync = contextlib.nullcontext() if stepping or rt.world == 1 else model.no_sync()
        with sync:
            with torch.autocast(rt.device.type, dtype=rt.amp or torch.float32, enabled=rt.amp is not None):
                logits = model(x)
            loss = criterion(logits, y)
            scaler.scale(loss / accumulate).backward()
        if stepping:
            factor = lr_factor(epoch + (i + 1) / steps, optim["epochs"], optim["warmup_epochs"], optim["min_lr_ratio"])
            for group in optimizer.param_groups:
                group["lr"] = base_lr * factor
            if optim["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), optim["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(raw_model)
        total += loss.detach() * x.shape[0]
        images += x.shape[0]
        if rt.main and progress and (i % 10 == 0 or i + 1 == steps):
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{images * rt.world / max(elapsed, 1e-9):.1f}")
        bar.update(1)
    bar.close()
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - start
    counts = torch.stack([total.float().cpu(), torch.tensor(float(images))])
    if rt.world > 1:
        dist.all_reduce(counts)
    return EpochStats(float(counts[0] / max(counts[1], 1)), int(counts[1]), seconds, waited)


@torch.no_grad()
def predict_stats(model: nn.Module, dataset: Dataset, config: dict[str, Any], rt: Runtime) -> dict[str, np.ndarray]:
    """Per-image validation statistics of this rank's slice (every ``world``-th image, no padding)."""
    criterion = ComboLoss.from_config(config["loss"])
    part = Subset(dataset, range(rt.rank, len(dataset), rt.world))
    loader = make_loader(part, config, rt)
    model.eval()
    out: dict[str, list[np.ndarray]] = {"loss": [], "score": [], "truth": [], "inter": [], "pred": [], "area": []}
    for x, y in loader:
        x = x.to(rt.device, non_blocking=True)
        y = y.to(rt.device, non_blocking=True)
        if config["runtime"]["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(rt.device.type, dtype=rt.amp or torch.float32, enabled=rt.amp is not None):
            logits = model(x)
        logits = logits.float()
        out["loss"].append(np.array([criterion(logits, y).item() * x.shape[0]]))
        if config["stage"] == "cls":
            out["score"].append(torch.sigmoid(logits).cpu().numpy())
            out["truth"].append(y.cpu().numpy() > 0.5)
        else:
            pred = (logits > 0).flatten(1)
            truth = (y > 0.5).flatten(1)
            out["inter"].append((pred & truth).sum(1).cpu().numpy())
            out["pred"].append(pred.sum(1).cpu().numpy())
            out["area"].append(truth.sum(1).cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def gather_stats(stats: dict[str, np.ndarray], rt: Runtime) -> dict[str, np.ndarray]:
    """Concatenate every rank's per-image statistics (each image appears exactly once)."""
    if rt.world == 1:
        return stats
    parts: list[Any] = [None] * rt.world
    dist.all_gather_object(parts, stats)
    return {k: np.concatenate([p[k] for p in parts]) for k in stats}


def validation_metrics(stage: str, stats: dict[str, np.ndarray], n_images: int) -> dict[str, Any]:
    """Loss and the stage's metrics from gathered per-image statistics."""
    metrics: dict[str, Any] = {"val_loss": float(stats["loss"].sum() / max(n_images, 1))}
    if stage == "cls":
        scores, truth = stats["score"], stats["truth"].astype(bool)
        c = confusion(scores >= 0.5, truth)
        metrics.update(
            val_auc=roc_auc(scores, truth), **c.to_dict(), sensitivity=sensitivity(c), specificity=specificity(c)
        )
    else:
        dices = dice_from_counts(stats["inter"], stats["pred"], stats["area"])
        positive = stats["area"] > 0
        metrics.update(
            val_mean_dice=float(dices.mean()),
            val_dice_pos=float(dices[positive].mean()) if positive.any() else math.nan,
            val_dice_neg=float(dices[~positive].mean()) if (~positive).any() else math.nan,
        )
    return metrics


# ---------------------------------------------------------------------------------------------------- run


def _better(value: float, best: float) -> bool:
    return not math.isnan(value) and (math.isnan(best) or value > best)


COLLAPSE_DICE = 0.02
COLLAPSE_EPOCHS = 3
"""A segmenter whose Dice on the validation positives stays under ``COLLAPSE_DICE`` for ``COLLAPSE_EPOCHS`` epochs in
a row is collapsing to the all-empty answer (the loss it reaches there is low on a mostly negative dataset)."""


def collapse_warning(stage: str, history: Sequence[dict[str, Any]]) -> str | None:
    """The warning for a segmenter that has predicted (almost) nothing on the validation positives for the last
    ``COLLAPSE_EPOCHS`` epochs, with what to change; None otherwise."""
    recent = [row.get("val_dice_pos") for row in history[-COLLAPSE_EPOCHS:]]
    if stage != "seg" or len(recent) < COLLAPSE_EPOCHS:
        return None
    if not all(isinstance(v, float) and v < COLLAPSE_DICE for v in recent):
        return None
    shown = ", ".join(f"{v:.3f}" for v in recent)
    return (
        f"the segmenter has drawn (almost) nothing on the validation positives for {COLLAPSE_EPOCHS} epochs (Dice on "
        f"positives {shown}): it is collapsing to the all-empty answer. Raise the learning rate (optim.lr), the "
        "share of positives per epoch (sampling.positive_share) or the Dice weight (loss.dice)"
    )


def selection_score(stage: str, val: dict[str, Any]) -> float:
    """The number ``best/`` is chosen by: the classifier's ROC AUC, the segmenter's mean Dice at 0.5.

    A segmenter that finds nothing on every positive validation image is never chosen (nan): predicting nothing
    scores the all-empty baseline, which beats an early, still noisy segmenter, and would hand ``tune`` and
    ``--init-from`` untrained weights.
    """
    if stage == "seg" and val.get("val_dice_pos") == 0.0:
        return math.nan
    return float(val[BEST_KEY[stage]])


def oom_message(config: dict[str, Any]) -> str:
    """The one-line advice when a batch does not fit in GPU memory."""
    return (
        f"CUDA out of memory with batch size {config['optim']['batch_size']} at {config['preprocessing']['size']}px: "
        "lower --batch-size (and raise optim.accumulate to keep the effective batch), lower --image-size, "
        "or set runtime.amp to bf16/fp16"
    )


def train(
    config: dict[str, Any],
    images: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    pretrained: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one stage as ``config`` says and write RUN_DIR ``out``; returns the last epoch's metrics row.

    ``resume`` continues from ``out/state.pt`` (``config`` must be the run's own, as ``config.yaml`` records it).
    Raises ``CascadeError`` subclasses for bad input before anything is written.
    """
    images, labels, out = Path(images), Path(labels), Path(out)
    rt = setup_runtime(config)
    try:
        return _train(config, images, labels, out, rt, resume, pretrained, progress)
    except torch.OutOfMemoryError:
        raise ConfigError(oom_message(config)) from None
    except CascadeError as err:  # one raised in a loader worker arrives with the worker's traceback as message
        raise from_worker(err) from None
    finally:
        if rt.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: dict[str, Any],
    images: Path,
    labels: Path,
    out: Path,
    rt: Runtime,
    resume: bool,
    pretrained: str | None,
    progress: bool,
) -> dict[str, Any]:
    clock = TimeBudget(config["optim"]["time_budget"] * 60.0)
    rundir.check_run_dir(out, resume)
    init_from = config["network"].get("init_from")
    if init_from and pretrained:
        raise ConfigError(f"--init-from {init_from} and --pretrained {pretrained}: choose one starting point")
    if init_from and not resume:
        init_source(config)
    run = load_run_data(config, images, labels, progress and rt.main)
    config, recipe = apply_recipe(config, len(run.train))
    if rt.main and progress:
        print(run.description + (f"\n{recipe}" if recipe else ""), file=sys.stderr)
    workers = loader_workers(config["data"])
    if rt.main and workers < config["data"]["workers"]:
        print(f"data.workers {config['data']['workers']} capped to {workers}: this machine has {os.cpu_count()} "
              "cores (set --workers to choose)", file=sys.stderr)
    state = rundir.load_state(out) if resume else None
    if state is not None and state["split_fingerprint"] != run.fingerprint:
        raise ConfigError(f"{out}: the images, labels or split differ from the run being resumed")
    cache = make_cache(config, images)
    if rt.main and config["data"]["cache"]:
        errors = cache.warm(run.train + run.val, workers=max(1, workers), progress=progress)
        if errors:
            raise errors[0].__class__(f"{errors[0]} ({len(errors)} unreadable image(s) in all)")
    if rt.world > 1:
        dist.barrier()
    train_set, val_set = make_datasets(config, run, cache)

    seed_everything(config["seed"])
    model = build_training_model(config)
    if pretrained and state is None:
        load_pretrained(model, config, pretrained)
    if init_from and state is None:
        report = init_from_segmenter(model, config)
        if rt.main and progress:
            print(report.describe(), file=sys.stderr)
        if rt.main and report.warning:
            print(f"warning: {report.warning}", file=sys.stderr)
    model.to(rt.device)
    if config["runtime"]["channels_last"]:
        model.to(memory_format=torch.channels_last)
    optim = config["optim"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim["lr"], weight_decay=optim["weight_decay"])
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp is torch.float16)
    ema = Ema(model, config["runtime"]["ema"]) if config["runtime"]["ema"] > 0 else None
    history: list[dict[str, Any]] = []
    best, start_epoch = math.nan, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.state = {k: v.to(rt.device) for k, v in state["ema"].items()}
            ema.updates = int(state["ema_updates"])
        history, best, start_epoch = list(state["history"]), float(state["best"]), int(state["epoch"])

    eval_model = model
    if ema is not None:
        eval_model = build_training_model(config).to(rt.device)
        if config["runtime"]["channels_last"]:
            eval_model.to(memory_format=torch.channels_last)

    epochs = config["optim"]["epochs"]
    shares = [positive_share(config, e) for e in range(epochs)]
    sampler = PositiveShareSampler(train_set.positive, shares, config["seed"], rt.rank, rt.world)
    criterion = training_loss(config)
    row: dict[str, Any] = history[-1] if history else {}
    frozen: bool | None = None
    clock.begin_epochs()
    for epoch in range(start_epoch, epochs):
        if epoch >= epochs:  # the time budget planned fewer epochs after the first
            break
        if epoch > start_epoch and _agreed(clock.stop_before_next(), rt):
            if rt.main:
                print(f"time budget of {config['optim']['time_budget']:g} min reached: stopped after epoch {epoch} "
                      f"of {epochs} (best/ and last/ are complete; --resume RUN_DIR continues)", file=sys.stderr)
            break
        if frozen != (epoch < optim["freeze_backbone_epochs"]):
            frozen = epoch < optim["freeze_backbone_epochs"]
            set_backbone_trainable(model, config["stage"], not frozen)
            train_model = wrap_for_training(model, config, rt)
        seed = epoch_seed(config["seed"], epoch, rt.rank)
        seed_everything(seed)
        if train_set.augment is not None and config["data"]["workers"] == 0:
            seed_augment(train_set.augment, seed)
        sampler.set_epoch(epoch)
        loader = make_loader(train_set, config, rt, sampler, generator_seed=seed)
        stats = train_epoch(
            train_model, loader, criterion, optimizer, scaler, ema, model, config, rt, epoch, progress
        )
        if ema is not None:
            eval_model.load_state_dict(ema.state)
        gathered = gather_stats(predict_stats(eval_model, val_set, config, rt), rt)
        val = validation_metrics(config["stage"], gathered, len(val_set))
        score = selection_score(config["stage"], val)
        improved = _better(score, best) or (math.isnan(best) and not rundir.best_stage(out).exists())
        best = score if improved else best
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": stats.loss,
            "train_images": stats.images,
            "images_per_s": stats.images_per_s,
            "data_wait": stats.data_wait / max(stats.seconds, 1e-9),
            "positive_share": shares[epoch] if shares[epoch] is not None else "",
            **val,
            "best": int(improved),
        }
        collapse = collapse_warning(config["stage"], [*history, row])
        if config["stage"] == "seg":
            row["collapsed"] = int(collapse is not None)
        history.append(row)
        if rt.main and collapse is not None and (len(history) < 2 or not history[-2].get("collapsed", 0)):
            print(f"warning: epoch {epoch + 1}: {collapse}", file=sys.stderr)
        clock.epoch_done()
        if epoch == 0 and clock.budget:
            planned = _agreed(clock.epochs_that_fit(epochs), rt)
            if planned != epochs:
                epochs = config["optim"]["epochs"] = planned
                shares = [positive_share(config, e) for e in range(epochs)]
                sampler = PositiveShareSampler(train_set.positive, shares, config["seed"], rt.rank, rt.world)
                if rt.main:  # config.yaml, written after this first epoch, records the planned number
                    print(f"time budget {config['optim']['time_budget']:g} min: the first epoch took "
                          f"{clock.epoch_seconds:.0f} s, so {planned} epochs fit; the schedule now spans {planned}",
                          file=sys.stderr)
        if rt.main:
            _write_epoch(out, config, run, eval_model, row, improved, history, {
                "epoch": epoch + 1,
                "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": {k: v.cpu() for k, v in ema.state.items()} if ema is not None else {},
                "ema_updates": ema.updates if ema is not None else 0,
                "best": best,
                "history": history,
                "split_fingerprint": run.fingerprint,
            })
            if progress:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "lr")
                print(f"epoch {epoch + 1}/{epochs}: {shown}", file=sys.stderr)
        if rt.world > 1:
            dist.barrier()
    return row


class TimeBudget:
    """Wall-clock budget of one training command (0: none): how many epochs fit after the first one, and whether
    the next epoch would overrun it. Times from the start of the command, so loading and caching count too."""

    def __init__(self, seconds: float) -> None:
        self.budget = seconds
        self.start = time.monotonic()
        self.last = self.start
        self.epoch_seconds = 0.0

    def begin_epochs(self) -> None:
        """Mark the start of the first epoch (loading and caching before it count against the budget, not as an
        epoch's length)."""
        self.last = time.monotonic()

    def epoch_done(self) -> None:
        now = time.monotonic()
        self.epoch_seconds = max(self.epoch_seconds, now - self.last)  # the slowest epoch seen: plan for the worst
        self.last = now

    def epochs_that_fit(self, most: int) -> int:
        """After the first epoch: 1 + the further epochs the rest of the budget holds, at most ``most``."""
        left = self.budget - (time.monotonic() - self.start)
        return max(1, min(most, 1 + int(left // max(self.epoch_seconds, 1e-9))))

    def stop_before_next(self) -> bool:
        return bool(self.budget) and time.monotonic() - self.start + self.epoch_seconds > self.budget


def _agreed(value: int | bool, rt: Runtime) -> int:
    """Rank 0's ``value`` on every rank (clocks differ between processes; the decision must not)."""
    if rt.world == 1:
        return int(value)
    tensor = torch.tensor([int(value)], device=rt.device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def wrap_for_training(model: nn.Module, config: dict[str, Any], rt: Runtime) -> nn.Module:
    """``model`` as the training step calls it: in DistributedDataParallel across processes, compiled when asked.
    Built again whenever the backbone is frozen or unfrozen (DDP registers the parameters that need gradients)."""
    out: nn.Module = model
    if rt.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        out = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if config["runtime"]["compile"]:
        out = torch.compile(out)
    return out


def _write_epoch(
    out: Path,
    config: dict[str, Any],
    run: RunData,
    model: nn.Module,
    row: dict[str, Any],
    improved: bool,
    history: list[dict[str, Any]],
    state: dict[str, Any],
) -> None:
    """Rank 0's writes after an epoch (RUN_DIR's own order: see :mod:`cascade.rundir`)."""
    rundir.write_start(out, to_yaml(config), run.folds, run.positive, run.sources)
    metrics = {
        k: json_float(v) if isinstance(v, float) else v
        for k, v in row.items()
        if k.startswith("val_") or k in ("tp", "fp", "fn", "tn")
    }
    if isinstance(model, Classifier):
        model = model.deployable()
    rundir.write_epoch(out, model, stage_config(config, run, row["epoch"], metrics), improved, history, state)
