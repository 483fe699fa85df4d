"""A GPU check ready to run: training, tuning, prediction and a DDP step on one machine, with speed and parity.

On a CUDA device (the full check, sized to finish in under 8 minutes on one modern GPU):

1. trains each stage (the shipped ``seg-unet-resnet34-512`` and ``cls-resnet34-512`` networks) for about
   ``--steps`` optimizer steps per variant through ``cascade.stages.training`` (the code ``cascade train`` runs): at
   512² bf16 autocast + channels_last, fp16 autocast + GradScaler + channels_last, fp32 contiguous and bf16 +
   ``torch.compile``; at 1024² the two autocast variants (4 images per step). It prints training images/s, the share
   of time waiting for data and the peak GPU memory;
2. tunes the thresholds on the 512² bf16 runs (``cascade tune``'s code) and predicts the synthetic set with the
   result at ``auto`` precision (bf16), printing images/s and peak memory;
3. parity: the same images predicted on the GPU (fp32 and bf16) against CPU fp32 eager — the largest classifier
   probability difference and the share of identical decisions;
4. a 2-rank DDP training step with ``torchrun`` (NCCL on two GPUs; with a single GPU, gloo on the CPU, since two
   NCCL ranks cannot share one device).

Without CUDA the same steps run on the CPU at a tiny size (64² tiny networks, a few steps; fp16 training needs CUDA
and is skipped, ``torch.compile`` runs only with ``--compile``): that is the script's test. Exit status 1 when a
check fails. Run: ``python benchmarks/gpu_check.py [--steps 200] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cascade.data.synth import generate  # noqa: E402
from cascade.inference.pipeline import Cascade  # noqa: E402
from cascade.inference.precision import PrecisionWarning  # noqa: E402
from cascade.inference.runtime import Runtime  # noqa: E402
from cascade.stages.config import resolve  # noqa: E402
from cascade.stages.training import train  # noqa: E402
from cascade.training.tuning import tune_runs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_json_argument, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIGURES: dict = {}
BASELINES: dict = {}
"""What the steps measured, for the JSON result (the baseline of parity is CPU fp32 eager)."""


@dataclass(frozen=True)
class Plan:
    """What to run: on CUDA the real sizes, on the CPU the same steps at a tiny size."""

    device: str
    sizes: tuple[int, ...]
    image_size: int
    images: int
    batch_size: int
    configs: dict[str, str]
    variants: dict[int, tuple[str, ...]]
    """Input size → the VARIANTS trained at it."""


VARIANTS = {
    "bf16 channels_last": {"amp": "bf16", "channels_last": True, "compile": False},
    "fp16 GradScaler": {"amp": "fp16", "channels_last": True, "compile": False},
    "fp32 contiguous": {"amp": "none", "channels_last": False, "compile": False},
    "bf16 compile": {"amp": "bf16", "channels_last": True, "compile": True},
}


def make_plan(cuda: bool, compile_on_cpu: bool) -> Plan:
    if cuda:
        return Plan("cuda", (512, 1024), 1024, 400, 16, {"seg": "seg-unet-resnet34-512", "cls": "cls-resnet34-512"},
                    {512: tuple(VARIANTS), 1024: ("bf16 channels_last", "fp16 GradScaler")})
    skipped = {"fp16 GradScaler"} | (set() if compile_on_cpu else {"bf16 compile"})
    return Plan("cpu", (64,), 96, 16, 4, {"seg": "tiny-seg", "cls": "tiny-cls"},
                {64: tuple(k for k in VARIANTS if k not in skipped)})


def peak_memory() -> str:
    if not torch.cuda.is_available():
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def train_stage(plan: Plan, stage: str, size: int, variant: str, steps: int, data: Path, labels: Path,
                out: Path) -> Path:
    """One training run of about ``steps`` steps; prints its speed line; returns the run folder."""
    train_images = plan.images * 3 // 4  # 4 folds: one validates
    batch = plan.batch_size if size <= 512 or plan.device == "cpu" else plan.batch_size // 4
    epochs = max(1, math.ceil(steps * batch / train_images))
    overrides = {
        "preprocessing": {"size": size},
        "optim": {"epochs": epochs, "batch_size": batch, "accumulate": 1},
        "data": {"folds": 4, "fold": 0, "workers": min(8, os.cpu_count() or 1) if plan.device == "cuda" else 0,
                 "cache_dir": str(out.parent / f"cache-{size}")},
        "runtime": {"device": plan.device, "ema": 0.0, **VARIANTS[variant]},
    }
    config = resolve(stage, plan.configs[stage], overrides)
    run = out / f"{stage}-{size}-{variant.replace(' ', '-')}"
    reset_peak()
    start = time.perf_counter()
    row = train(config, data, labels, run, progress=False)
    print(f"  train {stage} {size}² {variant:18s} {epochs} epoch(s) x {math.ceil(train_images / batch)} steps: "
          f"{row['images_per_s']:7.1f} img/s, data wait {row['data_wait']:.0%}, peak {peak_memory()}, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    FIGURES[f"train {stage} {size}px {variant} images/s"] = row["images_per_s"]
    if torch.cuda.is_available():
        FIGURES[f"train {stage} {size}px {variant} peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return run


PARITY_IMAGES = 64
"""Images compared with CPU fp32 eager (the CPU reference is the slow part)."""


def predict_check(plan: Plan, model_dir: Path, paths: list[Path]) -> bool:
    """Predict the set on the device at auto precision; parity of fp32 and auto against CPU fp32 eager."""
    reset_peak()
    auto = Cascade.from_pretrained(model_dir, runtime=Runtime.resolve(plan.device))
    start = time.perf_counter()
    for _ in auto.predict_many(paths, batch_size=plan.batch_size, workers=0):
        pass
    rate = len(paths) / (time.perf_counter() - start)
    print(f"  predict ({auto.precision} on {auto.backend}, {plan.device}): {rate:.1f} img/s, peak {peak_memory()}")
    FIGURES[f"predict {auto.precision} images/s"] = rate
    paths = paths[:PARITY_IMAGES]
    reference = list(Cascade.from_pretrained(model_dir, runtime=Runtime.resolve("cpu", "fp32", "torch"))
                     .predict_many(paths, workers=0))
    ok = True
    for precision in ("fp32", auto.precision) if auto.precision != "fp32" else ("fp32",):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)
            model = Cascade.from_pretrained(model_dir, runtime=Runtime.resolve(plan.device, precision, "torch"))
        got = list(model.predict_many(paths, workers=0))
        diff = max(abs(a.probability - b.probability) for a, b in zip(got, reference))
        same = np.mean([a.positive == b.positive for a, b in zip(got, reference)])
        limit = 1e-3 if precision == "fp32" else 5e-2
        ok &= diff <= limit and same >= 0.9
        print(f"  parity {plan.device} {precision} vs cpu fp32: max |dprob| {diff:.1e} (limit {limit:.0e}), "
              f"identical decisions {same:.1%}")
        FIGURES[f"parity {precision} max |dprob|"] = diff
        FIGURES[f"parity {precision} identical decisions %"] = 100 * float(same)
    return bool(ok)


def ddp_step(plan: Plan, data: Path, labels: Path, out: Path) -> bool:
    """A 2-rank DDP training run of one epoch via torchrun: NCCL on 2 GPUs, else gloo on the CPU."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        print("  ddp: torchrun not found")
        return False
    gpus = torch.cuda.device_count()
    device = "cuda" if gpus >= 2 else "cpu"
    size = "512" if device == "cuda" else "64"
    config = plan.configs["seg"] if device == "cuda" else "tiny-seg"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "cascade", "train", "--stage", "seg",
               "--config", config, "--images", str(data), "--labels", str(labels), "--out", str(out / "ddp"),
               "--epochs", "1", "--image-size", size, "--device", device, "--workers", "0", "--quiet",
               "--cache-dir", str(out / "cache-ddp")]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    ok = proc.returncode == 0 and (out / "ddp" / "best" / "model.safetensors").is_file()
    print(f"  ddp 2 ranks on {device} ({'nccl' if device == 'cuda' else 'gloo'}): "
          f"{'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    FIGURES["ddp 2 ranks"] = f"{'ok' if ok else 'FAILED'} ({'nccl' if device == 'cuda' else 'gloo'} on {device})"
    if not ok:
        print(proc.stderr[-3000:])
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per training run (CUDA)")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--compile", action="store_true", help="on the CPU, also the torch.compile variant")
    add_json_argument(parser)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    plan = make_plan(cuda, args.compile)
    steps = args.steps if cuda else 2
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if cuda else 'cpu (tiny sizes)'}, "
          f"{torch.cuda.device_count()} GPU(s); variants per size {plan.variants}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        synth = generate(out / "synth", images=plan.images, positive_fraction=0.3, size=plan.image_size, seed=0,
                         progress=False)
        data = synth.labels.parent / "dicom-images-train"
        paths = sorted(synth.paths.values())
        failures = []
        runs: dict[tuple[str, int, str], Path] = {}
        print(f"1. training ({time.perf_counter() - start:.0f} s in)", flush=True)
        for size in plan.sizes:
            for stage in ("seg", "cls"):
                for variant in plan.variants[size]:
                    try:
                        runs[stage, size, variant] = train_stage(plan, stage, size, variant, steps, data,
                                                                 synth.labels, out)
                    except Exception as err:  # report every failing variant, then go on with the others
                        failures.append(f"train {stage} {size} {variant}: {type(err).__name__}: {err}")
                        traceback.print_exc()
        cls_run, seg_run = (runs.get((stage, plan.sizes[0], "bf16 channels_last")) for stage in ("cls", "seg"))
        print(f"2. tune and predict ({time.perf_counter() - start:.0f} s in)", flush=True)
        if cls_run and seg_run:
            outcome = tune_runs(cls_run, seg_run, out / "model", runtime=Runtime.resolve(plan.device), progress=False)
            print(f"  tune: mean Dice {outcome.result.score:.4f} on {len(outcome.image_ids)} validation images "
                  f"({outcome.seconds:.0f} s, networks at {outcome.metrics['validation']['precision']})")
            FIGURES["tune mean Dice"] = outcome.result.score
            BASELINES["tune all-empty baseline"] = outcome.result.baseline
            print(f"3. parity ({time.perf_counter() - start:.0f} s in)", flush=True)
            if not predict_check(plan, outcome.model_dir, paths):
                failures.append("parity against CPU fp32")
        else:
            failures.append("tune/predict: the bf16 training runs failed")
        print(f"4. DDP ({time.perf_counter() - start:.0f} s in)", flush=True)
        if not ddp_step(plan, data, synth.labels, out):
            failures.append("2-rank DDP step")
    print(f"{'all checks passed' if not failures else 'FAILED: ' + '; '.join(failures)} "
          f"in {time.perf_counter() - start:.0f} s")
    FIGURES.update({"device": plan.device, "checks": "all passed" if not failures else "FAILED: " + "; ".join(failures),
                    "total s": time.perf_counter() - start})
    write_result("gpu_check", FIGURES, BASELINES, args)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
