"""`cascade demo`: the whole workflow on synthetic data, on a CPU, in minutes.

It runs the same commands a user runs on the real challenge data — ``synth`` (standing in for the SIIM-ACR
download), ``train --stage seg``, ``train --stage cls --init-from`` the segmenter, ``tune``, ``predict`` on a
held-out folder, ``evaluate`` — printing each command as it goes, then writes ``report.md`` with the headline
numbers next to the all-empty baseline, the tuning plots, the confusion matrix and a few overlays. The commands
run through the ``command`` the caller hands in (``cascade demo`` passes the command line's own entry point: this
module does not import the command line), but for ``predict``, which is the library's
:func:`cascade.inference.predicting.predict_files`, as ``cascade predict`` runs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade.errors import CascadeError, ConfigError
from cascade.storage.fileio import atomic_write_text
from cascade.storage.model_card import network_description
from cascade.thresholds.metrics import format_number
from cascade.thresholds.rule import Thresholds

if TYPE_CHECKING:
    from cascade.inference.runtime import Runtime


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo: the default takes about 10 minutes on an idle 2-core CPU; ``quick`` is for tests."""

    train_images: int = 900
    test_images: int = 300
    positive_fraction: float = 0.22
    """Share of positive images in both sets: the SIIM-ACR training set's, so the gate's saving is measured at the
    prevalence a user meets (it falls as prevalence rises: every positive is segmented). 900 training images give
    about 200 positives, what the segmenter needs to learn in the demo's time."""
    synth_size: int = 256
    image_size: int = 128
    difficulty: str = "realistic"
    seg_epochs: int = 24
    cls_epochs: int = 24
    overlays: int = 4
    max_segmenter_share: float | None = 0.7
    """``tune --max-segmenter-share``: the demo asks the gate to keep at least 30% of the images from the segmenter,
    to show what the first stage saves and what it costs (both measured on the held-out set in the report)."""


QUICK = DemoPlan(train_images=80, test_images=30, positive_fraction=0.4, synth_size=64, image_size=64,
                 difficulty="easy", seg_epochs=3, cls_epochs=3, max_segmenter_share=None)


@dataclass
class DemoResult:
    """Where the demo wrote its outputs and the numbers it measured."""

    out: Path
    report: Path
    test: dict[str, Any]
    """``cascade evaluate``'s summary of the held-out predictions (``evaluate.json``)."""
    validation: dict[str, Any]
    """``tune``'s figures on the validation fold (``cascade.json``'s ``metrics.validation``)."""
    seconds: dict[str, float] = field(default_factory=dict)
    gate: dict[str, dict[str, float]] = field(default_factory=dict)
    """:func:`gate_comparison` on the held-out set: ``gate`` (as tuned) and ``open`` (cls 0)."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """The tuned thresholds (``cascade.json``'s ``thresholds``)."""

    @property
    def baseline(self) -> float:
        """Mean Dice of the all-empty prediction on the test set: the share of negative images."""
        return float(self.test["baseline_empty"])


Command = Callable[[list[str]], int]
"""Runs one ``cascade`` command line in-process and returns its exit status (``cascade.cli.main.main``)."""


def _run(step: str, argv: Sequence[str], seconds: dict[str, float], command: Command) -> None:
    """Run one ``cascade`` command in-process, echoing it; a failure stops the demo with that command named."""
    print(f"\n$ cascade {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    status = command(list(argv))
    seconds[step] = time.perf_counter() - start
    if status == 130:  # the step was interrupted: so is the demo
        raise KeyboardInterrupt
    if status != 0:
        raise CascadeError(f"demo step '{step}' failed (exit status {status}): cascade {shlex.join(argv)}")


def run_demo(out: str | Path, plan: DemoPlan = DemoPlan(), *, command: Command, progress: bool = True) -> DemoResult:
    """Run the demo into ``out`` (created; refused if it exists and is not empty), each step but ``predict``
    through ``command``, and return its numbers."""
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root}: already exists and is not empty; choose another --out or remove it")
    quiet = [] if progress else ["--quiet"]
    seconds: dict[str, float] = {}

    def step(name: str, argv: list[str]) -> None:
        _run(name, argv, seconds, command)

    data, test = root / "data", root / "test"
    seg_run, cls_run, model = root / "runs" / "seg", root / "runs" / "cls", root / "model"
    size = str(plan.image_size)
    common = ["--images", str(data), "--labels", str(data / "train-rle.csv"), "--folds", "5", "--fold", "0",
              "--seed", "0", "--image-size", size, "--device", "cpu", "--cache-dir", str(root / "cache")]

    synth_size = str(plan.synth_size)
    share = str(plan.positive_fraction)
    step("synth (train)", ["synth", str(data), "--images", str(plan.train_images), "--size", synth_size,
                           "--positive-fraction", share, "--difficulty", plan.difficulty, "--seed", "1", *quiet])
    step("synth (test)", ["synth", str(test), "--images", str(plan.test_images), "--size", synth_size,
                          "--positive-fraction", share, "--difficulty", plan.difficulty, "--seed", "2", *quiet])
    step("train segmenter", ["train", "--stage", "seg", *common, "--out", str(seg_run),
                             "--config", "demo-seg", "--epochs", str(plan.seg_epochs),
                             *quiet])
    step("train classifier", ["train", "--stage", "cls", *common, "--out", str(cls_run),
                              "--config", "demo-cls", "--epochs", str(plan.cls_epochs),
                              "--init-from", str(seg_run), *quiet])
    speed = [] if plan.max_segmenter_share is None else ["--max-segmenter-share", str(plan.max_segmenter_share)]
    step("tune", ["tune", "--cls", str(cls_run), "--seg", str(seg_run), "--out", str(model), "--device", "cpu",
                  *speed, *quiet])
    _predict(model, test / "dicom-images-train", root, seconds)
    step("evaluate", ["evaluate", str(root / "submission.csv"), "--labels", str(test / "train-rle.csv"),
                      "--size", synth_size, synth_size, "--report", str(root / "evaluation"), *quiet])

    evaluation = json.loads((root / "evaluation" / "evaluate.json").read_text(encoding="utf-8"))
    manifest = json.loads((model / "cascade.json").read_text(encoding="utf-8"))
    print("\n# the gate's effect on the held-out set: predicted again with the gate open (cls 0), both timed")
    gate = gate_comparison(model, test / "dicom-images-train", test / "train-rle.csv", plan.synth_size, root / "gate")
    report = write_report(root, plan, evaluation, manifest, seconds, gate)
    return DemoResult(root, report, evaluation, manifest.get("metrics", {}).get("validation", {}), seconds, gate,
                      manifest["thresholds"])


def _predict(model_dir: Path, images: Path, root: Path, seconds: dict[str, float]) -> None:
    """The ``predict`` step: what ``cascade predict`` runs (:func:`cascade.inference.predicting.predict_files`), echoed
    as that command; a failed image stops the demo, as the command's exit status 2 would."""
    from cascade.inference.pipeline import Cascade
    from cascade.inference.predicting import caught_warnings, collect_inputs, predict_files
    from cascade.inference.runtime import Runtime
    from cascade.outputs.writers import OUTPUTS

    submission, overlays = root / "submission.csv", root / "overlays"
    argv = ["predict", str(model_dir), str(images), "--out", str(submission), "--device", "cpu",
            "--overlays", str(overlays)]
    print(f"\n$ cascade {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    with caught_warnings() as loading:
        model = Cascade.from_pretrained(model_dir, runtime=Runtime.resolve(device="cpu"))
    writers = {"overlays": OUTPUTS["overlays"].writer(overlays)}
    summary = predict_files(model, collect_inputs([images]), writers, submission=submission)
    seconds["predict"] = time.perf_counter() - start
    for line in [*loading, *summary.warnings]:
        print(f"cascade predict: warning: {line}", file=sys.stderr)
    if summary.failures:
        raise CascadeError(f"demo step 'predict' failed: {summary.failures[0]}")
    print(f"{summary.rows} images predicted, {summary.positives} positive, {summary.images_per_second:.1f} "
          f"images/s ({model.runtime.describe()}) → {submission}")


def gate_comparison(
    model_dir: Path, images: Path, labels: Path, size: int, out: Path, runtime: Runtime | None = None,
    repeats: int = 2,
) -> dict[str, dict[str, float]]:
    """Predict ``images`` with the tuned gate and with the gate open (``cls`` 0: the segmenter on every image, the
    other thresholds unchanged), each timed, and score both: what the first stage saves and what it costs
    (``runtime``: the CPU's ``auto`` by default). ``speedup`` is gate-open seconds ÷ each one's seconds.

    The two are predicted in turn ``repeats`` times (gate, open, gate, open, …) and each one's time is its fastest
    run: the first run of a process pays one-off costs (thread pools, kernels chosen per input shape) that would
    otherwise be charged to whichever variant went first."""
    from cascade.data.labels import read_labels
    from cascade.inference.pipeline import Cascade
    from cascade.inference.predicting import PredictSummary, collect_inputs, predict_files
    from cascade.inference.runtime import Runtime
    from cascade.inference.sharding import Shard
    from cascade.thresholds.metrics import roc_auc
    from cascade.training.evaluation import score_submission

    if repeats < 1:
        raise ConfigError(f"gate_comparison: repeats must be at least 1, got {repeats}")
    model = Cascade.from_pretrained(model_dir, runtime=runtime or Runtime.resolve(device="cpu"))
    files = collect_inputs([images])
    truth = read_labels(labels)
    tuned = model.thresholds
    variants = {"gate": tuned, "open": dataclasses.replace(tuned, cls=0.0)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    summaries: dict[str, PredictSummary] = {}
    for repeat in range(repeats):
        for name, thresholds in variants.items():
            model.thresholds = thresholds
            submission = out / f"submission-{name}.csv" if repeat == repeats - 1 else None  # scored: the last run's
            summaries[name] = predict_files(model, files, {}, submission=submission, shard=Shard(), workers=0,
                                            progress=False)
            seconds[name].append(summaries[name].seconds)
    model.thresholds = tuned
    results: dict[str, dict[str, float]] = {}
    for name, thresholds in variants.items():
        scored = score_submission(out / f"submission-{name}.csv", labels, size=(size, size)).summary
        done = [p for p in summaries[name].predictions if p.ok]
        passed = [p.probability >= thresholds.cls for p in done]
        positive = [truth.is_positive(p.image_id) for p in done]
        negatives = [ok for ok, pos in zip(passed, positive) if not pos]
        results[name] = {
            "mean_dice": scored.mean_dice,
            "baseline_empty": scored.baseline_empty,
            "classifier_auc": roc_auc([p.probability for p in done], positive),
            "segmented_share": sum(passed) / len(passed),
            "skipped_negatives": 1 - sum(negatives) / len(negatives) if negatives else float("nan"),
            "seconds": min(seconds[name]),
            "speedup": min(seconds["open"]) / min(seconds[name]) if min(seconds[name]) > 0 else math.nan,
        }
    return results


def _speed(gate: dict[str, dict[str, float]]) -> str:
    """The held-out prediction time with the tuned gate against the gate open, and their ratio, for the report."""
    g = gate["gate"]
    return f"{g['seconds']:.2f} s against {gate['open']['seconds']:.2f} s with the gate open: " \
           f"{format_number(g['speedup'], 2)}× the gate-open speed"


def _pick_overlays(root: Path, count: int) -> list[Path]:
    """A few overlay PNGs (sorted, so the choice is stable) copied next to the report."""
    return sorted((root / "overlays").glob("*.png"))[:count]


def write_report(
    root: Path,
    plan: DemoPlan,
    evaluation: dict[str, Any],
    manifest: dict[str, Any],
    seconds: dict[str, float],
    gate: dict[str, dict[str, float]],
) -> Path:
    """Write ``root/report.md``: headline numbers against the all-empty baseline, plots and overlays."""
    summary = evaluation
    c = summary["confusion"]
    images = summary["images"]
    baseline = summary["baseline_empty"]
    validation = manifest.get("metrics", {}).get("validation", {})
    th = manifest["thresholds"]

    lines = [
        "# cascade demo report",
        "",
        f"Synthetic chest radiographs ({plan.difficulty} lesions, drawn at {plan.synth_size}² px, networks at "
        f"{plan.image_size}² px): "
        f"{plan.train_images} images for training (5 folds, fold 0 validates), {plan.test_images} held-out test "
        f"images never seen in training or tuning, {100 * plan.positive_fraction:.0f}% positive in both. Synthetic "
        "data shows that the tool works end to end; it says nothing about accuracy on real radiographs.",
        "",
        "## Held-out test set",
        "",
        "| metric | cascade | all-empty baseline |",
        "|---|---|---|",
        f"| mean Dice (challenge metric) | **{format_number(summary['mean_dice'])}** | {format_number(baseline)} |",
        f"| Dice on true positives (labelled and predicted positive) | {format_number(summary['dice_positive'])} | – |",
        f"| Dice on all positives (misses as 0) | {format_number(summary['dice_all_positives'])} | 0.0000 |",
        f"| sensitivity (image level) | {format_number(summary['sensitivity'])} | 0.0000 |",
        f"| specificity (image level) | {format_number(summary['specificity'])} | 1.0000 |",
        "",
        f"Confusion matrix on {images} images: tp {c['tp']}, fp {c['fp']}, fn {c['fn']}, tn {c['tn']}. "
        "The all-empty baseline predicts no pneumothorax anywhere; its mean Dice is the share of negative images.",
        "",
        "![test confusion matrix](evaluation/confusion.png)",
        "",
        "## Tuned thresholds (validation fold)",
        "",
        Thresholds.from_dict(th).describe(code=True) + " (`cls` is the classifier gate).",
        "",
        f"The gate: {network_description(json.loads((root / 'model' / 'classifier' / 'config.json').read_text()))}"
        ".",
        "",
        f"Validation mean Dice {format_number(validation.get('mean_dice'))} against the all-empty "
        f"{format_number(validation.get('baseline_empty'))}; "
        f"classifier ROC AUC {format_number(validation.get('classifier_auc'))}; "
        f"the gate sent {100 * validation.get('segmented_share', float('nan')):.0f}% of the validation images "
        "to the segmenter.",
        *(["", f"**{validation['gate_open']}** (`cascade tune`'s gate-open rule: classifier AUC below 0.6, or the "
           "best gate keeping under 5% of the validation negatives from the segmenter)."]
          if validation.get("gate_open") else []),
        "",
        "## What the classifier gate does (held-out test set)",
        "",
        "The same model predicted the test images with the tuned gate and with the gate open (`cls` 0, the "
        "segmenter on every image; the other thresholds unchanged), in turn, twice each; each time below is the "
        "faster of its two runs (a process's first prediction pays one-off costs).",
        "",
        "| | mean Dice | images segmented | negatives kept from the segmenter | predict time |",
        "|---|---|---|---|---|",
        *[
            f"| {label} | {format_number(gate[key]['mean_dice'])} | {100 * gate[key]['segmented_share']:.0f}% | "
            f"{100 * gate[key]['skipped_negatives']:.0f}% | {gate[key]['seconds']:.2f} s |"
            for key, label in (("gate", f"tuned gate (`cls` {th['cls']:g})"), ("open", "gate open"))
        ],
        "",
        f"Classifier ROC AUC on the held-out images {format_number(gate['gate']['classifier_auc'])}. "
        f"Predicting them with the tuned gate took {_speed(gate)}, at a mean Dice difference of "
        f"{gate['gate']['mean_dice'] - gate['open']['mean_dice']:+.4f} against the gate open. On the validation fold, "
        "`model/report/frontier.png` shows the best mean Dice for every gate against the share of images it "
        "segments.",
        "",
        "![the gate's frontier](model/report/frontier.png)",
        "![mean Dice over cls x bottom](model/report/dice_cls_bottom.png)",
        "![mean Dice by threshold](model/report/dice_by_threshold.png)",
        "![ROC](model/report/roc.png)",
        "![operating points](model/report/operating_points.png)",
        "",
        "## Overlays (positive predictions on the test set)",
        "",
        *[f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in _pick_overlays(root, plan.overlays)],
        "",
        "## Time per step",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {step} | {secs:.1f} |" for step, secs in seconds.items()],
        "",
    ]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path

