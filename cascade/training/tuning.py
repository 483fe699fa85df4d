"""Tune a cascade from training runs: predict their validation folds, search the thresholds, write MODEL_DIR.

The flow behind ``cascade tune`` (one classifier and one segmenter run, or a fold ensemble of K of each):

1. read both run folders (``best/`` stage folder, ``split.csv``, ``data.json``) and check that the classifier run is
   a classifier run, the segmenter run a segmenter run, and that both validated on the same fold of the same split
   (equal split fingerprint and fold number) — otherwise the thresholds would be tuned on images a stage trained on;
2. list the validation fold's images (from the images folder and label file the runs recorded, or given);
3. predict every validation image with both stages through :func:`cascade.inference.pipeline.predict_probabilities` —
   the exact code ``Cascade.predict_many`` runs, with the same preprocessing, batching and optional flip TTA — and
   stream each image's map into :class:`cascade.thresholds.search.ThresholdSearch` (never all maps at once);
4. write MODEL_DIR with :func:`cascade.storage.modeldir.write_model_dir` (weights copied from each run's ``best/``), its
   ``report/`` (``tune.json``, ``validation.json``, the PNG plots), all in a temporary folder renamed at the end.

**Fold ensembles.** Given K classifier and K segmenter runs of one split, the runs are paired by fold (exactly one
of each stage per fold; a subset of the split's folds is allowed, each fold at most once). Each fold's validation
images are predicted by that fold's two models only, so no model scores an image it trained on, and all folds'
maps stream into one search: the thresholds are tuned on the out-of-fold predictions of every given fold. MODEL_DIR
holds the K classifiers and K segmenters as members, averaged at prediction by :class:`cascade.Cascade`. Known
caveat: the averaged ensemble is a little sharper and better calibrated than any single fold model, so the
thresholds tuned on single-model probabilities are slightly off for it (the challenge winners accepted the same),
and the recorded score is the out-of-fold score of the single fold models, not of the ensemble.

**Resolution.** The search scores each image at its **native** size: the segmenter's map is resized to the image's
height x width exactly as inference does (bilinear, ``cv2.resize``), and the truth mask is decoded at that size.
So the tuned score is the challenge metric on the validation fold, the number ``cascade predict`` followed by
``cascade evaluate`` gives on those images; ``area`` and ``min_component`` stay pixels at 1024² (rescaled per
image by :func:`cascade.thresholds.rule.area_scale`), as inference applies them.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cascade.data.index import scan_dicoms
from cascade.data.labels import Labels, read_labels
from cascade.data.splits import Split, read_split_csv, split_fingerprint
from cascade.data.synth_spec import is_synthetic
from cascade.errors import CascadeError, ConfigError, LabelError, ModelError
from cascade.inference.pipeline import ImageProbabilities, check_batch_size, native_map, predict_probabilities
from cascade.inference.quantize import int8_members
from cascade.inference.runtime import Runtime
from cascade.stages.checkpoint import CONFIG, WEIGHTS, load_stage, read_config, sha256_file
from cascade.stages.gate import attach_shared_gates
from cascade.stages.specs import SPECS
from cascade.storage.fileio import atomic_write_json, pending
from cascade.storage.modeldir import REPORT_DIR, check_replaceable, write_model_dir
from cascade.storage.rundir import DATA_FILE, SPLIT_FILE, best_stage, read_sources
from cascade.thresholds.metrics import json_float
from cascade.thresholds.report import write_tune_report
from cascade.thresholds.search import DICE_TOLERANCE, Grid, ThresholdSearch, TuneResult

RESOLUTION = "native"
"""What the search scores at (see the module docstring); recorded in ``cascade.json`` and the report."""


@dataclass(frozen=True)
class Run:
    """A training run folder as ``cascade tune`` needs it: its ``best/`` stage, split and recorded data paths."""

    root: Path
    stage: str
    best: Path
    config: dict[str, Any]
    split: Split
    fingerprint: str
    fold: int
    folds: int
    sources: dict[str, str]

    @property
    def validation_ids(self) -> list[str]:
        """ImageIds of the validation fold, sorted."""
        return sorted(i for i, f in self.split.folds.items() if f == self.fold)


@dataclass
class TuneOutcome:
    """What :func:`tune_runs` did: the search result, the written folder and the validation facts."""

    model_dir: Path
    result: TuneResult
    metrics: dict[str, Any]
    failed: list[str] = field(default_factory=list)
    """One line per validation image that could not be read (file + reason); those images were left out."""
    seconds: float = 0.0
    image_ids: list[str] = field(default_factory=list)
    """The ImageIds the search scored, in the order it saw them (fold by fold)."""
    runtime: Runtime | None = None
    """How the networks ran."""

    @property
    def report_dir(self) -> Path:
        return self.model_dir / REPORT_DIR


def read_run(directory: str | os.PathLike[str], stage: str) -> Run:
    """Read and check a run folder written by ``cascade train`` for ``stage`` (``cls`` or ``seg``)."""
    root = Path(directory)
    flag = f"--{stage}"
    if not root.is_dir():
        raise ConfigError(f"{root}: no such run folder (give {flag} a folder written by 'cascade train')")
    best = best_stage(root)
    if not (best / CONFIG).is_file() or not (best / WEIGHTS).is_file():
        raise ModelError(f"{best}: missing or incomplete (needs {CONFIG} and {WEIGHTS}); did a training epoch finish?")
    config = read_config(best)
    found = config.get("stage")
    if found != stage:
        what = SPECS[found].noun if isinstance(found, str) and found in SPECS else f"stage {found!r}"
        raise ModelError(f"{best / CONFIG}: this is a {what} run, but {flag} needs a {SPECS[stage].noun} run")
    for key in ("split_fingerprint", "fold", "folds", "preprocessing"):
        if key not in config:
            raise ModelError(f"{best / CONFIG}: no {key!r} (was it written by 'cascade train'?)")
    if not (root / SPLIT_FILE).is_file():
        raise ModelError(f"{root / SPLIT_FILE}: missing (the run's split is needed to find the validation fold)")
    split = read_split_csv(root / SPLIT_FILE)
    if split_fingerprint(split.folds) != config["split_fingerprint"]:
        raise ModelError(f"{root / SPLIT_FILE}: does not match the split_fingerprint in {best / CONFIG}")
    fold = config["fold"]
    if fold not in split.folds.values():
        raise ModelError(f"{root / SPLIT_FILE}: no image in validation fold {fold}")
    return Run(root, stage, best, config, split, config["split_fingerprint"], fold, config["folds"], _sources(root))


def _sources(root: Path) -> dict[str, str]:
    """What the run's ``data.json`` records (an older run without one: nothing)."""
    return read_sources(root) if (root / DATA_FILE).is_file() else {}


def check_same_split(a: Run, b: Run) -> None:
    """Refuse two runs trained on different splits (split fingerprint or number of folds)."""
    if a.fingerprint != b.fingerprint or a.folds != b.folds:
        raise ConfigError(
            f"{a.root} and {b.root}: the runs were trained on different splits (split fingerprints "
            f"{a.fingerprint[:12]}… and {b.fingerprint[:12]}…, {a.folds} and {b.folds} folds); train all runs with "
            "the same --images, --labels, --folds and --seed"
        )


def check_same_fold(cls_run: Run, seg_run: Run) -> None:
    """Refuse two runs that did not validate on the same images (same split fingerprint and fold)."""
    check_same_split(cls_run, seg_run)
    if cls_run.fold != seg_run.fold:
        raise ConfigError(
            f"{cls_run.root} and {seg_run.root}: the runs validate on different folds ({cls_run.fold} and "
            f"{seg_run.fold}); each stage trained on the other's validation images. Train both with the same --fold"
        )


def pair_folds(cls_runs: Sequence[Run], seg_runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """(classifier, segmenter) per fold, sorted by fold: one run of each stage per fold, all of one split.

    A subset of the split's folds is allowed (each fold at most once); the runs of one stage must share their
    preprocessing, since an ensemble's members read one input.
    """
    if len(cls_runs) == 1 and len(seg_runs) == 1:
        check_same_fold(cls_runs[0], seg_runs[0])
        return [(cls_runs[0], seg_runs[0])]
    first = cls_runs[0]
    for run in [*cls_runs[1:], *seg_runs]:
        check_same_split(first, run)
    by_fold: dict[str, dict[int, Run]] = {}
    for stage, runs in (("cls", cls_runs), ("seg", seg_runs)):
        seen: dict[int, Run] = {}
        for run in runs:
            if run.fold in seen:
                raise ConfigError(
                    f"{seen[run.fold].root} and {run.root}: both --{stage} runs validate on fold {run.fold}; "
                    f"give one {SPECS[stage].noun} run per fold"
                )
            if run.config["preprocessing"] != runs[0].config["preprocessing"]:
                raise ConfigError(
                    f"{runs[0].best / CONFIG} and {run.best / CONFIG}: the {SPECS[stage].noun} runs were trained "
                    f"with different preprocessing ({runs[0].config['preprocessing']} and "
                    f"{run.config['preprocessing']}); an ensemble's members must share one input"
                )
            seen[run.fold] = run
        by_fold[stage] = seen
    for stage, other in (("cls", "seg"), ("seg", "cls")):
        unpaired = sorted(set(by_fold[stage]) - set(by_fold[other]))
        if unpaired:
            fold = unpaired[0]
            raise ConfigError(
                f"{by_fold[stage][fold].root}: no --{other} run validates on fold {fold} (the --{other} runs cover "
                f"folds {', '.join(map(str, sorted(by_fold[other])))}); give one classifier and one segmenter run "
                "per fold"
            )
    return [(by_fold["cls"][f], by_fold["seg"][f]) for f in sorted(by_fold["cls"])]


def _data_paths(cls_run: Run, seg_run: Run, images: str | os.PathLike[str] | None,
                labels: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """The images folder and label file: given ones win, else what the runs recorded in ``data.json``."""
    recorded = seg_run.sources or cls_run.sources
    chosen = {"images": images, "labels": labels}
    for key, value in chosen.items():
        if value is None:
            if key not in recorded:
                raise ConfigError(
                    f"{seg_run.root}: no {DATA_FILE} records the training {key}; pass --images DIR and --labels CSV"
                )
            chosen[key] = recorded[key]
    out = Path(chosen["images"]), Path(chosen["labels"])
    if not out[0].exists():
        raise ConfigError(f"{out[0]}: images folder not found (moved? pass --images DIR)")
    if not out[1].is_file():
        raise ConfigError(f"{out[1]}: label file not found (moved? pass --labels CSV)")
    return out


def validation_images(runs: Sequence[Run], images: Path, labels_path: Path) -> tuple[list[list[Path]], Labels]:
    """The DICOM paths of each run's validation fold (sorted by ImageId) and the labels, checked against the split."""
    labels = read_labels(labels_path)
    index = scan_dicoms(images)
    out = []
    for run in runs:
        ids = run.validation_ids
        missing = [i for i in ids if i not in index.paths]
        if missing:
            raise ConfigError(
                f"{images}: {len(missing)} validation image(s) of {run.root / SPLIT_FILE} not found "
                f"(first: {missing[0]})" + "".join(f"; {line}" for line in index.warnings())
            )
        unlabelled = [i for i in ids if i not in labels]
        if unlabelled:
            raise LabelError(
                f"{labels_path}: {len(unlabelled)} validation image(s) have no labels (first: {unlabelled[0]})"
            )
        changed = [i for i in ids if labels.is_positive(i) != run.split.positive[i]]
        if changed:
            raise LabelError(
                f"{labels_path}: ImageId {changed[0]} is "
                f"{'positive' if labels.is_positive(changed[0]) else 'negative'} here but not in "
                f"{run.root / SPLIT_FILE} ({len(changed)} such image(s)): not the labels the runs used"
            )
        out.append([index.paths[i] for i in ids])
    return out, labels


def _stream(
    predictions: Iterator[ImageProbabilities], labels: Labels, failed: list[str], synthetic: list[bool],
    bar: Any = None,
) -> Iterator[tuple[str, float, np.ndarray, np.ndarray]]:
    """(image_id, cls_prob, native map, native truth) per readable image; unreadable ones go to ``failed``, and
    whether each readable one is a ``cascade synth`` film to ``synthetic``."""
    for probs in predictions:
        if bar is not None:
            bar.update()
        if probs.error is not None:
            failed.append(probs.error)
            continue
        synthetic.append(is_synthetic(probs.header))
        yield probs.image_id, probs.cls_prob, native_map(probs), labels.mask(probs.image_id, probs.height, probs.width)


def training_data(pairs: Sequence[tuple[Run, Run]], labels_path: Path, synthetic: Sequence[bool]) -> dict[str, Any]:
    """What the model learned and was tuned on (``metrics.training_data`` of ``cascade.json``, and the model card).

    ``synthetic`` is true when every validation image the search scored is a ``cascade synth`` film (their
    Manufacturer says so): predicting real radiographs with such a model then warns.
    """
    cls_run, seg_run = pairs[0]
    split = cls_run.split
    validation = {i for cls, _ in pairs for i in cls.validation_ids}
    return {
        "images": len(split.folds),
        "positives": int(sum(split.positive.values())),
        "training_images": len(split.folds) - len(validation) if len(pairs) == 1 else len(split.folds),
        "validation_images": len(validation),
        "image_size": {"classifier": cls_run.config["preprocessing"]["size"],
                       "segmenter": seg_run.config["preprocessing"]["size"]},
        "labels_file": labels_path.name,
        "labels_sha256": sha256_file(labels_path),
        "synthetic": bool(synthetic) and all(synthetic),
        "synthetic_share": float(np.mean(synthetic)) if synthetic else 0.0,
    }


def validation_metrics(
    result: TuneResult, *, pairs: Sequence[tuple[Run, Run]], images_per_fold: Sequence[int], tta: bool, failed: int
) -> dict[str, Any]:
    """The ``metrics`` of ``cascade.json``: the chosen point's scores on the validation images and how they were made.

    A single pair records its ``fold``; a fold ensemble records ``fold: null`` and ``out_of_fold`` (the folds and
    the images scored on each), since its thresholds were tuned on every fold's out-of-fold predictions.
    """
    summary = result.summary.to_dict()
    first = pairs[0][0]
    validation: dict[str, Any] = {
        "images": summary["images"],
        "positives": result.positives,
        "mean_dice": result.score,
        "baseline_empty": result.baseline,
        "dice_positive": summary["dice_positive"],
        "sensitivity": summary["sensitivity"],
        "specificity": summary["specificity"],
        "confusion": summary["confusion"],
        "classifier_auc": json_float(result.classifier_auc),
        "segmented_share": result.segmented_share,
        "min_sensitivity": result.min_sensitivity,
        "max_segmented_share": result.max_segmented_share,
        "dice_tolerance": result.dice_tolerance,
        "best_mean_dice": json_float(result.best_score),
        "skipped_negatives": json_float(result.skipped_negatives),
        "gate_open": result.gate_statement,
        "standard_error": json_float(result.standard_error),
        "warnings": result.warnings(),
        "resolution": RESOLUTION,
        "tta": tta,
        "fold": first.fold if len(pairs) == 1 else None,
        "folds": first.folds,
        "split_fingerprint": first.fingerprint,
        "unreadable_images": failed,
    }
    if len(pairs) > 1:
        validation["out_of_fold"] = {
            "folds": [cls.fold for cls, _ in pairs],
            "images_per_fold": list(images_per_fold),
        }
    return {"validation": validation}


PathArg = str | os.PathLike[str]


def tune_runs(
    cls_runs: PathArg | Sequence[PathArg],
    seg_runs: PathArg | Sequence[PathArg],
    out: PathArg,
    *,
    min_sensitivity: float | None = None,
    max_segmented_share: float | None = None,
    dice_tolerance: float = DICE_TOLERANCE,
    tta: bool = False,
    batch_size: int = 16,
    workers: int | None = None,
    runtime: Runtime | None = None,
    images: PathArg | None = None,
    labels: PathArg | None = None,
    grid: Grid | None = None,
    progress: bool = True,
) -> TuneOutcome:
    """Tune the thresholds of the classifier run(s) gating the segmenter run(s) and write MODEL_DIR ``out``.

    One run per stage tunes on their shared validation fold. Several runs per stage (a fold ensemble) are paired by
    fold (:func:`pair_folds`); each fold's validation images are predicted by its own pair only and all of them
    feed one search; MODEL_DIR gets every run as a member of its stage. ``images`` / ``labels`` override the paths
    the runs recorded in ``data.json``. Every input is checked before the (long) prediction starts; a failure
    leaves ``out`` untouched. Unreadable validation images are left out and listed in ``TuneOutcome.failed`` (and
    in the report); if none is readable, the search raises. The networks run on ``runtime`` (None:
    ``Runtime.resolve()``, all ``auto``, what ``cascade predict`` picks by default too, so thresholds are tuned on
    the probabilities they will be applied to); MODEL_DIR records its precision: inference at another one warns.
    At ``int8`` each member is first quantized, calibrated on the first
    images of its fold (:mod:`cascade.inference.quantize`), the search runs on the int8 probabilities, and MODEL_DIR
    carries the int8 graphs.
    """
    start = time.perf_counter()
    _check_limits(min_sensitivity, max_segmented_share)
    check_batch_size(batch_size)
    target = Path(out)
    check_replaceable(target)
    runtime = runtime or Runtime.resolve()
    pairs = pair_folds([read_run(r, "cls") for r in _as_list(cls_runs)],
                       [read_run(r, "seg") for r in _as_list(seg_runs)])
    images_dir, labels_path = _data_paths(*pairs[0], images, labels)
    fold_paths, truth = validation_images([cls for cls, _ in pairs], images_dir, labels_path)
    folds = _search_folds(pairs, fold_paths, truth, runtime, ThresholdSearch(grid), batch_size=batch_size,
                          workers=workers, tta=tta, progress=progress)
    if len(folds.search) == 0:
        total = sum(len(p) for p in fold_paths)
        raise CascadeError(f"{images_dir}: none of the {total} validation images could be read ({folds.failed[0]})")
    result = folds.search.result(min_sensitivity, max_segmented_share, dice_tolerance=dice_tolerance)
    metrics = validation_metrics(result, pairs=pairs, images_per_fold=folds.per_fold, tta=tta,
                                 failed=len(folds.failed))
    metrics["training_data"] = training_data(pairs, Path(labels_path), folds.synthetic)
    metrics["validation"]["precision"] = runtime.precision
    metrics["validation"]["runtime"] = runtime.as_dict()
    context = {"images_dir": str(images_dir), "labels_file": str(labels_path), "unreadable": folds.failed}
    _write(target, pairs, result, metrics, folds, context, tta=tta, precision=runtime.precision, start=start)
    return TuneOutcome(target, result, metrics, folds.failed, time.perf_counter() - start, folds.searched, runtime)


def _check_limits(min_sensitivity: float | None, max_segmented_share: float | None) -> None:
    """The operating-point limits of ``cascade tune`` are shares: each must lie in [0, 1] when given."""
    if min_sensitivity is not None and not 0.0 <= min_sensitivity <= 1.0:
        raise ConfigError(f"--min-sensitivity must lie in [0, 1], got {min_sensitivity}")
    if max_segmented_share is not None and not 0.0 <= max_segmented_share <= 1.0:
        raise ConfigError(f"--max-segmenter-share must lie in [0, 1], got {max_segmented_share}")


@dataclass
class _Folds:
    """What predicting the validation folds gave: the search fed with every readable image, and the bookkeeping
    the metrics, the report and MODEL_DIR need."""

    search: ThresholdSearch
    failed: list[str] = field(default_factory=list)
    synthetic: list[bool] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)
    per_fold: list[int] = field(default_factory=list)
    int8_graphs: dict[str, list[bytes]] = field(default_factory=lambda: {"classifier": [], "segmenter": []})


def _search_folds(
    pairs: Sequence[tuple[Run, Run]],
    fold_paths: Sequence[Sequence[Path]],
    truth: Labels,
    runtime: Runtime,
    search: ThresholdSearch,
    *,
    batch_size: int,
    workers: int | None,
    tta: bool,
    progress: bool,
) -> _Folds:
    """Predict each fold's validation images with that fold's own pair (quantized first at int8) and stream every
    readable image into ``search``."""
    folds = _Folds(search)
    bar = None
    if progress:
        from cascade.common.progress import progress_bar

        bar = progress_bar(total=sum(len(p) for p in fold_paths),
                           desc="validation fold" if len(pairs) == 1 else "out-of-fold", unit="img")
    for (cls, seg), paths in zip(pairs, fold_paths):
        before = len(search)
        members = ([load_stage(cls.best)], [load_stage(seg.best)])
        attach_shared_gates(*members)
        graphs = None
        if runtime.precision == "int8":
            graphs = (int8_members(members[0], paths, runtime.cache_dir),
                      int8_members(members[1], paths, runtime.cache_dir))
            folds.int8_graphs["classifier"] += graphs[0]
            folds.int8_graphs["segmenter"] += graphs[1]
        predictions = predict_probabilities(
            *members, paths, batch_size=batch_size, workers=workers, tta=tta, runtime=runtime, int8_graphs=graphs,
        )
        for image_id, cls_prob, seg_map, mask in _stream(predictions, truth, folds.failed, folds.synthetic, bar):
            search.add(cls_prob, seg_map, mask)
            folds.searched.append(image_id)
        folds.per_fold.append(len(search) - before)
    if bar is not None:
        bar.close()
    return folds


def _write(
    target: Path,
    pairs: Sequence[tuple[Run, Run]],
    result: TuneResult,
    metrics: dict[str, Any],
    folds: _Folds,
    context: dict[str, Any],
    *,
    tta: bool,
    precision: str,
    start: float,
) -> None:
    """Write MODEL_DIR ``target``: every pair's ``best/`` as members, the thresholds, and ``report/`` (the tune
    report's files and ``validation.json``: the metrics, the runs, ``context`` and the seconds taken)."""
    with tempfile.TemporaryDirectory(prefix="cascade-tune-report-") as tmp, pending(Path(tmp)):
        files = write_tune_report(result, tmp)
        runs: dict[str, Any] = (
            {"cls_run": str(pairs[0][0].root), "seg_run": str(pairs[0][1].root)} if len(pairs) == 1
            else {"runs": [{"fold": c.fold, "cls_run": str(c.root), "seg_run": str(s.root), "images": n}
                           for (c, s), n in zip(pairs, folds.per_fold)]}
        )
        validation = {**metrics["validation"], **runs, **context, "seconds": time.perf_counter() - start}
        atomic_write_json(Path(tmp) / "validation.json", validation)
        write_model_dir(
            target, [c.best for c, _ in pairs], [s.best for _, s in pairs], result.thresholds, metrics=metrics,
            tta=tta, precision=precision, report_files=[*files, Path(tmp) / "validation.json"],
            int8_graphs=folds.int8_graphs if precision == "int8" else None,
        )


def _as_list(runs: PathArg | Sequence[PathArg]) -> list[PathArg]:
    return [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
