"""Inference: a classifier gates a segmenter; the thresholds of the model folder turn probabilities into masks.

Per image: decode (``read_dicom``), preprocess with the same code as training (``prepare_image`` at each stage's
input size, then ``normalize``), run the classifier members (averaged probabilities, optional horizontal-flip
TTA), run the segmenter members **only on images whose classifier probability clears ``cls``** (collected into
full batches across classifier batches, order kept), resize the
probability map to the image's native size and apply the rule (:func:`cascade.thresholds.rule.apply_rule`, areas
rescaled by :func:`~cascade.thresholds.rule.area_scale` of the native size).

``predict_many`` decodes and preprocesses in DataLoader worker processes while the main process runs the networks;
an unreadable file becomes a failed :class:`Prediction` (with its reason) and the run goes on.
``predict_probabilities`` is the same loop without thresholds, for ``cascade tune`` on the validation fold.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pydicom.dataset import Dataset
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from cascade.data.dicom import MAX_SIDE, read_dicom
from cascade.data.preprocess import Preprocessing, normalize, prepare_image
from cascade.data.rle import EMPTY, rle_encode
from cascade.errors import CascadeError, ConfigError
from cascade.modeldir import Member, read_model_dir, write_model_dir
from cascade.processes import die_with_parent
from cascade.stages.checkpoint import load_stage
from cascade.thresholds.rule import Thresholds, apply_rule, area_scale

Source = str | os.PathLike[str]


@dataclass(frozen=True, eq=False)
class Prediction:
    """The answer for one image. A failed image has ``error`` set, no mask and ``rle`` ``""``."""

    probability: float
    """The classifier's probability (members and TTA averaged); NaN when the image failed."""
    positive: bool
    """The final decision after every threshold (the mask is non-empty)."""
    mask: np.ndarray | None
    """bool, the image's own height x width."""
    rle: str
    """The challenge RLE of ``mask`` (``-1`` when empty)."""
    image_id: str = ""
    source: str = ""
    error: str | None = None
    header: Dataset | None = field(default=None, repr=False)
    """The source's DICOM header without pixels (what a DICOM SEG references); None for arrays and failures."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, eq=False)
class ImageProbabilities:
    """Network outputs for one image before any threshold (what ``cascade tune`` searches over)."""

    image_id: str
    source: str
    height: int
    width: int
    cls_prob: float
    seg_prob: np.ndarray | None
    """float32 map at the segmenter's input size; None when gated out or failed."""
    error: str | None = None
    header: Dataset | None = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class _Decoded:
    """One decoded, preprocessed image (or the reason it could not be), as a loader worker hands it over."""

    image_id: str
    source: str
    height: int = 0
    width: int = 0
    inputs: dict[int, np.ndarray] | None = None
    error: str | None = None
    header: Dataset | None = None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else must name an available torch device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return resolved


def default_workers() -> int:
    """Loader processes for ``predict_many``: half the cores (at least one), so decoding overlaps inference."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class _Stage:
    """The members of one stage on a device: uint8 images in, averaged sigmoid probabilities out."""

    def __init__(self, models: Sequence[nn.Module], prep: Preprocessing, device: torch.device) -> None:
        self.prep = prep
        self.device = device
        self.models = [self._place(m) for m in models]

    def _place(self, model: nn.Module) -> nn.Module:
        model = model.eval().to(self.device)
        return model.to(memory_format=torch.channels_last)

    def __call__(self, images: np.ndarray, tta: bool) -> np.ndarray:
        """``images`` uint8 [B,S,S] → float32 probabilities, [B] (classifier) or [B,S,S] (segmenter)."""
        x = torch.from_numpy(images).to(self.device)
        x = normalize(x, self.prep).unsqueeze(1).contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        total = None
        with torch.inference_mode(), autocast:
            for model in self.models:
                prob = torch.sigmoid(model(x).float())
                if tta:
                    flipped = torch.sigmoid(model(x.flip(-1)).float())
                    prob = (prob + (flipped.flip(-1) if flipped.ndim == 4 else flipped)) / 2
                total = prob if total is None else total + prob
        assert total is not None
        out = (total / len(self.models)).cpu().numpy().astype(np.float32, copy=False)
        return out[:, 0] if out.ndim == 4 else out


class _DecodeDataset(TorchDataset):
    """Paths → :class:`_Decoded` at each needed input size; never raises for a bad file."""

    def __init__(self, sources: Sequence[Source], sizes: Sequence[int]) -> None:
        self.sources = list(sources)
        self.sizes = sorted(set(sizes))

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> _Decoded:
        path = Path(self.sources[index])
        try:
            image = read_dicom(path)
        except CascadeError as err:
            return _Decoded(image_id=path.stem, source=str(path), error=str(err))
        except Exception as err:  # one broken file must not stop a batch run, whatever the decoder raised
            return _Decoded(image_id=path.stem, source=str(path), error=f"{path}: cannot read ({type(err).__name__})")
        return _decoded(image.pixels, path.stem, str(path), self.sizes, image.header)


def _decoded(
    pixels: np.ndarray, image_id: str, source: str, sizes: Iterable[int], header: Dataset | None = None
) -> _Decoded:
    return _Decoded(
        image_id=image_id,
        source=source,
        height=pixels.shape[0],
        width=pixels.shape[1],
        inputs={size: prepare_image(pixels, size) for size in sizes},
        header=header,
    )


def _collate(items: list[_Decoded]) -> list[_Decoded]:
    return items


class _Engine:
    """Both stages on one device, and the batched decode → classify → (gated) segment loop."""

    def __init__(
        self,
        classifiers: Sequence[tuple[nn.Module, dict[str, Any]]],
        segmenters: Sequence[tuple[nn.Module, dict[str, Any]]],
        device: str | torch.device = "auto",
    ) -> None:
        if not classifiers or not segmenters:
            raise ConfigError("a cascade needs at least one classifier and one segmenter")
        self.device = resolve_device(device)
        self.classifier = _Stage([m for m, _ in classifiers], _preprocessing(classifiers, "classifier"), self.device)
        self.segmenter = _Stage([m for m, _ in segmenters], _preprocessing(segmenters, "segmenter"), self.device)
        self.sizes = (self.classifier.prep.size, self.segmenter.prep.size)

    def batches(self, sources: Sequence[Source], batch_size: int, workers: int | None) -> Iterator[list[_Decoded]]:
        """Decoded images in order, ``batch_size`` at a time, decoded by ``workers`` processes (0: this one)."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        workers = default_workers() if workers is None else workers
        loader = DataLoader(
            _DecodeDataset(sources, self.sizes),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=2 if workers else None,
            worker_init_fn=die_with_parent if workers else None,
        )
        yield from loader

    def probabilities(
        self, batches: Iterable[list[_Decoded]], batch_size: int, cls_threshold: float | None, tta: bool
    ) -> Iterator[ImageProbabilities]:
        """Classify each batch; segment the images with ``cls_prob >= cls_threshold`` (all when None); keep order.

        Passing images are collected across classifier batches until ``batch_size`` wait, so the segmenter always
        runs on full batches of only those images (a small gated batch would waste most of its speed on CPU).
        """
        pending: deque[_Pending] = deque()
        waiting: list[_Pending] = []
        for batch in batches:
            entries = [_Pending(item) for item in batch]
            good = [e for e in entries if e.item.error is None]
            if good:
                size = self.classifier.prep.size
                probs = self.classifier(np.stack([e.item.inputs[size] for e in good]), tta)
                for entry, prob in zip(good, probs):
                    entry.cls_prob = float(prob)
                    entry.waiting = cls_threshold is None or entry.cls_prob >= cls_threshold
                waiting.extend(e for e in good if e.waiting)
            pending.extend(entries)
            while len(waiting) >= batch_size:
                self._segment(waiting[:batch_size], tta)
                del waiting[:batch_size]
            while pending and not pending[0].waiting:
                yield pending.popleft().result()
        if waiting:
            self._segment(waiting, tta)
        while pending:
            yield pending.popleft().result()

    def _segment(self, entries: list[_Pending], tta: bool) -> None:
        size = self.segmenter.prep.size
        for entry, seg in zip(entries, self.segmenter(np.stack([e.item.inputs[size] for e in entries]), tta)):
            entry.seg_prob = seg
            entry.waiting = False


@dataclass(eq=False)
class _Pending:
    """An image between the classifier and its result: ``waiting`` while its segmenter map is still due."""

    item: _Decoded
    cls_prob: float = math.nan
    seg_prob: np.ndarray | None = None
    waiting: bool = False

    def result(self) -> ImageProbabilities:
        item = self.item
        return ImageProbabilities(
            image_id=item.image_id,
            source=item.source,
            height=item.height,
            width=item.width,
            cls_prob=self.cls_prob,
            seg_prob=self.seg_prob,
            error=item.error,
            header=item.header,
        )


def _preprocessing(members: Sequence[tuple[nn.Module, dict[str, Any]]], stage: str) -> Preprocessing:
    preps = []
    for _, config in members:
        if not isinstance(config.get("preprocessing"), dict):
            raise ConfigError(f"a {stage} config has no 'preprocessing' (size, mean, std)")
        preps.append(Preprocessing.from_dict(config["preprocessing"]))
    if any(p != preps[0] for p in preps[1:]):
        raise ConfigError(f"the {stage} members were trained with different preprocessing: {preps}")
    return preps[0]


def _load_member(member: Member) -> tuple[nn.Module, dict[str, Any]]:
    if isinstance(member, tuple):
        model, config = member
        return model, dict(config)
    return load_stage(member)


def predict_probabilities(
    classifiers: Sequence[Member],
    segmenters: Sequence[Member],
    sources: Sequence[Source],
    *,
    batch_size: int = 16,
    workers: int | None = None,
    tta: bool = False,
    device: str | torch.device = "auto",
) -> Iterator[ImageProbabilities]:
    """Classifier and segmenter probabilities of every image, in order, before any threshold.

    The members are stage folders or ``(model, config)`` pairs (several per stage are averaged). The segmenter
    runs on every image, so ``seg_prob`` is the map at the segmenter's input size for each readable image. This is
    the exact computation ``Cascade.predict_many`` makes, so thresholds tuned on it mean the same at inference.
    """
    engine = _Engine([_load_member(m) for m in classifiers], [_load_member(m) for m in segmenters], device)
    yield from engine.probabilities(engine.batches(sources, batch_size, workers), batch_size, None, tta)


class Cascade:
    """A classifier-gated segmenter with its thresholds: load with :meth:`from_pretrained`, then :meth:`predict`."""

    def __init__(
        self,
        classifiers: Sequence[tuple[nn.Module, dict[str, Any]]],
        segmenters: Sequence[tuple[nn.Module, dict[str, Any]]],
        thresholds: Thresholds,
        *,
        tta: bool = False,
        metrics: dict[str, Any] | None = None,
        device: str | torch.device = "auto",
    ) -> None:
        self._engine = _Engine(classifiers, segmenters, device)
        self._configs = ([dict(c) for _, c in classifiers], [dict(c) for _, c in segmenters])
        self.thresholds = thresholds
        self.tta = tta
        """Horizontal-flip TTA (from ``cascade.json``; assign to override)."""
        self.metrics = dict(metrics or {})

    @property
    def device(self) -> torch.device:
        return self._engine.device

    @classmethod
    def from_pretrained(
        cls, directory: Source, *, device: str | torch.device = "auto", tta: bool | None = None
    ) -> Cascade:
        """Load a MODEL_DIR (checked: schema version, sha256 of every member file, config fields; nothing is
        unpickled).

        ``tta`` overrides the model folder's setting when given.
        """
        info = read_model_dir(directory)
        return cls(
            info.load("classifier"),
            info.load("segmenter"),
            info.thresholds,
            tta=info.tta if tta is None else tta,
            metrics=info.metrics,
            device=device,
        )

    def save_pretrained(self, directory: Source) -> Path:
        """Write this cascade as a MODEL_DIR (the format :meth:`from_pretrained` reads)."""
        cls_configs, seg_configs = self._configs
        return write_model_dir(
            directory,
            [(m, c) for m, c in zip(self._engine.classifier.models, cls_configs)],
            [(m, c) for m, c in zip(self._engine.segmenter.models, seg_configs)],
            self.thresholds,
            metrics=self.metrics,
            tta=self.tta,
        )

    def predict(self, x: Source | Dataset | np.ndarray) -> Prediction:
        """Predict one image: a DICOM path, a pydicom ``Dataset``, or a 2-D array (float in [0,1] or uint8).

        Raises a ``CascadeError`` for an unreadable input (``predict_many`` reports it instead).
        """
        if isinstance(x, np.ndarray):
            item = _decoded(_array_pixels(x), "array", "<array>", self._engine.sizes)
        else:
            image = read_dicom(x)
            image_id = Path(x).stem if isinstance(x, (str, os.PathLike)) else image.image_id
            item = _decoded(image.pixels, image_id, image.source, self._engine.sizes, image.header)
        (probs,) = self._engine.probabilities([[item]], 1, self.thresholds.cls, self.tta)
        return self._finish(probs)

    def predict_many(
        self,
        sources: Sequence[Source],
        *,
        batch_size: int = 16,
        workers: int | None = None,
        gate: bool = True,
    ) -> Iterator[Prediction]:
        """Predict DICOM files in order, batched, decoding in ``workers`` processes; bad files give failed results.

        ``gate=False`` runs the segmenter on every image (same answers, slower: the baseline of the benchmark).
        """
        batches = self._engine.batches(sources, batch_size, workers)
        cls_threshold = self.thresholds.cls if gate else None
        for probs in self._engine.probabilities(batches, batch_size, cls_threshold, self.tta):
            yield self._finish(probs)

    def _finish(self, probs: ImageProbabilities) -> Prediction:
        """Apply the thresholds at the image's native size."""
        if probs.error is not None:
            return Prediction(math.nan, False, None, "", probs.image_id, probs.source, probs.error)
        shape = (probs.height, probs.width)
        if probs.seg_prob is None:
            mask = np.zeros(shape, dtype=bool)
        else:
            mask = apply_rule(probs.cls_prob, native_map(probs), self.thresholds, area_scale(*shape))
        positive = bool(mask.any())
        rle = rle_encode(mask) if positive else EMPTY
        return Prediction(probs.cls_prob, positive, mask, rle, probs.image_id, probs.source, header=probs.header)


def native_map(probs: ImageProbabilities) -> np.ndarray:
    """The segmenter's probability map resized (bilinear) to the image's own size: where the rule is applied."""
    if probs.seg_prob is None:
        raise ConfigError(f"{probs.source}: no segmentation map (the image was gated out or failed)")
    if probs.seg_prob.shape == (probs.height, probs.width):
        return probs.seg_prob
    return cv2.resize(probs.seg_prob, (probs.width, probs.height), interpolation=cv2.INTER_LINEAR)


def _array_pixels(x: np.ndarray) -> np.ndarray:
    """A 2-D array as float32 pixels in [0,1]: uint8 is divided by 255, floats must already lie in [0,1]."""
    if x.ndim != 2 or not (0 < x.shape[0] <= MAX_SIDE and 0 < x.shape[1] <= MAX_SIDE):
        raise ConfigError(f"an image array must be 2-D (height x width, each 1..{MAX_SIDE}), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"an image array must be uint8 or float in [0,1], got {x.dtype}")
    pixels = x.astype(np.float32, copy=False)
    if not (np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0):
        raise ConfigError("a float image array must hold finite values in [0,1] (MONOCHROME2: bright = dense)")
    return pixels
