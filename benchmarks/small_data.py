"""Does the default recipe learn on realistic small data, per image seen, beside a plain PyTorch loop?

One line per seed, through the CLI. Training length is measured in **images seen**, so the figures do not depend on
the machine.

For each seed, exactly as the README's workflow runs it (each step a ``python -m cascade`` command, printed):

1. ``cascade synth --difficulty realistic --mask-bank siim-train-rle.csv.gz``: ``--images`` training images and
   ``--test-images`` held-out ones (22% positive, real SIIM lesion shapes);
2. ``cascade train --stage seg``, then per gate variant (``--gates``) ``--stage cls``, with no ``--config``: the
   defaults' recipe (``auto`` learning rate, batch and positive share). The variants: ``shared`` (``--init-from``
   the segmenter and no other flag: the shared-encoder gate), ``separate-init`` (``--gate separate --init-from``: a
   timm classifier whose backbone starts as the encoder) and ``separate-scratch`` (``--gate separate``: random
   weights). Each stage trains ``--epochs E``, E converted from ``--seg-images N`` / ``--cls-images M`` by the epoch
   length the recipe gives: the segmenter's epoch is every training positive plus ``round(P·(1−s)/s)`` negatives at
   positive share ``s`` (the small recipe's 0.8 falling to 0.5), the classifier's every training image
   (:func:`epoch_lengths` computes the run's own split and recipe, as ``cascade train`` will);
3. ``cascade tune`` (best mean Dice on the validation fold), then the held-out set predicted twice — with the tuned
   gate and with the gate open (``cls`` 0, the segmenter on every image) — each timed, the fastest of two runs in
   turn (``speedup``: gate-open seconds ÷ gated seconds, decoding included, at the held-out set's 22% prevalence)
   and scored;
4. the plain baseline (benchmarks/plain_baseline.py): the same U-Net, encoder, random start, images, input size and
   images seen and precision (bf16 autocast where cascade's ``auto`` picks it), trained by a ~100-line PyTorch loop
   and scored with a plain rule (probability 0.5 plus a minimum area chosen on the validation fold: not cascade's
   tuned rule).

**Caching.** Each run is kept under ``--work`` (default ``~/.cache/cascade/bench``; ``--quick``: a temporary
folder) by a hash of what decides it: the synthetic data by its ``synth`` arguments; the segmenter run by its
resolved configuration (the stage defaults included, so changing a default retrains), epochs, a digest of its label
file and the versions of cascade, torch and smp;
the classifier run by the same plus the segmenter's hash; the plain baseline likewise. A second invocation — a gate
variant, another classifier length — reuses every finished run it shares (a run killed half-way is redone);
``--fresh`` ignores the cache (after changing training code, not a default, without a version bump).

Per seed it prints the held-out mean Dice beside the all-empty baseline (the share of negative images), the
gate-open Dice, the validation and held-out classifier AUC, the share of held-out negatives the gate keeps from the
segmenter, the images each stage saw and the machine's training throughput (images/s of each run's wall time,
validation and start-up included: images seen ÷ images/s is the time it took), and the plain baseline's row.
Issue 24's targets (256², 6,400 segmenter images): Dice >= all-empty + 0.05 on every seed, gate AUC >= 0.80, the
gate skipping >= 50% of held-out negatives at <= 0.005 Dice below gate-open, >= 1.5x faster than gate-open.

    python benchmarks/small_data.py --seeds 1 2 3 --image-size 256 --encoder resnet18 --seg-images 6400 \
        --cls-images 4800                                                  # issue 24's benchmark
    python benchmarks/small_data.py --seeds 1 2 3                          # 600 + 200 images; 6,000 + 3,000 seen
    python benchmarks/small_data.py --seeds 1 --seg-images 20000 --cls-images 6000
    python benchmarks/small_data.py --quick                                 # checks the script in about a minute

The figures do not depend on the machine's load; only the images/s do (run on an idle machine to quote them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_baseline  # noqa: E402
from results import add_json_argument, versions, write_result  # noqa: E402

MASK_BANK = REPO.parent / "shared" / "data" / "siim" / "siim-train-rle.csv.gz"
DEFAULT_WORK = Path.home() / ".cache" / "cascade" / "bench"
DONE = "bench.json"
"""Written into a cached run's folder last: a folder without it is an unfinished run, redone."""


def cascade(*argv: str) -> float:
    """Run one ``cascade`` command as a user would (a new process), echoing it; returns its seconds."""
    print(f"$ cascade {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cascade", *argv], check=True)
    return time.perf_counter() - start


def digest(*parts: Any) -> str:
    """A short hash of JSON-able parts: the cache key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached(folder: Path, fresh: bool, make: Any) -> dict[str, Any]:
    """``folder/bench.json`` when a finished run is there (unless ``fresh``); else ``make(folder)`` into a clean
    folder, whose returned record is written as ``bench.json`` last."""
    done = folder / DONE
    if done.is_file() and not fresh:
        print(f"# cached: {folder}", flush=True)
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    record = make(folder)
    done.write_text(json.dumps(record))
    return record


def synthesize(work: Path, seed: int, args: argparse.Namespace) -> tuple[Path, Path]:
    """The training and held-out folders for ``seed`` (cached by the synth arguments)."""
    synth = ["--difficulty", "realistic", "--mask-bank", str(args.mask_bank), "--size", str(args.synth_size),
             "--quiet"]
    key = digest("synth", synth[:-1], args.images, args.test_images, seed, versions().get("cascade"))

    def make(folder: Path) -> dict[str, Any]:
        cascade("synth", str(folder / "train"), "--images", str(args.images), "--seed", str(seed), *synth)
        cascade("synth", str(folder / "test"), "--images", str(args.test_images), "--seed", str(10_000 + seed),
                *synth)
        return {"labels_sha256": file_digest(folder / "train" / "train-rle.csv")}

    folder = work / f"data-{key}"
    cached(folder, args.fresh, make)
    return folder / "train", folder / "test"


def overrides(stage: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """What the ``cascade train`` flags below set in ``stage``'s configuration."""
    network = {"model" if stage == "cls" else "encoder": args.encoder} if args.encoder else {}
    return {"seed": seed, "preprocessing": {"size": args.image_size}, "network": network}


def epoch_lengths(stage: str, data: Path, args: argparse.Namespace, seed: int,
                  images: int) -> tuple[int, list[int], dict[str, Any]]:
    """The number of epochs whose images drawn come nearest ``images``, each epoch's length and the configuration
    the run will train with: its own split (:func:`cascade.stages.training.load_run_data`), recipe
    (``apply_recipe``) and positive-share schedule."""
    from cascade.stages.config import apply_recipe, positive_share, resolve
    from cascade.stages.training import load_run_data

    config = resolve(stage, None, overrides(stage, args, seed))
    run = load_run_data(config, data / "dicom-images-train", data / "train-rle.csv", progress=False)
    config, _ = apply_recipe(config, len(run.train))
    positives = sum(item.positive for item in run.train)
    negatives = len(run.train) - positives

    def lengths(epochs: int) -> list[int]:
        shares = [positive_share({**config, "optim": {**config["optim"], "epochs": epochs}}, e) for e in range(epochs)]
        return [len(run.train) if s is None else positives + min(round(positives * (1 - s) / s), negatives)
                for s in shares]

    best = min(range(1, 1 + max(1, 4 * math.ceil(images / max(1, positives)))),
               key=lambda e: abs(sum(lengths(e)) - images))
    return best, lengths(best), config


def train_stage(stage: str, work: Path, data: Path, seed: int, images: int, args: argparse.Namespace,
                extra: list[str], key_parts: list[Any]) -> tuple[Path, dict[str, Any]]:
    """A cached ``cascade train`` run of ``stage`` seeing about ``images`` images."""
    epochs, lengths, config = epoch_lengths(stage, data, args, seed, images)
    # the configuration it trains with, not only the flags: a changed default or recipe value makes a new run
    key = digest(stage, config, epochs, key_parts, versions())

    def make(folder: Path) -> dict[str, Any]:
        seconds = cascade("train", "--stage", stage, "--images", str(data / "dicom-images-train"), "--labels",
                          str(data / "train-rle.csv"), "--seed", str(seed), "--image-size", str(args.image_size),
                          "--cache-dir", str(work / "preprocessed"), "--quiet", "--epochs", str(epochs),
                          *(["--encoder", args.encoder] if args.encoder else []), *extra, "--out", str(folder / "run"))
        return {"epochs": epochs, "images_seen": sum(lengths), "seconds": seconds, "key": key}

    folder = work / f"{stage}-{key}"
    record = cached(folder, args.fresh, make)
    return folder / "run", record


def plain(work: Path, data: Path, test: Path, seg_run: Path, seed: int, images: int,
          args: argparse.Namespace, labels_sha: str) -> dict[str, Any]:
    """The plain baseline on the segmenter run's folds (cached)."""
    from cascade.data.index import scan_dicoms
    from cascade.data.labels import read_labels
    from cascade.data.splits import read_split_csv
    from cascade.stages.config import resolve

    encoder = args.encoder or resolve("seg")["network"]["encoder"]
    split = read_split_csv(seg_run / "split.csv")
    positives = sum(v for i, v in split.positive.items() if split.folds[i] != 0)
    epochs = max(1, round(images / (2 * positives)))  # its epoch: every positive and as many negatives
    source = Path(plain_baseline.__file__)
    key = digest("plain", encoder, args.image_size, epochs, seed, labels_sha, file_digest(source), versions())

    def make(folder: Path) -> dict[str, Any]:
        print(f"# plain baseline: U-Net {encoder} at {args.image_size}², {epochs} epochs", flush=True)
        index, test_index = scan_dicoms(data / "dicom-images-train"), scan_dicoms(test / "dicom-images-train")
        train_ids = sorted(i for i, f in split.folds.items() if f != 0)
        val_ids = sorted(i for i, f in split.folds.items() if f == 0)
        start = time.perf_counter()
        out = plain_baseline.run(encoder, args.image_size, epochs, seed, [index.paths[i] for i in train_ids],
                                 [index.paths[i] for i in val_ids], sorted(test_index.paths.values()),
                                 read_labels(data / "train-rle.csv"), read_labels(test / "train-rle.csv"))
        return {**out, "seconds": time.perf_counter() - start, "epochs": epochs}

    return cached(work / f"plain-{key}", args.fresh, make)


GATES = {
    "shared": ["--init-from", "{seg}"],
    "separate-init": ["--init-from", "{seg}", "--gate", "separate"],
    "separate-scratch": ["--gate", "separate"],
}
"""The gate variants compared (``--gates``): the shared-encoder gate (what ``--init-from`` makes with no other flag),
a separate timm classifier started from the segmenter's encoder, and one from scratch (random weights)."""


def one_seed(work: Path, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Synthesize, train the segmenter, then per gate variant train the gate, tune and score the held-out set (gated
    and gate-open, each timed); the plain baseline; one row per variant."""
    data, test = synthesize(work, seed, args)
    labels_sha = file_digest(data / "train-rle.csv")
    seg, seg_record = train_stage("seg", work, data, seed, args.seg_images, args, [], [labels_sha])
    nan = {"mean_dice": math.nan, "images_seen": 0, "images_per_second": math.nan}
    run_plain = args.plain_seeds is None or seed in args.plain_seeds
    baseline = plain(work, data, test, seg, seed, args.seg_images, args, labels_sha) if run_plain else nan
    rows = []
    for gate in args.gates:
        extra = [flag.format(seg=seg) for flag in GATES[gate]]
        cls, cls_record = train_stage("cls", work, data, seed, args.cls_images, args, extra,
                                      [labels_sha, seg_record["key"], gate])
        rows.append({"seed": seed, "gate": gate, **score_variant(work, cls, cls_record, seg, test, args),
                     "seg_dice_pos": _best_dice_on_positives(seg),
                     "seg_images": seg_record["images_seen"], "cls_images": cls_record["images_seen"],
                     "seg_images_per_s": seg_record["images_seen"] / seg_record["seconds"],
                     "cls_images_per_s": cls_record["images_seen"] / cls_record["seconds"],
                     "plain_mean_dice": baseline["mean_dice"], "plain_images": baseline["images_seen"],
                     "plain_images_per_s": baseline["images_per_second"]})
    return rows


def score_variant(work: Path, cls: Path, cls_record: dict[str, Any], seg: Path, test: Path,
                  args: argparse.Namespace) -> dict[str, Any]:
    """``cascade tune`` on the validation fold, then the held-out set predicted with the tuned gate and gate-open."""
    from cascade.apps.demo import gate_comparison

    scored = work / f"scored-{cls_record['key']}"
    shutil.rmtree(scored, ignore_errors=True)
    cascade("tune", "--cls", str(cls), "--seg", str(seg), "--out", str(scored / "model"), "--quiet")
    validation = json.loads((scored / "model" / "cascade.json").read_text())["metrics"]["validation"]
    gate = gate_comparison(scored / "model", test / "dicom-images-train", test / "train-rle.csv", args.synth_size,
                           scored / "gate")
    return {
        "mean_dice": gate["gate"]["mean_dice"],
        "baseline": gate["gate"]["baseline_empty"],
        "open_dice": gate["open"]["mean_dice"],
        "val_auc": validation["classifier_auc"],
        "test_auc": gate["gate"]["classifier_auc"],
        "skipped_negatives": gate["gate"]["skipped_negatives"],
        "speedup": gate["gate"]["speedup"],
        "gate_open": validation.get("gate_open") or "",
    }


def _best_dice_on_positives(run: Path) -> float:
    """The best/ segmenter's validation Dice on positive images."""
    from cascade.stages.checkpoint import read_config
    from cascade.storage.rundir import best_stage

    return float(read_config(best_stage(run))["metrics"]["val_dice_pos"])


COLUMNS = ("seed", "gate", "mean_dice", "baseline", "open_dice", "val_auc", "test_auc", "skipped_negatives", "speedup",
           "seg_dice_pos", "seg_images", "cls_images", "seg_images_per_s", "cls_images_per_s")
PLAIN = ("plain_mean_dice", "plain_images", "plain_images_per_s")


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--images", type=int, default=600, help="training images per seed (5 folds, fold 0 validates)")
    parser.add_argument("--test-images", type=int, default=1000,
                        help="held-out images per seed (default 1000: with 200, one positive is worth 0.005 of mean "
                        "Dice, as much as the gate's cost is judged by)")
    parser.add_argument("--synth-size", type=int, default=256, help="side of the synthetic films")
    parser.add_argument("--image-size", type=int, default=128, help="network input size (--image-size)")
    parser.add_argument("--encoder", default=None, help="both stages' encoder (default: the stage defaults)")
    parser.add_argument("--seg-images", type=int, default=6000, metavar="N",
                        help="images the segmenter sees (converted to epochs by the recipe's epoch length)")
    parser.add_argument("--cls-images", type=int, default=3000, metavar="M",
                        help="images the classifier sees (its epoch: every training image)")
    parser.add_argument("--gates", nargs="+", choices=tuple(GATES), default=list(GATES),
                        help="gate variants to train and compare on each seed's segmenter (default: all)")
    parser.add_argument("--plain-seeds", type=int, nargs="*", default=None, metavar="SEED",
                        help="seeds that also train the plain baseline (default: every seed; none: give the flag "
                             "alone)")
    parser.add_argument("--mask-bank", type=Path, default=MASK_BANK, help="SIIM label file for lesion shapes")
    parser.add_argument("--work", type=Path, default=None,
                        help=f"cache of runs, reused across invocations (default {DEFAULT_WORK}; --quick: a temporary "
                             "folder)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs (redo and replace them)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    add_json_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.images, args.test_images, args.synth_size = [1], 60, 20, 64
        args.image_size, args.encoder, args.seg_images, args.cls_images = 64, "resnet18", 48, 24
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"# {len(args.seeds)} seed(s): {args.images} + {args.test_images} realistic images at {args.synth_size}², "
          f"networks at {args.image_size}², about {args.seg_images} segmenter + {args.cls_images} classifier images "
          f"seen per seed, encoder {args.encoder or 'default'}; {os.cpu_count()} cores", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cascade-small-data-") as tmp:
        work = args.work or (Path(tmp) if args.quick else DEFAULT_WORK)
        for seed in args.seeds:
            rows += one_seed(work, seed, args)
            for row in rows[-len(args.gates):]:
                print("  ".join(f"{k} {_cell(row[k])}" for k in COLUMNS), flush=True)
                if row["gate_open"]:
                    print(f"  tune: {row['gate_open']}", flush=True)
            if row["plain_images"]:  # the plain loop ran for this seed (--plain-seeds)
                print(f"  plain baseline: mean_dice {row['plain_mean_dice']:.4f}  images {row['plain_images']}  "
                      f"images_per_s {row['plain_images_per_s']:.2f}", flush=True)
    print("\n| run | " + " | ".join(COLUMNS) + " | Dice − baseline | gate − open |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    for i, row in enumerate(rows):
        print("| cascade | " + " | ".join(_cell(row[c]) for c in COLUMNS) + f" | {row['mean_dice'] - row['baseline']:+.4f} | "
              f"{row['mean_dice'] - row['open_dice']:+.4f} |")
        plain_cells = {"seed": row["seed"], "gate": "–", "mean_dice": row["plain_mean_dice"], "baseline": row["baseline"],
                       "seg_images": row["plain_images"], "seg_images_per_s": row["plain_images_per_s"]}
        if (i + 1 < len(rows) and rows[i + 1]["seed"] == row["seed"]) or not row["plain_images"]:
            continue  # the plain loop once per seed, after its variants, where it ran
        print("| plain loop | " + " | ".join(_cell(plain_cells[c]) if c in plain_cells else "–" for c in COLUMNS)
              + f" | {row['plain_mean_dice'] - row['baseline']:+.4f} | – |")
    figures = {f"seed {row['seed']} {row['gate']} {c}": row[c] for row in rows for c in COLUMNS
               if c not in ("seed", "gate", "baseline", "open_dice")}
    baselines = {f"seed {row['seed']} {row['gate']} {c}": row[c] for row in rows
                 for c in ("baseline", "open_dice", *(PLAIN if row["plain_images"] else ()))}
    write_result("small_data", figures, baselines, args)


if __name__ == "__main__":
    main()
