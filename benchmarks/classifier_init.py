"""Classifier from scratch against ``--init-from`` the segmenter, on realistic synthetic radiographs (issue 7).

The recommended order, run end to end on one data set: train the segmenter, train the classifier twice with the
same data, epochs and seed — once from random weights, once from the segmenter's encoder — then tune each pair.
Printed per classifier: validation ROC AUC per epoch and of ``best/``, the tuned thresholds (``cls`` above 0
means the gate is in use), the tuned mean Dice next to the best mean Dice without a classifier (``cls = 0``), and
the share of negative validation images the gate stops before the segmenter runs.

The networks and their settings are the repository's tiny configurations: ``cascade/configs/tiny-seg.yaml`` for the
segmenter (with batches of 16: at its 8 the segmenter collapsed to empty masks on this data) and
``cascade/configs/tiny-cls-from-seg.yaml`` for both classifiers (they differ only in ``network.init_from``); only size,
epochs and data change here.

    python benchmarks/classifier_init.py [--work DIR] [--images 640] [--size 128] [--seg-epochs 18]
                                         [--cls-epochs 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cascade.data.synth import generate  # noqa: E402
from cascade.inference.runtime import Runtime  # noqa: E402
from cascade.stages import config as cfg  # noqa: E402
from cascade.stages import training  # noqa: E402
from cascade.training.tuning import tune_runs  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "cascade" / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_json_argument, write_result  # noqa: E402


def overrides(args: argparse.Namespace, epochs: int, cache: Path) -> dict:
    return {
        "seed": args.seed,
        "preprocessing": {"size": args.size},
        "optim": {"epochs": epochs},
        "data": {"cache_dir": str(cache), "workers": 0},
        "runtime": {"device": "cpu"},
    }


def train(stage: str, config_file: str, args: argparse.Namespace, epochs: int, data: Path, out: Path, **extra) -> float:
    update = overrides(args, epochs, args.work / "cache")
    for section, values in extra.items():
        update.setdefault(section, {}).update(values)
    config = cfg.resolve(stage, CONFIGS / config_file, update)
    start = time.perf_counter()
    training.train(config, data / "dicom-images-train", data / "train-rle.csv", out, progress=False)
    return time.perf_counter() - start


def auc_curve(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(row["val_auc"]) for row in csv.DictReader(f)]


def summarise(name: str, cls_run: Path, seg_run: Path, work: Path, seconds: float) -> dict:
    outcome = tune_runs(cls_run, seg_run, work / f"model-{name}", progress=False, workers=0,
                        runtime=Runtime.resolve("cpu"))
    r = outcome.result
    th = r.thresholds
    negative = ~r.truth_positive
    skipped = float(np.mean(r.cls_probs[negative] < th.cls)) if th.cls > 0 else 0.0
    return {
        "name": name,
        "seconds": seconds,
        "auc_curve": auc_curve(cls_run),
        "auc": r.classifier_auc,
        "thresholds": th,
        "score": r.score,
        "score_without_gate": float(r.scores[0].max()),
        "skipped": skipped,
        "negatives": int(negative.sum()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--images", type=int, default=640, help="synthetic images (3/4 train, 1/4 validation)")
    p.add_argument("--positive-fraction", type=float, default=0.5)
    p.add_argument("--size", type=int, default=128, help="network input size (images are drawn at twice that)")
    p.add_argument("--seg-epochs", type=int, default=18,
                   help="segmenter epochs (its encoder bounds the classifier: "
                        "on seed 0, 12 gave AUC 0.82, 18 gave 0.87)")
    p.add_argument("--cls-epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 shared cores)")
    add_json_argument(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cascade-cls-init-") as tmp:
        args.work = args.work or Path(tmp)
        return run(args)


def run(args: argparse.Namespace) -> int:
    work: Path = args.work
    data = work / "data"
    start = time.perf_counter()
    if not (data / "train-rle.csv").exists():
        generate(data, images=args.images, positive_fraction=args.positive_fraction, size=2 * args.size,
                 seed=args.seed, difficulty="realistic", progress=False)
    print(f"data: {args.images} realistic synthetic images, {args.positive_fraction:.0%} positive, "
          f"drawn at {2 * args.size}px, trained at {args.size}px ({time.perf_counter() - start:.0f}s)", flush=True)

    seg = work / "seg"
    seconds = train("seg", "tiny-seg.yaml", args, args.seg_epochs, data, seg, optim={"batch_size": 16})
    with open(seg / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: float(r["val_mean_dice"]))
    print(f"segmenter: {args.seg_epochs} epochs in {seconds:.0f}s, best epoch {best['epoch']}: val mean Dice "
          f"{float(best['val_mean_dice']):.3f}, Dice on positives {float(best['val_dice_pos']):.3f}", flush=True)

    results = []
    for name, config_file, extra in (
        ("scratch", "tiny-cls-from-seg.yaml", {}),
        ("init-from", "tiny-cls-from-seg.yaml", {"network": {"init_from": str(seg)}}),
    ):
        run_dir = work / f"cls-{name}"
        seconds = train("cls", config_file, args, args.cls_epochs, data, run_dir, **extra)
        results.append(summarise(name, run_dir, seg, work, seconds))
        print(f"classifier {name}: {seconds:.0f}s", flush=True)

    print()
    print(f"{'classifier':<10} {'val AUC':>7} {'tuned cls':>9} {'top':>5} {'area':>6} {'bottom':>6} "
          f"{'mean Dice':>9} {'no gate':>8} {'negatives skipped':>17}")
    for r in results:
        th = r["thresholds"]
        print(f"{r['name']:<10} {r['auc']:7.3f} {th.cls:9.2f} {th.top:5.2f} {th.area:6.0f} {th.bottom:6.2f} "
              f"{r['score']:9.4f} {r['score_without_gate']:8.4f} {r['skipped']:12.1%} of {r['negatives']}")
    print()
    for r in results:
        print(f"val AUC per epoch, {r['name']:<9}: " + " ".join(f"{a:.3f}" for a in r["auc_curve"]))
    print(f"total {time.perf_counter() - start:.0f}s, torch threads {args.threads}", file=sys.stderr)
    figures = {"segmenter Dice on positives": float(best["val_dice_pos"]),
               "segmenter val mean Dice": float(best["val_mean_dice"])}
    for r in results:
        th = r["thresholds"]
        figures.update({f"{r['name']} val AUC": r["auc"], f"{r['name']} tuned cls": th.cls,
                        f"{r['name']} mean Dice": r["score"], f"{r['name']} negatives skipped %": 100 * r["skipped"]})
    figures["total s"] = time.perf_counter() - start
    baselines = {"no gate mean Dice": results[0]["score_without_gate"]}
    write_result("classifier_init", figures, baselines, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
