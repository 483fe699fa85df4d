"""Inference speed: the gate against segmenting everything, per-image latency, and what each CPU setting gives.

Same run, same models, same synthetic folder (SIIM-like 1024² JPEG DICOMs at the challenge's 22% prevalence):

1. throughput of ``Cascade.predict_many`` with the gate against ``gate=False`` (segmenter on every image), and
   their ratio (target ≥ 2x on CPU); the answers must be identical;
2. latency of ``Cascade.predict`` for a gated-out (negative) and a passing (positive) image: median and p95, with
   the share spent decoding the DICOM;
3. the networks alone under each CPU setting: channels_last vs contiguous, ``inference_mode`` vs ``no_grad``, and
   the number of torch threads.

The networks have random weights (speed does not depend on them); the classifier threshold is set to the 78th
percentile of its own probabilities so that 22% of the images pass the gate, as a classifier that passes exactly
the positives would. Run: ``python benchmarks/latency.py [--images 60] [--input-size 512]``.

Measured on the project's 2-core CPU shared with other jobs (load 1.5-5, so absolute times are several times an idle
machine's and vary between runs; read the ratios within one run), resnet18 + U-Net ResNet34 at 512², 60 images,
two runs:

- gate 2.30 / 2.44 images/s vs gate open 0.97 / 1.14 images/s: **2.38x / 2.14x**, identical answers. Before the
  segmenter collected passing images into full batches across classifier batches it ran on the 1-3 passing images
  of each batch of 8, and the ratio was 1.98x. The ratio is bounded by (c + s) / (c + 0.22 s) for classifier and
  segmenter costs c and s: a classifier trained at a smaller input (256-384²) raises it most.
- ``Cascade.predict``: negative median 741 / 233 ms (p95 767 / 275), positive 2426 / 2486 ms (p95 2724 / 2534);
  decoding a synthetic 1024² JPEG DICOM takes 4 ms (≤2%); a real SIIM DICOM decodes in 9 ms, resizes to 512² in 3.
- networks alone, batch 4 at 512², ms per image (two runs): 1 thread: contiguous + no_grad 2055 / 830, contiguous
  + inference_mode 1882 / 846, channels_last + inference_mode 791 / 642; 2 threads: 1259 / 1470, 1331 / 1256,
  1178 / 1025. channels_last is the consistent win (kept on CPU and CUDA); inference_mode vs no_grad is noise; on
  this contended machine 1 thread beat 2, so the library leaves the thread count to the caller
  (``torch.set_num_threads``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cascade.data.dicom import read_dicom  # noqa: E402
from cascade.data.synth import generate  # noqa: E402
from cascade.pipeline import Cascade  # noqa: E402
from cascade.stages.checkpoint import build_model  # noqa: E402
from cascade.thresholds.rule import Thresholds  # noqa: E402

PREVALENCE = 0.22


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls (after one warm-up call), in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def throughput(model: Cascade, paths: list[Path], batch_size: int, workers: int, gate: bool) -> tuple[float, list]:
    start = time.perf_counter()
    preds = list(model.predict_many(paths, batch_size=batch_size, workers=workers, gate=gate))
    return len(paths) / (time.perf_counter() - start), preds


def network_settings(model: Cascade, size: int, batch: int, repeats: int) -> None:
    """Time classifier + segmenter forward passes under each CPU setting."""
    cls, seg = model._engine.classifier.models[0], model._engine.segmenter.models[0]
    x = torch.randn(batch, 1, size, size)
    base_threads = torch.get_num_threads()

    def forward(memory_format: torch.memory_format, mode: Callable) -> float:
        for net in (cls, seg):
            net.to(memory_format=memory_format)
        xi = x.contiguous(memory_format=memory_format)

        def run() -> None:
            with mode():
                cls(xi)
                seg(xi)

        return statistics.median(timed(run, repeats)) / batch * 1000

    settings = [
        ("contiguous     no_grad       ", torch.contiguous_format, torch.no_grad),
        ("contiguous     inference_mode", torch.contiguous_format, torch.inference_mode),
        ("channels_last  inference_mode", torch.channels_last, torch.inference_mode),
    ]
    rows = []
    for threads in sorted({1, base_threads}):
        torch.set_num_threads(threads)
        rows += [(f"threads={threads} {name}", forward(fmt, mode)) for name, fmt, mode in settings]
    torch.set_num_threads(base_threads)
    for net in (cls, seg):
        net.to(memory_format=torch.channels_last)
    print(f"\nnetworks alone (classifier + segmenter forward, batch {batch}, {size}², ms per image, median):")
    for name, ms in rows:
        print(f"  {name}  {ms:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=1024, help="side of the synthetic DICOMs")
    parser.add_argument("--input-size", type=int, default=512, help="network input size of both stages")
    parser.add_argument("--classifier", default="resnet18")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    prep = {"size": args.input_size, "mean": 0.5, "std": 0.25}
    torch.manual_seed(0)
    cls_config = {"stage": "cls", "model": args.classifier, "in_chans": 1, "preprocessing": prep}
    seg_config = {"stage": "seg", "arch": "unet", "encoder": args.encoder, "in_chans": 1, "preprocessing": prep}
    shut = Thresholds(cls=1.0, top=0.5, area=0, bottom=0.5, min_component=0)
    model = Cascade([(build_model(cls_config), cls_config)], [(build_model(seg_config), seg_config)], shut,
                    device="cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; classifier "
          f"{args.classifier}, U-Net {args.encoder}, input {args.input_size}², images {args.image_size}², "
          f"batch {args.batch_size}, {args.workers} loader worker(s)")

    with tempfile.TemporaryDirectory() as tmp:
        synth = generate(Path(tmp) / "synth", images=args.images, positive_fraction=PREVALENCE,
                         size=args.image_size, seed=0, progress=False)
        paths = sorted(synth.paths.values())

        probs = [p.probability for p in model.predict_many(paths, batch_size=args.batch_size, workers=0)]
        cls = float(np.quantile(probs, 1 - PREVALENCE))
        model.thresholds = Thresholds(cls=cls, top=0.5, area=0, bottom=0.5, min_component=0)
        passing = sum(p >= cls for p in probs)
        print(f"gate: cls = {cls:.6f} passes {passing}/{len(paths)} images ({passing / len(paths):.0%})")

        gated, gated_preds = throughput(model, paths, args.batch_size, args.workers, gate=True)
        opened, open_preds = throughput(model, paths, args.batch_size, args.workers, gate=False)
        same = all(
            a.probability == b.probability and np.array_equal(a.mask, b.mask) for a, b in zip(gated_preds, open_preds)
        )
        print(f"\npredict_many: gate {gated:.2f} images/s, gate open {opened:.2f} images/s, "
              f"ratio {gated / opened:.2f}x (target >= 2x); identical answers: {same}")

        negative = next(p for p, q in zip(paths, probs) if q < cls)
        positive = next(p for p, q in zip(paths, probs) if q >= cls)
        decode = timed(lambda: read_dicom(negative), args.repeats)
        print(f"\nCascade.predict latency over {args.repeats} calls (ms): ")
        for name, path in (("negative (gated out)", negative), ("positive (segmented)", positive)):
            total = timed(lambda: model.predict(path), args.repeats)
            share = statistics.median(decode) / statistics.median(total)
            print(f"  {name}: median {statistics.median(total) * 1000:7.1f}  p95 {p95(total) * 1000:7.1f}  "
                  f"decoding {statistics.median(decode) * 1000:.1f} ms = {share:.0%}")

    network_settings(model, args.input_size, min(args.batch_size, 4), max(2, args.repeats // 4))


if __name__ == "__main__":
    main()
