"""Training throughput: our loop against a bare PyTorch loop on the same model and batches, and data-wait share.

Prints, per stage: images/s of ``Trainer.train_epoch`` and of a bare loop (forward, loss, backward, AdamW step)
over the same pre-loaded batches with the same network and loss, their ratio (target: our overhead ≤ 10%); then the
share of step time spent waiting for the DataLoader with the preprocessing cache warm on disk and without a cache
(target ≤ 10% with it). Both loops run interleaved ``--repeats`` times in this process and the best pass of each is
kept (the machine may be shared). Synthetic SIIM-layout data is generated into a temporary folder.

    python benchmarks/train_throughput.py                       # CPU, both stages, 128 px
    python benchmarks/train_throughput.py --device cuda --size 512 1024 --compile
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from cascade.data.synth import generate  # noqa: E402
from cascade.stages import config as cfg  # noqa: E402
from cascade.stages import training  # noqa: E402
from cascade.stages.trainer import Runtime, Trainer, build_training_model, make_loader, to_device  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_json_argument, write_result  # noqa: E402


def bare_epoch(model: torch.nn.Module, batches: list, criterion: torch.nn.Module, config: dict[str, Any],
               rt: Runtime) -> float:
    """Seconds for a plain loop over ``batches``: autocast forward, loss, backward, AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["optim"]["lr"])
    model.train()
    sync(rt)
    start = time.perf_counter()
    for x, y in batches:
        x = x.to(rt.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = to_device(y, rt.device)
        with torch.autocast(rt.device.type, dtype=rt.amp or torch.float32, enabled=rt.amp is not None):
            logits = model(x)
        criterion(logits, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(rt)
    return time.perf_counter() - start


def sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def bench_stage(stage: str, size: int, data: Path, args: argparse.Namespace, cache_root: Path,
                figures: dict | None = None, baselines: dict | None = None) -> None:
    """Measure one stage at one size; print it; add its figures (keyed by stage and size) to the dicts given."""
    figures = {} if figures is None else figures
    baselines = {} if baselines is None else baselines
    config = cfg.resolve(stage, Path(__file__).resolve().parents[1] / "cascade" / "configs" / f"tiny-{stage}.yaml", {
        "preprocessing": {"size": size},
        "optim": {"batch_size": args.batch_size, "grad_clip": 0.0},
        "data": {"workers": args.workers, "cache_dir": str(cache_root), "augment": "light"},
        "runtime": {"device": args.device, "amp": args.amp, "compile": args.compile, "ema": 0.0},
        **({"network": {"model": args.cls_model}} if stage == "cls" else {"network": {"encoder": args.seg_encoder}}),
    })
    rt = training.setup_runtime(config)
    run = training.load_run_data(config, data / "dicom-images-train", data / "train-rle.csv")
    cache = training.make_cache(config, data)
    cache.warm(run.train + run.val, workers=2, progress=False)
    train_set, val_set = training.make_datasets(config, run, cache)
    loader = make_loader(train_set, config, rt, None, generator_seed=0)
    batches = [batch for _, batch in zip(range(args.steps), loader)]

    torch.manual_seed(0)  # the network training builds (the classifier with its auxiliary mask head when weighted)
    model = build_training_model(config)
    trainer = Trainer(config, rt, model, run, train_set, val_set, out=cache_root, progress=False)  # never saves
    trainer.set_frozen(False)  # builds trainer.train_model: the network as the step calls it (compiled when asked)
    runner = trainer.train_model
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    bare_epoch(runner, batches[:2], trainer.criterion, config, rt)  # warm-up (and compilation)
    n_images = sum(x.shape[0] for x, _ in batches)
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(n_images / bare_epoch(runner, batches, trainer.criterion, config, rt))
        ours.append(trainer.train_epoch(batches, 0).images_per_s)
    best_bare, best_ours = max(bare), max(ours)
    amp = str(rt.amp).replace("torch.", "") if rt.amp else "fp32"
    label = f"{stage} {config['network']} {size}px batch {args.batch_size} {rt.device.type} {amp}"
    print(f"{label}{' compiled' if args.compile else ''}")
    print(f"  bare loop   {best_bare:8.1f} images/s")
    print(f"  our loop    {best_ours:8.1f} images/s   ratio {best_ours / best_bare:.3f} "
          f"(overhead {100 * (1 - best_ours / best_bare):+.1f}%)")
    key = f"{stage} {size}px"
    figures[f"{key} our loop images/s"] = best_ours
    figures[f"{key} overhead %"] = 100 * (1 - best_ours / best_bare)
    baselines[f"{key} bare loop images/s"] = best_bare
    if rt.device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(rt.device) / 2**30:.2f} GiB")
        figures[f"{key} peak GPU memory GiB"] = torch.cuda.max_memory_allocated(rt.device) / 2**30

    for name, use_cache in (("cache warm", True), ("no cache", False)):
        c = training.make_cache({**config, "data": {**config["data"], "cache": use_cache}}, data)
        ds, _ = training.make_datasets(config, run, c)
        sampler = list(range(min(len(ds), args.steps * args.batch_size)))
        stats = trainer.train_epoch(make_loader(ds, config, rt, sampler, generator_seed=0), 0)
        print(f"  data wait   {100 * stats.data_wait / stats.seconds:5.1f}% of step time ({name}, "
              f"{args.workers} workers, {stats.images_per_s:.1f} images/s)")
        figures[f"{key} data wait % ({name})"] = 100 * stats.data_wait / stats.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--stage", choices=("cls", "seg", "both"), default="both")
    p.add_argument("--size", type=int, nargs="+", default=[128], help="input sizes to measure")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="batches per timed pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cls-model", default="resnet18")
    p.add_argument("--seg-encoder", default="resnet18")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    add_json_argument(p)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = ("cls", "seg") if args.stage == "both" else (args.stage,)
    figures: dict = {}
    baselines: dict = {}
    with tempfile.TemporaryDirectory(prefix="cascade-bench-") as tmp:
        tmp_path = Path(tmp)
        images = max(args.steps * args.batch_size * 2, 32)
        for size in args.size:
            data = tmp_path / f"synth-{size}"
            generate(data, images=images, positive_fraction=0.5, size=1024, seed=0, progress=False)
            for stage in stages:
                bench_stage(stage, size, data, args, tmp_path / "cache", figures, baselines)
    write_result("train_throughput", figures, baselines, args)


if __name__ == "__main__":
    main()
