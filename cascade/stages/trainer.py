"""The training loop of one stage in one process: a :class:`Trainer` and the pieces it runs.

:class:`Trainer` holds the runtime, configuration, model, AdamW optimizer, GradScaler and optional EMA, and runs an
epoch through its hooks: :meth:`~Trainer.train_step` (one batch: autocast forward, backward, and every
``optim.accumulate`` batches the scheduled learning rate, clipping, optimizer and EMA steps),
:meth:`~Trainer.train_epoch`, :meth:`~Trainer.validate` (the whole validation fold, each rank a disjoint slice) and
:meth:`~Trainer.on_epoch_end` (metrics row, best epoch, warnings, time budget, :meth:`~Trainer.save_checkpoint`).
:meth:`~Trainer.state_dict` / :meth:`~Trainer.load_state_dict` are ``state.pt`` (weights, optimizer, GradScaler,
EMA and the :class:`TrainState`). What a run reads and checks before training is :mod:`cascade.stages.training`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cascade.common.processes import worker_init
from cascade.data.augment import seed_augment, seed_worker
from cascade.data.preprocess import Preprocessing
from cascade.stages import is_shared_gate
from cascade.stages.checkpoint import build_model
from cascade.stages.classifier import Classifier
from cascade.stages.config import positive_share, to_yaml
from cascade.stages.gate import LEVELS, WIDTH, SharedEncoderGate
from cascade.stages.losses import ComboLoss, GateLoss, MaskAuxLoss
from cascade.stages.sampling import PositiveShareSampler
from cascade.stages.segmenter import set_foreground_prior
from cascade.stages.specs import stage_spec
from cascade.stages.weights import set_backbone_trainable
from cascade.storage import rundir
from cascade.thresholds.metrics import json_float

if TYPE_CHECKING:
    from cascade.stages.training import RunData

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


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random (the epoch's draws are all derived from here)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one rank."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**31


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

    def state_dict(self) -> dict[str, Any]:
        """The average and its update count, as ``state.pt`` keeps them (``ema``, ``ema_updates``)."""
        return {"ema": {k: v.cpu() for k, v in self.state.items()}, "ema_updates": self.updates}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Continue the average ``state_dict`` saved (each tensor back on the device of the one it replaces)."""
        self.state = {k: v.to(self.state[k].device) for k, v in saved["ema"].items()}
        self.updates = int(saved["ema_updates"])


def build_training_model(config: dict[str, Any]) -> nn.Module:
    """The network a run trains: the stage's network, plus the classifier's auxiliary mask head when
    ``loss.mask`` weighs it (the head is dropped from every saved stage folder, kept in ``state.pt``)."""
    model = build_model(network_config(config))
    if isinstance(model, SharedEncoderGate):  # its segmenter's weights come from --init-from or state.pt
        model.attached = True
    elif config["loss"]["mask"] > 0:  # the configuration allows it for the classifier only
        model.add_mask_head()
    elif config["stage"] == "seg" and config["network"]["prior"] is not None:  # weights loaded later replace it
        set_foreground_prior(model, config["network"]["prior"])
    return model


def training_loss(config: dict[str, Any]) -> nn.Module:
    """The loss a run trains with: the combined loss, with the classifier's auxiliary mask term when weighted."""
    loss = ComboLoss.from_config(config["loss"])
    if is_shared_gate(config["network"]):
        return GateLoss(loss, config["loss"]["distill"])
    if config["loss"]["mask"] > 0:
        return MaskAuxLoss(loss, config["loss"]["mask"])
    return loss


def network_config(config: dict[str, Any]) -> dict[str, Any]:
    """What ``build_model`` needs to rebuild the run's network (``network.init_from`` only says where training
    started, so it stays in ``config.yaml``)."""
    network = config["network"]
    if is_shared_gate(network):  # the segmenter's encoder and the head: no timm classifier keys
        shared = network["shared_encoder"]
        return {"stage": "cls", "in_chans": 1, "gate": "shared", "segmenter": {"arch": shared["arch"],
                "encoder": shared["encoder"]}, "levels": list(LEVELS), "width": WIDTH, "encoder_sha256": shared["sha256"]}
    kept = {k: v for k, v in network.items() if k not in ("init_from", "gate", "shared_encoder", "prior")}
    return {"stage": config["stage"], "in_chans": 1, **kept}


def stage_config(config: dict[str, Any], fingerprint: str, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a saved stage folder: network keys, preprocessing, split and the epoch's metrics."""
    return {
        **network_config(config),
        "preprocessing": Preprocessing(**config["preprocessing"]).to_dict(),
        "split_fingerprint": fingerprint,
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
        worker_init_fn=worker_init(seed_worker) if workers else None,
        generator=torch.Generator().manual_seed(generator_seed),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def to_device(target: Any, device: torch.device) -> Any:
    """A batch's target on ``device``: a tensor, or a tuple of them (label and mask for the auxiliary loss)."""
    if isinstance(target, (tuple, list)):
        return tuple(t.to(device, non_blocking=True) for t in target)
    return target.to(device, non_blocking=True)


@torch.no_grad()
def predict_stats(model: nn.Module, dataset: Dataset, config: dict[str, Any], rt: Runtime) -> dict[str, np.ndarray]:
    """Per-image validation statistics of this rank's slice (every ``world``-th image, no padding)."""
    criterion = ComboLoss.from_config(config["loss"])
    part = Subset(dataset, range(rt.rank, len(dataset), rt.world))
    loader = make_loader(part, config, rt)
    model.eval()
    spec = stage_spec(config["stage"])
    out: dict[str, list[np.ndarray]] = {"loss": []}
    for x, y in loader:
        x = x.to(rt.device, non_blocking=True)
        y = y.to(rt.device, non_blocking=True)
        if config["runtime"]["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(rt.device.type, dtype=rt.amp or torch.float32, enabled=rt.amp is not None):
            logits = model(x)
        logits = logits.float()
        out["loss"].append(np.array([criterion(logits, y).item() * x.shape[0]]))
        for key, value in spec.batch_stats(logits, y).items():
            out.setdefault(key, []).append(value)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def gather_stats(stats: dict[str, np.ndarray], rt: Runtime) -> dict[str, np.ndarray]:
    """Concatenate every rank's per-image statistics (each image appears exactly once; a rank whose slice was
    empty has only the loss)."""
    if rt.world == 1:
        return stats
    parts: list[Any] = [None] * rt.world
    dist.all_gather_object(parts, stats)
    keys = dict.fromkeys(k for part in parts for k in part)
    return {k: np.concatenate([part.get(k, np.zeros(0)) for part in parts]) for k in keys}


def validation_metrics(stage: str, stats: dict[str, np.ndarray], n_images: int) -> dict[str, Any]:
    """Loss and the stage's metrics from gathered per-image statistics."""
    return {"val_loss": float(stats["loss"].sum() / max(n_images, 1)), **stage_spec(stage).metrics(stats)}


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
    """The number ``best/`` is chosen by (the stage's ``best_key``): the classifier's ROC AUC, the segmenter's mean
    Dice at 0.5 with the best minimum predicted area.

    A segmenter that finds nothing on every positive validation image is never chosen (nan): predicting nothing
    scores the all-empty baseline, which beats an early, still noisy segmenter, and would hand ``tune`` and
    ``--init-from`` untrained weights.
    """
    if stage == "seg" and val.get("val_dice_pos") == 0.0:
        return math.nan
    return float(val[stage_spec(stage).best_key])


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


# ---------------------------------------------------------------------------------------------------- trainer


@dataclass
class TrainState:
    """The run's progress besides the weights: epochs finished, the best selection score so far, every finished
    epoch's metrics row, and the split they were trained on (the plain values of ``state.pt``)."""

    epoch: int = 0
    best: float = math.nan
    history: list[dict[str, Any]] = field(default_factory=list)
    split_fingerprint: str = ""

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best": self.best, "history": self.history,
                "split_fingerprint": self.split_fingerprint}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.epoch, self.best = int(saved["epoch"]), float(saved["best"])
        self.history = list(saved["history"])
        self.split_fingerprint = str(saved["split_fingerprint"])


class Trainer:
    """One stage's training in this process (see the module docstring for the hooks and their order).

    Reproducibility: every random draw of an epoch (sampler order, augmentation, dropout, DataLoader worker seeds)
    is seeded from ``(seed, epoch, rank)`` when the epoch starts (:meth:`epoch_loader`), the learning rate is a
    function of the step's position, and whether the backbone is frozen a function of the epoch, so
    :meth:`state_dict` is all a resumed run needs to continue bit-identically (on CPU with the same worker count).
    """

    def __init__(
        self,
        config: dict[str, Any],
        rt: Runtime,
        model: nn.Module,
        run: RunData,
        train_set: Dataset,
        val_set: Dataset,
        out: Path,
        *,
        progress: bool = True,
    ) -> None:
        self.config, self.rt, self.run, self.out, self.progress = config, rt, run, out, progress
        self.train_set, self.val_set = train_set, val_set
        optim = config["optim"]
        self.model = self._place(model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim["lr"], weight_decay=optim["weight_decay"])
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp is torch.float16)
        self.ema = Ema(self.model, config["runtime"]["ema"]) if config["runtime"]["ema"] > 0 else None
        self.eval_model = self._place(build_training_model(config)) if self.ema is not None else self.model
        """What validation runs and the stage folders hold: the EMA weights when kept, else ``model``."""
        self.criterion = training_loss(config)
        self.state = TrainState(split_fingerprint=run.fingerprint)
        self.train_model: nn.Module = self.model
        """What the step calls: ``model`` in DDP and/or compiled (rebuilt by :meth:`set_frozen`)."""
        self.frozen: bool | None = None
        self._plan_epochs()

    def _place(self, model: nn.Module) -> nn.Module:
        model.to(self.rt.device)
        if self.config["runtime"]["channels_last"]:
            model.to(memory_format=torch.channels_last)
        return model

    def _plan_epochs(self) -> None:
        """Each epoch's share of positives and the sampler drawing them (again when the time budget cuts epochs)."""
        config, rt = self.config, self.rt
        self.shares = [positive_share(config, e) for e in range(config["optim"]["epochs"])]
        self.sampler = PositiveShareSampler(self.train_set.positive, self.shares, config["seed"], rt.rank, rt.world)

    # ------------------------------------------------------------------------------------------------ state.pt

    def state_dict(self) -> dict[str, Any]:
        """What ``state.pt`` holds: weights (with the classifier's auxiliary head), optimizer, GradScaler, EMA and
        :class:`TrainState`, as CPU tensors and plain values (loadable with ``weights_only=True``)."""
        ema = self.ema.state_dict() if self.ema is not None else {"ema": {}, "ema_updates": 0}
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            **ema,
            **self.state.state_dict(),
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Continue from ``saved`` (``state.pt`` as :func:`cascade.storage.rundir.load_state` read it)."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(saved)
        self.state.load_state_dict(saved)

    def save_checkpoint(self, row: dict[str, Any], improved: bool) -> None:
        """Rank 0's RUN_DIR writes after an epoch: the run's fixed files once, then ``last/`` (and ``best/`` when
        ``improved``), ``metrics.csv`` and ``state.pt`` last (:func:`cascade.storage.rundir.write_epoch`)."""
        run = self.run
        rundir.write_start(self.out, to_yaml(self.config), run.folds, run.positive, run.sources)
        metrics = {
            k: json_float(v) if isinstance(v, float) else v
            for k, v in row.items()
            if k.startswith("val_") or k in ("tp", "fp", "fn", "tn")
        }
        model = self.eval_model
        if isinstance(model, Classifier):
            model = model.deployable()
        saved = stage_config(self.config, run.fingerprint, row["epoch"], metrics)
        rundir.write_epoch(self.out, model, saved, improved, self.state.history, self.state_dict())

    # ------------------------------------------------------------------------------------------------ epochs

    def fit(self, clock: TimeBudget) -> dict[str, Any]:
        """Train from ``state.epoch`` to ``optim.epochs`` (fewer when ``clock`` runs out); the last metrics row."""
        row: dict[str, Any] = self.state.history[-1] if self.state.history else {}
        start = epoch = self.state.epoch
        clock.begin_epochs()
        while epoch < self.config["optim"]["epochs"]:  # the time budget may plan fewer after the first epoch
            if epoch > start and _agreed(clock.stop_before_next(), self.rt):
                if self.rt.main:
                    print(f"time budget of {self.config['optim']['time_budget']:g} min reached: stopped after epoch "
                          f"{epoch} of {self.config['optim']['epochs']} (best/ and last/ are complete; --resume "
                          "RUN_DIR continues)", file=sys.stderr)
                break
            self.set_frozen(epoch < self.config["optim"]["freeze_backbone_epochs"])
            stats = self.train_epoch(self.epoch_loader(epoch), epoch)
            row = self.on_epoch_end(epoch, stats, self.validate(), clock)
            epoch += 1
        return row

    def set_frozen(self, frozen: bool) -> None:
        """Freeze or free the backbone (``optim.freeze_backbone_epochs``) and rebuild :attr:`train_model` (DDP
        registers the parameters that need gradients); nothing to do when already so."""
        if frozen != self.frozen:
            self.frozen = frozen
            set_backbone_trainable(self.model, self.config["stage"], not frozen)
            self.train_model = wrap_for_training(self.model, self.config, self.rt)

    def epoch_loader(self, epoch: int) -> DataLoader:
        """The training loader of ``epoch``, with every random draw seeded from ``(seed, epoch, rank)``."""
        seed = epoch_seed(self.config["seed"], epoch, self.rt.rank)
        seed_everything(seed)
        if self.train_set.augment is not None and self.config["data"]["workers"] == 0:
            seed_augment(self.train_set.augment, seed)
        self.sampler.set_epoch(epoch)
        return make_loader(self.train_set, self.config, self.rt, self.sampler, generator_seed=seed)

    def train_step(self, x: torch.Tensor, y: Any, epoch: int, i: int, steps: int) -> torch.Tensor:
        """Batch ``i`` of ``steps``: forward under autocast and backward; every ``optim.accumulate`` batches (and at
        the epoch's end) the learning rate of this point of the schedule, clipping, the optimizer and EMA steps.
        Returns the batch's loss."""
        rt, optim = self.rt, self.config["optim"]
        x = x.to(rt.device, non_blocking=True)
        y = to_device(y, rt.device)
        if self.config["runtime"]["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        stepping = (i + 1) % optim["accumulate"] == 0 or i + 1 == steps
        sync = contextlib.nullcontext() if stepping or rt.world == 1 else self.train_model.no_sync()
        with sync:
            with torch.autocast(rt.device.type, dtype=rt.amp or torch.float32, enabled=rt.amp is not None):
                logits = self.train_model(x)
            loss = self.criterion(logits, y)
            self.scaler.scale(loss / optim["accumulate"]).backward()
        if stepping:
            factor = lr_factor(epoch + (i + 1) / steps, optim["epochs"], optim["warmup_epochs"], optim["min_lr_ratio"])
            for group in self.optimizer.param_groups:
                group["lr"] = optim["lr"] * factor
            if optim["grad_clip"] > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), optim["grad_clip"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model)
        return loss

    def train_epoch(self, loader: DataLoader | Sequence[Any], epoch: int) -> EpochStats:
        """One pass of :meth:`train_step` over ``loader``; the mean loss over every rank and the speed."""
        from cascade.common.progress import progress_bar

        rt = self.rt
        steps = len(loader)
        self.train_model.train()
        total = torch.zeros((), device=rt.device)
        images, waited, start = 0, 0.0, time.perf_counter()
        bar = progress_bar(
            total=steps, desc=f"epoch {epoch + 1}/{self.config['optim']['epochs']}", unit="batch", leave=False,
            disable=not (self.progress and rt.main),
        )
        for i, (wait, (x, y)) in enumerate(_timed(loader)):
            waited += wait
            loss = self.train_step(x, y, epoch, i, steps)
            total += loss.detach() * x.shape[0]
            images += x.shape[0]
            if rt.main and self.progress and (i % 10 == 0 or i + 1 == steps):
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

    def validate(self) -> dict[str, Any]:
        """The validation loss and the stage's metrics over the whole validation fold (EMA weights when kept)."""
        if self.ema is not None:
            self.eval_model.load_state_dict(self.ema.state)
        gathered = gather_stats(predict_stats(self.eval_model, self.val_set, self.config, self.rt), self.rt)
        return validation_metrics(self.config["stage"], gathered, len(self.val_set))

    def on_epoch_end(self, epoch: int, stats: EpochStats, val: dict[str, Any], clock: TimeBudget) -> dict[str, Any]:
        """After an epoch: its metrics row, whether it is the best so far, the collapse warning, after the first
        epoch the number of epochs the time budget holds, and on rank 0 :meth:`save_checkpoint` and the progress
        line. Returns the row."""
        config, rt, state = self.config, self.rt, self.state
        score = selection_score(config["stage"], val)
        improved = _better(score, state.best) or (math.isnan(state.best) and not rundir.best_stage(self.out).exists())
        state.best = score if improved else state.best
        row = {
            "epoch": epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": stats.loss,
            "train_images": stats.images,
            "images_per_s": stats.images_per_s,
            "data_wait": stats.data_wait / max(stats.seconds, 1e-9),
            "positive_share": self.shares[epoch] if self.shares[epoch] is not None else "",
            **val,
            "best": int(improved),
        }
        collapse = collapse_warning(config["stage"], [*state.history, row])
        if config["stage"] == "seg":
            row["collapsed"] = int(collapse is not None)
        state.history.append(row)
        state.epoch = epoch + 1
        if rt.main and collapse is not None and (len(state.history) < 2 or not state.history[-2].get("collapsed", 0)):
            print(f"warning: epoch {epoch + 1}: {collapse}", file=sys.stderr)
        clock.epoch_done()
        if epoch == 0 and clock.budget:
            self._fit_budget(clock)
        if rt.main:
            self.save_checkpoint(row, improved)
            if self.progress:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "lr")
                print(f"epoch {epoch + 1}/{config['optim']['epochs']}: {shown}", file=sys.stderr)
        if rt.world > 1:
            dist.barrier()
        return row

    def _fit_budget(self, clock: TimeBudget) -> None:
        """After the first epoch: plan the epochs the time budget holds (``config.yaml``, written after this
        epoch, records the planned number, and the schedule spans it)."""
        epochs = self.config["optim"]["epochs"]
        planned = _agreed(clock.epochs_that_fit(epochs), self.rt)
        if planned == epochs:
            return
        self.config["optim"]["epochs"] = planned
        self._plan_epochs()
        if self.rt.main:
            print(f"time budget {self.config['optim']['time_budget']:g} min: the first epoch took "
                  f"{clock.epoch_seconds:.0f} s, so {planned} epochs fit; the schedule now spans {planned}",
                  file=sys.stderr)
