"""Does the default recipe learn on realistic small data within a CPU budget? One line per seed, through the CLI.

For each seed, exactly as the README's workflow runs it (each step a ``python -m cascade`` command, printed):

1. ``cascade synth --difficulty realistic --mask-bank siim-train-rle.csv.gz``: ``--images`` training images and
   ``--test-images`` held-out ones (22% positive, real SIIM lesion shapes);
2. ``cascade train --stage seg`` then ``--stage cls --init-from`` the segmenter, each with ``--time-budget`` (the
   two budgets sum to ``--budget`` minutes) and no ``--config``: the defaults' recipe (``auto`` learning rate,
   batch and positive share; the classifier's auxiliary mask loss);
3. ``cascade tune`` (best mean Dice on the validation fold), then the held-out set predicted twice — with the tuned
   gate and with the gate open (``cls`` 0, the segmenter on every image) — and scored.

Per seed it prints the held-out mean Dice beside the all-empty baseline (the share of negative images), the
validation and held-out classifier AUC, the share of held-out negatives the gate keeps from the segmenter, the
gate-open Dice and the difference. Issue 10's targets: Dice >= baseline + 0.06 on every seed, AUC >= 0.85, the gate
skipping >= 50% of negatives at <= 0.005 Dice below gate-open.

    python benchmarks/small_data.py --seeds 1 2 3            # 600 + 200 images, 18 min of training per seed
    python benchmarks/small_data.py --seeds 1 --epochs 40 15  # fixed length: the same figures on any machine
    python benchmarks/small_data.py --quick                  # checks the script in about a minute

Run it on an otherwise idle machine: the time budget turns a loaded CPU into fewer epochs, not a slower run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_json_argument, write_result  # noqa: E402

MASK_BANK = REPO.parent / "shared" / "data" / "siim" / "siim-train-rle.csv.gz"


def cascade(*argv: str) -> float:
    """Run one ``cascade`` command as a user would (a new process), echoing it; returns its seconds."""
    print(f"$ cascade {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cascade", *argv], check=True)
    return time.perf_counter() - start


def one_seed(root: Path, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Synthesize, train both stages, tune and score the held-out set for one seed."""
    from cascade.demo import gate_comparison

    data, test, seg, cls, model = (root / name for name in ("data", "test", "seg", "cls", "model"))
    synth = ["--difficulty", "realistic", "--mask-bank", str(args.mask_bank), "--size", str(args.synth_size),
             "--quiet"]
    cascade("synth", str(data), "--images", str(args.images), "--seed", str(seed), *synth)
    cascade("synth", str(test), "--images", str(args.test_images), "--seed", str(10_000 + seed), *synth)
    common = ["--images", str(data), "--labels", str(data / "train-rle.csv"), "--seed", str(seed),
              "--image-size", str(args.image_size), "--cache-dir", str(root / "cache"), "--quiet",
              *(["--encoder", args.encoder] if args.encoder else [])]
    seg_length, cls_length = _lengths(args)
    seconds = cascade("train", "--stage", "seg", *common, "--out", str(seg), *seg_length)
    seconds += cascade("train", "--stage", "cls", *common, "--out", str(cls), "--init-from", str(seg), *cls_length)
    cascade("tune", "--cls", str(cls), "--seg", str(seg), "--out", str(model), "--quiet")
    validation = json.loads((model / "cascade.json").read_text())["metrics"]["validation"]
    gate = gate_comparison(model, test / "dicom-images-train", test / "train-rle.csv", args.synth_size,
                           root / "gate")
    return {
        "seed": seed,
        "mean_dice": gate["gate"]["mean_dice"],
        "baseline": gate["gate"]["baseline_empty"],
        "val_auc": validation["classifier_auc"],
        "test_auc": gate["gate"]["classifier_auc"],
        "skipped_negatives": gate["gate"]["skipped_negatives"],
        "open_dice": gate["open"]["mean_dice"],
        "seg_dice_pos": _best_dice_on_positives(seg),
        "train_minutes": seconds / 60,
    }


def _lengths(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Each stage's training length: ``--epochs`` when given (a measurement a loaded machine cannot change),
    else its share of the ``--budget`` minutes."""
    if args.epochs:
        return ["--epochs", str(args.epochs[0])], ["--epochs", str(args.epochs[1])]
    seg_minutes = args.budget * args.seg_share
    return ["--time-budget", f"{seg_minutes:g}"], ["--time-budget", f"{args.budget - seg_minutes:g}"]


def _best_dice_on_positives(run: Path) -> float:
    """The best/ segmenter's validation Dice on positive images."""
    from cascade.rundir import best_stage
    from cascade.stages.checkpoint import read_config

    return float(read_config(best_stage(run))["metrics"]["val_dice_pos"])


COLUMNS = ("seed", "mean_dice", "baseline", "val_auc", "test_auc", "skipped_negatives", "open_dice", "seg_dice_pos",
           "train_minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--images", type=int, default=600, help="training images per seed (5 folds, fold 0 validates)")
    parser.add_argument("--test-images", type=int, default=200, help="held-out images per seed")
    parser.add_argument("--synth-size", type=int, default=256, help="side of the synthetic films")
    parser.add_argument("--image-size", type=int, default=128, help="network input size (--image-size)")
    parser.add_argument("--encoder", default=None, help="both stages' encoder (default: the stage defaults)")
    parser.add_argument("--budget", type=float, default=18.0, help="training minutes per seed, both stages")
    parser.add_argument("--seg-share", type=float, default=2 / 3, help="share of the budget for the segmenter")
    parser.add_argument("--epochs", type=int, nargs=2, metavar=("SEG", "CLS"),
                        help="train each stage this many epochs instead of --budget minutes (the figures then do not "
                             "depend on the machine or its load; the schedule is the same as a budget that fits them)")
    parser.add_argument("--mask-bank", type=Path, default=MASK_BANK, help="SIIM label file for lesion shapes")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    add_json_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.images, args.test_images, args.synth_size = [1], 60, 20, 64
        args.image_size, args.budget, args.encoder = 64, 0.3, "resnet18"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    length = (f"{args.epochs[0]} segmenter + {args.epochs[1]} classifier epochs per seed" if args.epochs else
              f"{args.budget:g} training minutes per seed ({args.seg_share:.0%} segmenter)")
    print(f"# {len(args.seeds)} seed(s): {args.images} + {args.test_images} realistic images at {args.synth_size}², "
          f"networks at {args.image_size}², {length}, "
          f"encoder {args.encoder or 'default'}; {os.cpu_count()} cores", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cascade-small-data-") as tmp:
        work = args.work or Path(tmp)
        for seed in args.seeds:
            rows.append(one_seed(work / f"seed-{seed}", seed, args))
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
                  flush=True)
    print("\n| " + " | ".join(COLUMNS) + " | Dice − baseline | gate − open |")
    print("|" + "---|" * (len(COLUMNS) + 2))
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        print("| " + " | ".join(cells) + f" | {row['mean_dice'] - row['baseline']:+.4f} | "
              f"{row['mean_dice'] - row['open_dice']:+.4f} |")
    figures = {f"seed {row['seed']} {c}": row[c] for row in rows for c in COLUMNS
               if c not in ("seed", "baseline", "open_dice")}
    baselines = {f"seed {row['seed']} {c}": row[c] for row in rows for c in ("baseline", "open_dice")}
    write_result("small_data", figures, baselines, args)


if __name__ == "__main__":
    main()
