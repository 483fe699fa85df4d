"""One training run of either stage, on one CPU, one GPU or several GPUs under ``torchrun``: :func:`train`.

A run checks its inputs (labels, images, split, configuration) and only then writes into RUN_DIR
(:mod:`cascade.storage.rundir`); it then hands the prepared data and network to a
:class:`~cascade.stages.trainer.Trainer`, which trains with AdamW, a per-step warm-up + cosine learning rate, gradient
accumulation and clipping, autocast (bf16, or fp16 with a GradScaler), channels_last, optional ``torch.compile`` and an
optional EMA of the weights; validates once per epoch over the true validation fold; and writes, on rank 0 only and
atomically, ``last/`` and ``best/`` (stage folders), ``metrics.csv`` and ``state.pt``.

``state.pt`` (weights, optimizer, GradScaler, EMA, epoch, best score, metric history) is all a resumed run needs to
continue exactly as an uninterrupted one would (bit-identical on CPU with the same worker count; see
:class:`~cascade.stages.trainer.Trainer`). A classifier may start from a segmenter run's encoder
(``network.init_from``, :func:`cascade.stages.weights.init_from_segmenter`); a resumed run takes its weights from
``state.pt`` instead.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from cascade.common.devices import cpu_supports_bf16, resolve_device
from cascade.data.augment import build_augment
from cascade.data.cache import PreprocessCache, default_cache_dir
from cascade.data.datasets import Item, make_items
from cascade.data.index import match, scan_dicoms
from cascade.data.labels import Labels, read_labels
from cascade.data.preprocess import Preprocessing
from cascade.data.splits import make_folds, read_groups, split_fingerprint
from cascade.errors import CascadeError, ConfigError, from_worker
from cascade.stages.config import apply_recipe
from cascade.stages.gate import SharedEncoderGate
from cascade.stages.specs import stage_spec
from cascade.stages.trainer import (
    Runtime,
    TimeBudget,
    Trainer,
    build_training_model,
    loader_workers,
    seed_everything,
)
from cascade.stages.weights import attach_segmenter_run, init_from_segmenter, load_pretrained, resolve_gate
from cascade.storage import rundir


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
    try:
        device = resolve_device(config["runtime"]["device"], local_rank=local)
    except ConfigError as err:
        raise ConfigError(f"runtime.device: {err}") from None
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(rank, world, device, resolve_amp(config["runtime"]["amp"], device))


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
    return stage_spec(config["stage"]).datasets(run, prep, cache, augment, config)


# ---------------------------------------------------------------------------------------------------- run


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
        clock = TimeBudget(config["optim"]["time_budget"] * 60.0)
        trainer = build_trainer(config, images, labels, out, rt, resume=resume, pretrained=pretrained,
                                progress=progress)
        return trainer.fit(clock)
    except torch.OutOfMemoryError:
        raise ConfigError(oom_message(config)) from None
    except CascadeError as err:  # one raised in a loader worker arrives with the worker's traceback as message
        raise from_worker(err) from None
    finally:
        if rt.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def build_trainer(
    config: dict[str, Any],
    images: Path,
    labels: Path,
    out: Path,
    rt: Runtime,
    *,
    resume: bool = False,
    pretrained: str | None = None,
    progress: bool = True,
) -> Trainer:
    """Check the run's inputs (nothing is written), prepare its data and network, and return its Trainer, continuing
    ``out/state.pt`` when ``resume``."""
    rundir.check_run_dir(out, resume)
    init_from = config["network"].get("init_from")
    if init_from and pretrained:
        raise ConfigError(f"--init-from {init_from} and --pretrained {pretrained}: choose one starting point")
    segmenter = None
    if not resume:
        config, segmenter = resolve_gate(config)
    run = load_run_data(config, images, labels, progress and rt.main)
    config, recipe = apply_recipe(config, len(run.train))
    if rt.main and progress:
        print(run.description + (f"\n{recipe}" if recipe else ""), file=sys.stderr)
    workers = loader_workers(config["data"])
    if rt.main and workers < config["data"]["workers"]:
        print(f"data.workers {config['data']['workers']} capped to {workers}: this machine has {os.cpu_count()} "
              "cores (set --workers to choose)", file=sys.stderr)
    saved = rundir.load_state(out) if resume else None
    if saved is not None and saved["split_fingerprint"] != run.fingerprint:
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
    if saved is None:
        start_weights(model, config, pretrained, rt.main and progress, rt.main, segmenter=segmenter)
    trainer = Trainer(config, rt, model, run, train_set, val_set, out, progress=progress)
    if saved is not None:
        trainer.load_state_dict(saved)
    return trainer


def start_weights(model: nn.Module, config: dict[str, Any], pretrained: str | None, report: bool, warn: bool,
                  *, segmenter: tuple[nn.Module, dict[str, Any]] | None = None) -> None:
    """A new run's starting weights: ``--pretrained``, or the encoder of the segmenter run ``network.init_from``
    names (what was loaded is printed when ``report``, a warning about it when ``warn``); else as built."""
    if pretrained:
        load_pretrained(model, config, pretrained)
    if isinstance(model, SharedEncoderGate):  # ``segmenter``: the --init-from run resolve_gate read
        done = attach_segmenter_run(model, segmenter, config)
    elif config["network"].get("init_from"):
        done = init_from_segmenter(model, config)
    else:
        return
    if report:
        print(done.describe(), file=sys.stderr)
    if warn and done.warning:
        print(f"warning: {done.warning}", file=sys.stderr)
