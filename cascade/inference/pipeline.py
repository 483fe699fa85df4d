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

How the networks run (device, precision, engine, compile, cache folder) is one resolved
:class:`cascade.inference.runtime.Runtime`; each stage runs on the engine it names (:mod:`cascade.inference.engines`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
import torch
from pydicom.dataset import Dataset
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from cascade.common.processes import worker_init
from cascade.data.dicom import MAX_PIXELS, MAX_SIDE, DicomImage, check_max_pixels, read_dicom
from cascade.data.preprocess import Preprocessing, prepare_image, to_uint8
from cascade.data.rle import EMPTY, rle_encode
from cascade.data.synth_spec import is_synthetic
from cascade.errors import CascadeError, CascadeWarning, ConfigError, ImageError, ModelError
from cascade.inference.engines import Engine, engine_class
from cascade.inference.precision import PrecisionWarning, check_tuned
from cascade.inference.runtime import Runtime
from cascade.stages.checkpoint import load_stage
from cascade.stages.gate import SharedEncoderGate, attach_shared_gates
from cascade.storage.modeldir import Member, ModelIdentity, model_identity, read_model_dir, write_model_dir
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
    image: np.ndarray | None = field(default=None, repr=False)
    """The decoded radiograph as uint8 grey levels at its native size (what an overlay is drawn on); kept only when
    asked (``predict_many(..., keep_image=True)``), so the source is never decoded twice."""
    model: ModelIdentity | None = field(default=None, repr=False)
    """The model that made this answer (:attr:`Cascade.identity`: folder name and digest, version, thresholds), what
    the DICOM results name; None only for a prediction built by hand."""

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
    image: np.ndarray | None = field(default=None, repr=False)
    """uint8 grey levels at the native size, when kept (:attr:`Prediction.image`)."""


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
    image: np.ndarray | None = None


def check_batch_size(batch_size: int) -> int:
    """The one check of a prediction batch size (``predict_many``, ``tune``, ``listen``; the command lines read
    ``--batch-size`` with :func:`cascade.cli.argtypes.positive_int`); returns it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be an integer of at least 1, got {batch_size!r}")
    return batch_size


def default_workers() -> int:
    """Loader processes for ``predict_many``: half the cores (at least one), so decoding overlaps inference."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class _DecodeDataset(TorchDataset):
    """Paths → :class:`_Decoded` at each needed input size; never raises for a bad file."""

    def __init__(
        self, sources: Sequence[Source], sizes: Sequence[int], keep_image: bool = False, max_pixels: int = MAX_PIXELS
    ) -> None:
        self.sources = list(sources)
        self.sizes = sorted(set(sizes))
        self.keep_image = keep_image
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> _Decoded:
        path = Path(self.sources[index])
        try:
            image = read_dicom(path, max_pixels=self.max_pixels)
        except CascadeError as err:
            return _Decoded(image_id=path.stem, source=str(path), error=str(err))
        except Exception as err:  # one broken file must not stop a batch run, whatever the decoder raised
            return _Decoded(image_id=path.stem, source=str(path), error=f"{path}: cannot read ({type(err).__name__})")
        return _decoded(image.pixels, path.stem, str(path), self.sizes, image.header, self.keep_image)


def _decoded(
    pixels: np.ndarray,
    image_id: str,
    source: str,
    sizes: Iterable[int],
    header: Dataset | None = None,
    keep_image: bool = False,
) -> _Decoded:
    return _Decoded(
        image_id=image_id,
        source=source,
        height=pixels.shape[0],
        width=pixels.shape[1],
        inputs={size: prepare_image(pixels, size) for size in sizes},
        header=header,
        image=to_uint8(pixels) if keep_image else None,
    )


def _collate(items: list[_Decoded]) -> list[_Decoded]:
    return items


class _Stages:
    """Both stages on the runtime's engine, and the batched decode → classify → (gated) segment loop."""

    def __init__(
        self,
        classifiers: Sequence[tuple[nn.Module, dict[str, Any]]],
        segmenters: Sequence[tuple[nn.Module, dict[str, Any]]],
        runtime: Runtime,
        int8_graphs: tuple[Sequence[bytes], Sequence[bytes]] | None = None,
    ) -> None:
        if not classifiers or not segmenters:
            raise ConfigError("a cascade needs at least one classifier and one segmenter")
        attach_shared_gates(classifiers, segmenters)
        preps = (_preprocessing(classifiers, "classifier"), _preprocessing(segmenters, "segmenter"))
        graphs = int8_graphs if runtime.precision == "int8" and int8_graphs else (None, None)

        def build(runtime: Runtime) -> tuple[Engine, Engine]:
            engine = engine_class(runtime.engine)
            return (engine(classifiers, preps[0], runtime, graphs[0]), engine(segmenters, preps[1], runtime, graphs[1]))

        try:
            self.classifier, self.segmenter = build(runtime)
        except ModelError as err:  # an export failed: under auto, torch runs the model instead
            if runtime.request.engine != "auto" or runtime.engine == "torch" or runtime.precision == "int8":
                raise
            warnings.warn(f"backend {runtime.backend} unavailable for this model ({err}); running on torch",
                          CascadeWarning, stacklevel=3)
            runtime = runtime.on_torch()
            self.classifier, self.segmenter = build(runtime)
        self.runtime = runtime
        for line in dict.fromkeys([*self.classifier.warnings(), *self.segmenter.warnings()]):
            warnings.warn(line, PrecisionWarning, stacklevel=3)
        self.sizes = (self.classifier.prep.size, self.segmenter.prep.size)
        self.shared = _encoder_runs_once(classifiers, segmenters, self.classifier, self.segmenter)
        """The gate is the segmenter's own encoder plus a head, on the torch engine: the encoder runs once per image
        and the decoder reads its features (:meth:`_classify_shared`)."""
        self.seconds = {"classifier": 0.0, "segmenter": 0.0}
        """Wall seconds spent in each stage's forwards since loading (per-request timing and metrics)."""

    def batches(
        self,
        sources: Sequence[Source],
        batch_size: int,
        workers: int | None,
        keep_image: bool = False,
        max_pixels: int = MAX_PIXELS,
    ) -> Iterator[list[_Decoded]]:
        """Decoded images in order, ``batch_size`` at a time, decoded by ``workers`` processes (0: this one);
        ``keep_image`` keeps each native-size grey image (:attr:`Prediction.image`); an image over ``max_pixels``
        is a failed one, refused before decoding."""
        check_batch_size(batch_size)
        workers = default_workers() if workers is None else workers
        loader = DataLoader(
            _DecodeDataset(sources, self.sizes, keep_image, max_pixels),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=2 if workers else None,
            worker_init_fn=worker_init() if workers else None,
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
            if good and self.shared and not tta:
                self._classify_shared(good, cls_threshold)
            elif good:
                size = self.classifier.prep.size
                start = time.perf_counter()
                probs = self.classifier(np.stack([e.item.inputs[size] for e in good]), tta)
                self.seconds["classifier"] += time.perf_counter() - start
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

    def _classify_shared(self, entries: list[_Pending], cls_threshold: float | None) -> None:
        """The gate and, for the images it passes, the decoder on the features the gate's encoder computed."""
        size = self.classifier.prep.size
        start = time.perf_counter()
        probs, features = self.classifier.gate_with_features(np.stack([e.item.inputs[size] for e in entries]))
        middle = time.perf_counter()
        self.seconds["classifier"] += middle - start
        passed = [i for i, p in enumerate(probs) if cls_threshold is None or p >= cls_threshold]
        for entry, prob in zip(entries, probs):
            entry.cls_prob = float(prob)
        if passed:
            index = torch.as_tensor(passed, device=features[0].device)
            maps = self.segmenter.decode([f.index_select(0, index) for f in features])
            for i, seg in zip(passed, maps):
                entries[i].seg_prob = seg
            self.seconds["segmenter"] += time.perf_counter() - middle

    def _segment(self, entries: list[_Pending], tta: bool) -> None:
        size = self.segmenter.prep.size
        start = time.perf_counter()
        segs = self.segmenter(np.stack([e.item.inputs[size] for e in entries]), tta)
        self.seconds["segmenter"] += time.perf_counter() - start
        for entry, seg in zip(entries, segs):
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
            image=item.image,
        )


def _encoder_runs_once(
    classifiers: Sequence[tuple[nn.Module, dict[str, Any]]],
    segmenters: Sequence[tuple[nn.Module, dict[str, Any]]],
    classifier: Engine,
    segmenter: Engine,
) -> bool:
    """Whether the gate can hand its encoder's features to the decoder: one shared-encoder gate attached to the one
    segmenter, both on the eager torch engine at one input. Otherwise (ONNX Runtime, int8, ``--compile``, several
    members) each stage runs its own network and a passed image's encoder runs twice."""
    return (
        not classifier.runtime.compile
        and len(classifiers) == 1 and len(segmenters) == 1 and isinstance(classifiers[0][0], SharedEncoderGate)
        and classifiers[0][0].segmenter is segmenters[0][0] and classifier.prep == segmenter.prep
        and hasattr(classifier, "gate_with_features") and hasattr(segmenter, "decode")
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
    runtime: Runtime | None = None,
    int8_graphs: tuple[Sequence[bytes], Sequence[bytes]] | None = None,
) -> Iterator[ImageProbabilities]:
    """Classifier and segmenter probabilities of every image, in order, before any threshold.

    The members are stage folders or ``(model, config)`` pairs (several per stage are averaged). The segmenter
    runs on every image, so ``seg_prob`` is the map at the segmenter's input size for each readable image. This is
    the exact computation ``Cascade.predict_many`` makes (on the same ``runtime``; None: ``Runtime.resolve()``, all
    ``auto``), so thresholds tuned on it mean the same at inference. ``int8_graphs`` (per stage, one per member) are
    what precision ``int8`` runs (:mod:`cascade.inference.quantize`).
    """
    stages = _Stages(
        [_load_member(m) for m in classifiers], [_load_member(m) for m in segmenters],
        runtime or Runtime.resolve(), int8_graphs,
    )
    yield from stages.probabilities(stages.batches(sources, batch_size, workers), batch_size, None, tta)


class Cascade:
    """A classifier-gated segmenter with its thresholds: load with :meth:`from_pretrained`, then :meth:`predict`.

    ``runtime`` is how the networks run (:class:`cascade.inference.runtime.Runtime`; None: ``Runtime.resolve()``, all
    ``auto``); ``tuned_precision`` is the precision the thresholds were tuned at, checked against
    the one that runs (None: unknown, not checked).
    """

    def __init__(
        self,
        classifiers: Sequence[tuple[nn.Module, dict[str, Any]]],
        segmenters: Sequence[tuple[nn.Module, dict[str, Any]]],
        thresholds: Thresholds,
        *,
        tta: bool = False,
        metrics: dict[str, Any] | None = None,
        runtime: Runtime | None = None,
        tuned_precision: str | None = None,
        int8_graphs: tuple[Sequence[bytes], Sequence[bytes]] | None = None,
    ) -> None:
        self._stages = _Stages(classifiers, segmenters, runtime or Runtime.resolve(), int8_graphs)
        self._configs = ([dict(c) for _, c in classifiers], [dict(c) for _, c in segmenters])
        self._int8_graphs = int8_graphs
        self.thresholds = thresholds
        self.tta = tta
        """Horizontal-flip TTA (from ``cascade.json``; assign to override)."""
        self.metrics = dict(metrics or {})
        self.synthetic_model = bool(self.metrics.get("training_data", {}).get("synthetic"))
        """Trained on ``cascade synth`` films only (from the model folder's provenance): meaningless on real ones."""
        self._warned_synthetic = False
        self.max_pixels = MAX_PIXELS
        """Pixel budget of one input image (:data:`cascade.data.dicom.MAX_PIXELS`; assign to change): a DICOM over
        it is refused from its header, before anything is decoded."""
        self.tuned_precision = tuned_precision
        """The precision the thresholds were tuned at (None: unknown, no check)."""
        self._identity = ModelIdentity(thresholds=thresholds)
        if tuned_precision is not None:
            check_tuned(tuned_precision, self.precision, "cascade")

    @property
    def runtime(self) -> Runtime:
        """How the networks run, resolved (after any fallback to torch)."""
        return self._stages.runtime

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def precision(self) -> str:
        """What the networks run at: ``fp32``, ``bf16``, ``fp16`` or ``int8`` (``auto`` resolved for this device)."""
        return self.runtime.precision

    @property
    def identity(self) -> ModelIdentity:
        """The model every prediction names (:attr:`Prediction.model`): the folder's name and digest when loaded with
        :meth:`from_pretrained` (empty otherwise), this cascade's version and the thresholds in use (what they were
        tuned for is dropped once ``thresholds`` is assigned other values)."""
        if self._identity.thresholds != self.thresholds:
            self._identity = dataclasses.replace(self._identity, thresholds=self.thresholds, tuned_for="")
        return self._identity

    @property
    def backend(self) -> str:
        """What runs the networks: ``torch`` or ``onnxruntime`` (``auto`` resolved)."""
        return self.runtime.backend

    @classmethod
    def from_pretrained(
        cls,
        directory: Source,
        *,
        runtime: Runtime | None = None,
        tta: bool | None = None,
        device: str | torch.device | None = None,
        precision: str | None = None,
        backend: str | None = None,
        compile: bool | None = None,
        cache_dir: Source | None = None,
    ) -> Cascade:
        """Load a MODEL_DIR (checked: schema version, sha256 of every member file, config fields; nothing is
        unpickled).

        ``runtime`` is how the networks run (None: ``Runtime.resolve()``, all ``auto``); for a folder tuned at int8,
        ``auto`` precision means its int8 graphs where they can run (:meth:`Runtime.with_int8_graphs`). A precision
        other than the one the folder was tuned at warns (:class:`cascade.inference.precision.PrecisionWarning`).
        ``tta`` overrides the folder's setting when given. ``device``, ``precision``, ``backend``, ``compile`` and
        ``cache_dir`` are :meth:`Runtime.resolve`'s requests, accepted instead of ``runtime`` until the web service
        and the DICOM node pass one.
        """
        info = read_model_dir(directory)
        runtime = _runtime(runtime, device=device, precision=precision, engine=backend, compile=compile,
                           cache_dir=cache_dir)
        if info.precision == "int8":
            runtime = runtime.with_int8_graphs()
        graphs = None
        if runtime.precision == "int8" or info.precision == "int8":
            graphs = (info.int8_graphs("classifier"), info.int8_graphs("segmenter"))
        model = cls(
            *info.load(),
            info.thresholds,
            tta=info.tta if tta is None else tta,
            metrics=info.metrics,
            runtime=runtime,
            int8_graphs=graphs,
        )
        model.tuned_precision = info.precision
        model._identity = model_identity(info)
        check_tuned(info.precision, model.precision, str(info.root))
        return model

    def save_pretrained(self, directory: Source) -> Path:
        """Write this cascade as a MODEL_DIR (the format :meth:`from_pretrained` reads)."""
        cls_configs, seg_configs = self._configs
        precision = self.tuned_precision or self.precision
        if precision == "int8" and not self._int8_graphs:
            raise ConfigError("a cascade tuned at int8 is saved with its int8 graphs, and this one has none")
        return write_model_dir(
            directory,
            [(m, c) for m, c in zip(self._stages.classifier.models, cls_configs)],
            [(m, c) for m, c in zip(self._stages.segmenter.models, seg_configs)],
            self.thresholds,
            metrics=self.metrics,
            tta=self.tta,
            precision=precision,
            int8_graphs=dict(zip(("classifier", "segmenter"), self._int8_graphs)) if precision == "int8" else None,
        )

    def predict(self, x: Source | Dataset | np.ndarray) -> Prediction:
        """Predict one image: a DICOM path, a pydicom ``Dataset``, or a 2-D array (float in [0,1] or uint8).

        Raises a ``CascadeError`` for an unreadable input (``predict_many`` reports it instead).
        """
        (pred,) = self.predict_batch([self.prepare(x)])
        return pred

    def prepare(self, x: Source | Dataset | BinaryIO | np.ndarray | DicomImage) -> _Decoded:
        """Decode and preprocess one image for :meth:`predict_batch` (CPU only, no network: safe in any thread).

        Takes what :meth:`predict` takes, a binary file object, or a :class:`~cascade.data.dicom.DicomImage`
        already read; the ImageId is the file stem for a path, else the SOPInstanceUID. Raises a ``CascadeError``
        for an unreadable input.
        """
        if isinstance(x, np.ndarray):
            return _decoded(_array_pixels(x), "array", "<array>", self._stages.sizes)
        image = x if isinstance(x, DicomImage) else read_dicom(x, max_pixels=self.max_pixels)
        image_id = Path(x).stem if isinstance(x, (str, os.PathLike)) else image.image_id
        return _decoded(image.pixels, image_id, image.source, self._stages.sizes, image.header)

    def predict_batch(self, items: Sequence[_Decoded]) -> list[Prediction]:
        """Predict prepared images (:meth:`prepare`) together: one classifier forward over all of them and one
        segmenter forward over those that pass the gate; this is what the web service's micro-batching runs. The
        answers are those of :meth:`predict` on each image, up to float rounding in batched convolutions (about
        1e-7 in a probability, which can flip a mask pixel lying exactly at a threshold)."""
        if not items:
            return []
        probs = self._stages.probabilities([list(items)], len(items), self.thresholds.cls, self.tta)
        return [self._finish(p) for p in probs]

    def warm_up(self) -> None:
        """Run each stage once on a grey image, so first-call setup (CUDA kernels, allocations) is not paid by the
        first real image."""
        item = self.prepare(np.full((64, 64), 0.5, dtype=np.float32))
        for _ in self._stages.probabilities([[item]], 1, None, self.tta):
            pass

    @property
    def stage_seconds(self) -> dict[str, float]:
        """Wall seconds spent in the classifier's and the segmenter's forwards since loading."""
        return dict(self._stages.seconds)

    def predict_many(
        self,
        sources: Sequence[Source],
        *,
        batch_size: int = 16,
        workers: int | None = None,
        gate: bool = True,
        keep_image: bool = False,
    ) -> Iterator[Prediction]:
        """Predict DICOM files in order, batched, decoding in ``workers`` processes; bad files give failed results.

        ``gate=False`` runs the segmenter on every image (same answers, slower: the baseline of the benchmark).
        ``keep_image`` keeps each decoded radiograph in :attr:`Prediction.image` (for an output drawn on it).
        """
        batches = self._stages.batches(sources, batch_size, workers, keep_image, check_max_pixels(self.max_pixels))
        cls_threshold = self.thresholds.cls if gate else None
        for probs in self._stages.probabilities(batches, batch_size, cls_threshold, self.tta):
            yield self._finish(probs)

    def _check_domain(self, probs: ImageProbabilities) -> None:
        """Warn once when a model trained on synthetic films meets a DICOM that ``cascade synth`` did not write:
        its answers there mean nothing (on the real SIIM samples such a model called every film positive)."""
        if self.synthetic_model and not self._warned_synthetic and probs.header is not None:
            if not is_synthetic(probs.header):
                self._warned_synthetic = True
                warnings.warn(
                    f"{probs.source}: this model was trained on synthetic films (cascade synth) only; its answers "
                    "on real radiographs are meaningless (see MODEL_CARD.md)",
                    SyntheticModelWarning,
                    stacklevel=3,
                )

    def _finish(self, probs: ImageProbabilities) -> Prediction:
        """Apply the thresholds at the image's native size."""
        if probs.error is not None:
            return Prediction(math.nan, False, None, "", probs.image_id, probs.source, probs.error)
        shape = (probs.height, probs.width)
        if probs.seg_prob is None:
            mask = np.zeros(shape, dtype=bool)
        else:
            mask = apply_rule(probs.cls_prob, native_map(probs), self.thresholds, area_scale(*shape))
        self._check_domain(probs)
        positive = bool(mask.any())
        rle = rle_encode(mask) if positive else EMPTY
        return Prediction(
            probs.cls_prob, positive, mask, rle, probs.image_id, probs.source, header=probs.header, image=probs.image,
            model=self.identity,
        )


def _runtime(runtime: Runtime | None, **requests: Any) -> Runtime:
    """``runtime``, or one resolved from :meth:`Cascade.from_pretrained`'s request keywords (not both)."""
    given = {name: value for name, value in requests.items() if value is not None}
    if runtime is not None and given:
        raise ConfigError(f"give runtime= or the requests {', '.join(given)}, not both")
    return runtime or Runtime.resolve(**given)


class SyntheticModelWarning(UserWarning):
    """A model that learned only from ``cascade synth`` films was given a real radiograph."""


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
        raise ImageError(f"an image array must be 2-D (height x width, each 1..{MAX_SIDE}), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ImageError(f"an image array must be uint8 or float in [0,1], got {x.dtype}")
    pixels = x.astype(np.float32, copy=False)
    if not (np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0):
        raise ImageError("a float image array must hold finite values in [0,1] (MONOCHROME2: bright = dense)")
    return pixels
