"""Inference speed, side by side in one run: engines and precisions, the gate, decoding, and sharded prediction.

Same run, same networks (the shipped 512² architectures ``cls-resnet34-512`` + ``seg-unet-resnet34-512`` with
random weights: speed does not depend on the weights), same inputs:

1. ``Cascade.predict`` latency (median / p95) on a gated-out and a segmented real SIIM image (``../shared/data``;
   synthetic ones when it is absent) for each engine: fp32 eager PyTorch (the baseline), bf16 eager, ONNX Runtime
   fp32, ONNX Runtime int8 (calibrated on 32 other synthetic images, as ``tune --precision int8`` calibrates on
   the validation fold), ``torch.compile`` (``--compile``), and the ratio to fp32 eager (issue target: >= 2.5x). The line ``auto``
   says which engine ``precision="auto", backend="auto"`` picks here — compare it with the fastest exact one.
2. exactness of each engine against fp32 eager on the synthetic set (``benchmarks/precision_drift.py``): share of
   images whose decision changes (target <= 1%) and the change of mean Dice (target within 0.002);
3. ``predict_many`` throughput at 22% prevalence on the auto engine: the gate against ``gate=False`` (segmenter on
   every image), with the bound (c + s) / (c + 0.22 s) from the measured per-image classifier and segmenter costs;
   3b. the same for a shared-encoder gate (a head on the segmenter's encoder, the default since issue 24) on eager
   torch, where the encoder runs once per image and the decoder only on the 22% it passes;
4. decoding and preprocessing: ``read_dicom`` + ``prepare_image`` of a real 1024² SIIM file and of the 15-bit JPEG
   2000 CR, as a share of a ``Cascade.predict`` call;
5. sharded ``cascade predict``: 2 processes (``torchrun --nproc_per_node 2``) against 1 on the same folder, the
   CSVs compared byte for byte, and the speed-up.

The gate threshold passes 22% of the synthetic images (as a classifier passing exactly the positives would).
Run: ``python benchmarks/latency.py [--images 200] [--compile]``; ``--quick`` checks the script at a tiny size.
On a CPU without native bf16 (no AVX512-BF16/AMX) bf16 is emulated and many times slower than fp32: its exactness
is measured on the first ``--bf16-images`` images only there.

Earlier figures (2-core CPU shared with other jobs, resnet18 + U-Net ResNet34 at 512², 60 images): gate 2.1-2.4x
the throughput of segmenting everything; ``Cascade.predict`` 0.2-0.7 s negative, 2.4 s positive; a real SIIM DICOM
decodes in 9 ms; channels_last beat contiguous (kept on CPU and CUDA); inference_mode vs no_grad was noise.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from precision_drift import (  # noqa: E402
    PREVALENCE,
    calibrate,
    calibration_set,
    describe,
    drift,
    load,
    shipped_members,
    truth_masks,
)

from cascade.common.devices import cpu_supports_bf16  # noqa: E402
from cascade.data.dicom import read_dicom  # noqa: E402
from cascade.data.preprocess import Preprocessing, normalize, prepare_image  # noqa: E402
from cascade.data.synth import generate  # noqa: E402
from cascade.inference.pipeline import Cascade  # noqa: E402
from cascade.inference.runtime import Runtime  # noqa: E402
from cascade.thresholds.rule import Thresholds  # noqa: E402
from results import add_json_argument, write_result  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIGURES: dict = {}
BASELINES: dict = {}
"""What the sections measured, for the JSON result (the baseline is fp32 eager, or segmenting every image)."""


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls (after one warm-up call), in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:8.1f}  p95 {np.percentile(values, 95) * 1000:8.1f} ms"


def real_images(data: Path, fallback: list[Path]) -> tuple[list[Path], list[Path]]:
    """Real SIIM sample DICOMs (else synthetic ones) and the real 15-bit JPEG 2000 CR (if present)."""
    siim = sorted((data / "siim" / "sample-images").glob("*.dcm"))
    cr = [p for p in [data / "dicom" / "cr-chest-monochrome1-j2k-lossless.dcm"] if p.is_file()]
    return (siim or fallback), cr


def latency_table(engines: dict[str, Cascade], images: list[Path], repeats: int) -> None:
    """Section 1: Cascade.predict on the image with the lowest and the highest fp32 probability, per engine."""
    base = engines["fp32 eager"]
    probs = {p: base.predict(p).probability for p in images}
    negative, positive = min(probs, key=probs.get), max(probs, key=probs.get)
    cls = (probs[negative] + probs[positive]) / 2
    print(f"\n1. Cascade.predict latency over {repeats} calls, real images (gate cls={cls:.4f} between them):")
    baseline: dict[str, float] = {}
    for name, model in engines.items():
        model.thresholds = Thresholds(cls=cls, top=0.5, area=0, bottom=0.5, min_component=0)
        for label, path in (("gated out", negative), ("segmented", positive)):
            times = timed(lambda m=model, p=path: m.predict(p), repeats)
            median = statistics.median(times)
            baseline.setdefault(label, median)
            print(f"  {name:12s} {label:9s} {ms(times)}  {baseline[label] / median:5.2f}x fp32 eager")
            where = BASELINES if name == "fp32 eager" else FIGURES
            where[f"{name} {label} median ms"] = median * 1000
            where[f"{name} {label} p95 ms"] = float(np.percentile(times, 95)) * 1000
            if name != "fp32 eager":
                FIGURES[f"{name} {label} x fp32 eager"] = baseline[label] / median


def decisions(engines: dict[str, Cascade], paths: list[Path], labels: Path, batch: int, bf16_images: int) -> None:
    """Section 2: each engine's decisions against fp32 eager on the synthetic set."""
    truth = truth_masks(labels, paths)
    reference = list(engines["fp32 eager"].predict_many(paths, batch_size=batch, workers=0))
    print(f"\n2. decisions against fp32 eager on {len(paths)} synthetic images:")
    for name, model in engines.items():
        if name == "fp32 eager":
            continue
        n = bf16_images if model.precision == "bf16" and not cpu_supports_bf16() and model.device.type == "cpu" \
            else len(paths)
        preds = list(model.predict_many(paths[:n], batch_size=batch, workers=0))
        d = drift(reference[:n], preds, truth)
        print(describe(name, d))
        FIGURES[f"{name} decisions changed %"] = 100 * d["decisions_changed"]
        FIGURES[f"{name} decisions compared"] = d["images"]
        FIGURES[f"{name} mean Dice change"] = d["mean_dice_change"]


def throughput(model: Cascade, paths: list[Path], batch: int, workers: int, gate: bool) -> tuple[float, list]:
    """Images/s of ``predict_many`` over ``paths`` with the gate on or open, and the predictions."""
    start = time.perf_counter()
    preds = list(model.predict_many(paths, batch_size=batch, workers=workers, gate=gate))
    return len(paths) / (time.perf_counter() - start), preds


def gate_throughput(model: Cascade, paths: list[Path], batch: int, workers: int) -> None:
    """Section 3: gate vs segmenting everything, with the bound from the per-image stage costs."""
    gated, a = throughput(model, paths, batch, workers, True)
    opened, b = throughput(model, paths, batch, workers, False)
    same = all(x.probability == y.probability and np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    engine = model._stages
    x = np.zeros((batch, engine.classifier.prep.size, engine.classifier.prep.size), np.uint8)
    c = statistics.median(timed(lambda: engine.classifier(x, model.tta), 2)) / batch
    s = statistics.median(timed(lambda: engine.segmenter(x, model.tta), 2)) / batch
    share = np.mean([p.probability >= model.thresholds.cls for p in a])
    print(f"\n3. predict_many ({model.precision} on {model.backend}, batch {batch}, {workers} loader worker(s)): gate "
          f"{gated:.2f} images/s, segment everything {opened:.2f} images/s, ratio {gated / opened:.2f}x (target "
          f">= 3x); bound (c+s)/(c+{share:.2f}s) = {(c + s) / (c + share * s):.2f}x with c {c * 1000:.0f} ms, "
          f"s {s * 1000:.0f} ms per image; identical answers: {same}")
    FIGURES.update({"gate images/s": gated, "gate x segment everything": gated / opened,
                    "gate bound x": (c + s) / (c + share * s), "classifier ms per image": c * 1000,
                    "segmenter ms per image": s * 1000, "gate identical answers": bool(same)})
    BASELINES["segment everything images/s"] = opened


def shared_gate_throughput(seg: tuple, paths: list[Path], batch: int, workers: int) -> None:
    """Section 3b: a shared-encoder gate (a head on the segmenter's own encoder, docs/gate.md) on eager torch, where
    the encoder runs once per image, against its gate open (section 3 gives the separate classifier's figures)."""
    from cascade.stages.gate import SharedEncoderGate, encoder_sha256
    from cascade.stages.trainer import network_config

    network, config = seg
    torch.manual_seed(0)
    gate = SharedEncoderGate(network, sha256=encoder_sha256(network.encoder)).eval()
    gate.attach(network)
    prep = Preprocessing.from_dict(config["preprocessing"])
    with torch.inference_mode():  # a random head's logits saturate: scale them to unit spread over these images
        x = normalize(torch.from_numpy(np.stack([prepare_image(read_dicom(p).pixels, prep.size) for p in paths[:16]])
                                       )[:, None], prep)
        logits = gate(x.float())
        last = gate.head.mix[-1]
        last.weight.div_(logits.std() + 1e-6)
        last.bias.sub_(logits.mean()).div_(logits.std() + 1e-6)
    shared = {"arch": config["arch"], "encoder": config["encoder"], "sha256": gate.sha256}
    gate_config = {**network_config({"stage": "cls", "network": {"gate": "shared", "shared_encoder": shared}}),
                   "preprocessing": config["preprocessing"]}
    runtime = Runtime.resolve("cpu", engine="torch")
    model = Cascade([(gate, gate_config)], [seg], Thresholds(cls=0.5, top=0.5, area=0, bottom=0.5, min_component=0),
                    runtime=runtime)
    model.thresholds = calibrate(model, paths)  # the head is random: its threshold passes 22% of the images
    gated, a = throughput(model, paths, batch, workers, True)
    opened, b = throughput(model, paths, batch, workers, False)
    share = np.mean([p.probability >= model.thresholds.cls for p in a])
    passed = [(x.mask, y.mask) for x, y in zip(a, b) if x.probability >= model.thresholds.cls]
    agree = float(np.mean([np.mean(x == y) for x, y in passed])) if passed else math.nan
    print(f"3b. shared-encoder gate ({runtime.precision} on torch, encoder once per image, passes {share:.0%}): "
          f"{gated:.2f} images/s, gate open {opened:.2f} images/s, ratio {gated / opened:.2f}x; the passed images' "
          f"mask pixels agreeing with gate-open {agree:.5f} (the decoder's batches differ: bf16 rounding)")
    FIGURES.update({"shared gate images/s": gated, "shared gate x segment everything": gated / opened,
                    "shared gate passed share": float(share), "shared gate mask pixels agreeing": agree})
    BASELINES["shared gate: segment everything images/s"] = opened


def decoding(model: Cascade, files: list[Path], repeats: int) -> None:
    """Section 4: decode + preprocess of real files, as a share of Cascade.predict."""
    size = model._stages.classifier.prep.size
    print(f"\n4. decoding + preprocessing ({model.precision} on {model.backend}):")
    for path in files:
        decode = timed(lambda p=path: read_dicom(p), repeats)
        pixels = read_dicom(path).pixels
        prep = timed(lambda x=pixels: prepare_image(x, size), repeats)
        total = timed(lambda p=path: model.predict(p), repeats)
        d, p, t = (statistics.median(v) for v in (decode, prep, total))
        print(f"  {path.name[:48]:48s} {pixels.shape[1]}x{pixels.shape[0]}: decode {d * 1000:6.1f} ms, resize to "
              f"{size}² {p * 1000:5.1f} ms = {(d + p) / t:.0%} of predict ({t * 1000:.0f} ms)")
        kind = "15-bit JPEG 2000 CR" if path.name.startswith("cr-") else "SIIM"
        FIGURES[f"decode+resize ms ({kind})"] = (d + p) * 1000
        FIGURES[f"decode+resize % of predict ({kind})"] = 100 * (d + p) / t


def sharded(model: Cascade, folder: Path, tmp: Path, batch: int) -> None:
    """Section 5: ``cascade predict`` in 1 process and in 2 torchrun processes on the same folder."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        print("\n5. sharded predict: torchrun not found, skipped")
        return
    model_dir = model.save_pretrained(tmp / "model")
    cores = os.cpu_count() or 2
    root = str(Path(__file__).resolve().parents[1])
    args = ["-m", "cascade", "predict", str(model_dir), str(folder), "--device", "cpu", "--batch-size", str(batch),
            "--precision", model.precision, "--backend", model.backend, "--cache-dir", str(tmp / "engines")]
    results = {}
    for name, launcher, threads in (("1 process", [sys.executable], cores),
                                    ("2 processes", [torchrun, "--standalone", "--nproc_per_node", "2"],
                                     max(1, cores // 2))):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        out = tmp / f"{name.replace(' ', '-')}.csv"
        start = time.perf_counter()
        proc = subprocess.run([*launcher, *args, "--out", str(out)], env=env, capture_output=True, text=True,
                              timeout=3600)
        results[name] = (time.perf_counter() - start, out.read_bytes() if out.is_file() else b"", proc)
        if proc.returncode != 0:
            print(f"  {name} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    (one, csv1, _), (two, csv2, _) = results["1 process"], results["2 processes"]
    print(f"\n5. sharded cascade predict ({model.precision} on {model.backend}, wall time including start-up): "
          f"1 process {one:.1f} s, 2 processes {two:.1f} s, speed-up {one / two:.2f}x; identical CSV: "
          f"{csv1 == csv2 and bool(csv1)}")
    FIGURES.update({"sharded 2 processes s": two, "sharded speed-up x": one / two,
                    "sharded identical CSV": csv1 == csv2 and bool(csv1)})
    BASELINES["sharded 1 process s"] = one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="synthetic images (22%% positive)")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the synthetic DICOMs")
    parser.add_argument("--input-size", type=int, help="network input size (default: the shipped 512)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="loader processes for predict_many")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bf16-images", type=int, default=24, help="images for bf16 where it is emulated")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--data", type=Path, default=SHARED, help="the real data folder (../shared/data)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every section runs")
    add_json_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.images, args.image_size, args.input_size, args.repeats, args.bf16_images = 12, 256, 64, 2, 4

    cls, seg = shipped_members(args.input_size)
    size = cls[1]["preprocessing"]["size"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_supports_bf16()}; {cls[1]['model']} + "
          f"U-Net {seg[1]['encoder']} at {size}², {args.images} synthetic images of {args.image_size}²")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        synth = generate(tmp / "synth", images=args.images, positive_fraction=PREVALENCE, size=args.image_size,
                         seed=0, difficulty="realistic", progress=False)
        paths = sorted(synth.paths.values())
        names = ["fp32 eager", "bf16", "onnxruntime", "int8"] + (["compile"] if args.compile else [])
        start = Thresholds(cls=0.5, top=0.5, area=0, bottom=0.5, min_component=0)
        calibration = calibration_set(tmp / "calibration", args.image_size)
        engines = {n: load(n, model_dir=None, members=(cls, seg), thresholds=start, cache_dir=str(tmp / "engines"),
                           calibration=calibration) for n in names}
        auto = Cascade([cls], [seg], start, runtime=Runtime.resolve("cpu", cache_dir=tmp / "engines"))
        print(f"auto here = {auto.precision} on {auto.backend} (precision auto on torch -> "
              f"{Runtime.resolve('cpu', engine='torch').precision})")
        siim, cr = real_images(args.data, paths)
        latency_table(engines, siim, args.repeats)

        thresholds = calibrate(engines["fp32 eager"], paths)
        for model in [*engines.values(), auto]:
            model.thresholds = thresholds
        decisions(engines, paths, synth.labels, args.batch_size, args.bf16_images)
        gate_throughput(auto, paths, args.batch_size, args.workers)
        shared_gate_throughput(seg, paths, args.batch_size, args.workers)
        decoding(auto, [*siim[:1], *cr], args.repeats)
        sharded(auto, synth.labels.parent / "dicom-images-train", tmp, args.batch_size)
    FIGURES["auto engine"] = f"{auto.precision} on {auto.backend}"
    write_result("latency", FIGURES, BASELINES, args)


if __name__ == "__main__":
    main()
