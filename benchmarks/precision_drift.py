"""How far decisions move when the networks run at another precision or on another engine than fp32 eager PyTorch.

For every image of a synthetic SIIM-like set: does the final decision (positive or not) change, how much does the
classifier probability move, and how does mean Dice against the synthetic truth change. The reference is fp32 eager
PyTorch (what the thresholds of a model folder tuned before precision was recorded were tuned on).

With ``--model-dir`` a real tuned model folder is measured (its thresholds); without one, networks of the shipped
512² architectures with random weights, the gate set to pass 22% of the images and ``bottom`` at the median of the
segmenter's own output on passing images — random networks sit near their thresholds much more than trained ones,
so this is a pessimistic reading. bf16 on a CPU without native bf16 (no AVX512-BF16/AMX) is emulated and very slow:
measure it with fewer images there (``--images``).

Run: ``python benchmarks/precision_drift.py [--images 200] [--model-dir MODEL] [--engines bf16 onnxruntime]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cascade.data.labels import read_labels  # noqa: E402
from cascade.data.synth import generate  # noqa: E402
from cascade.inference.pipeline import Cascade, Prediction  # noqa: E402
from cascade.inference.precision import PrecisionWarning  # noqa: E402
from cascade.inference.quantize import CALIBRATION_IMAGES, int8_members  # noqa: E402
from cascade.inference.runtime import Runtime  # noqa: E402
from cascade.stages.checkpoint import build_model  # noqa: E402
from cascade.stages.config import find_config, read_yaml  # noqa: E402
from cascade.storage.modeldir import read_model_dir  # noqa: E402
from cascade.thresholds.metrics import dice  # noqa: E402
from cascade.thresholds.rule import Thresholds  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_json_argument, write_result  # noqa: E402

PREVALENCE = 0.22
ENGINES = {
    "fp32 eager": {"precision": "fp32", "backend": "torch"},
    "bf16": {"precision": "bf16", "backend": "torch"},
    "fp16": {"precision": "fp16", "backend": "torch"},
    "onnxruntime": {"precision": "fp32", "backend": "onnxruntime"},
    "compile": {"precision": "fp32", "backend": "torch", "compile": True},
    "int8": {"precision": "int8", "backend": "auto"},
}
"""The engines the benchmarks compare: name → ``Runtime.resolve`` requests (``backend`` is its ``engine``)."""


def shipped_members(input_size: int | None = None) -> tuple[tuple, tuple]:
    """(model, config) of the shipped ``cls-resnet34-512`` and ``seg-unet-resnet34-512`` networks, random weights."""
    members = []
    for name in ("cls-resnet34-512", "seg-unet-resnet34-512"):
        config = read_yaml(find_config(name))
        stage = {"stage": config["stage"], "in_chans": 1, **config["network"], "preprocessing": dict(
            config["preprocessing"], **({"size": input_size} if input_size else {}))}
        stage.pop("init_from", None)
        torch.manual_seed(0)
        members.append((build_model(stage).eval(), stage))
    return members[0], members[1]


def load(engine: str, *, model_dir: str | None, members: tuple | None, thresholds: Thresholds | None,
         device: str = "cpu", cache_dir: str | None = None, calibration: Sequence[Path] = ()) -> Cascade:
    """A cascade on ``engine`` (a key of ENGINES): from ``model_dir``, or from in-memory ``members``. ``int8`` of
    networks without int8 graphs quantizes them here, calibrated on ``calibration`` (as ``tune --precision int8``
    does on the validation fold)."""
    asked = dict(ENGINES[engine])
    runtime = Runtime.resolve(device, asked["precision"], asked["backend"], asked.get("compile", False), cache_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)  # the point here is to measure the difference
        if engine == "int8" and not (model_dir and read_model_dir(model_dir).precision == "int8"):
            info = read_model_dir(model_dir) if model_dir else None
            stages = (info.load("classifier"), info.load("segmenter")) if info else ([members[0]], [members[1]])
            graphs = tuple(int8_members(m, calibration, cache_dir) for m in stages)
            return Cascade(*stages, info.thresholds if info else thresholds, int8_graphs=graphs, runtime=runtime)
        if model_dir:
            return Cascade.from_pretrained(model_dir, runtime=runtime)
        cls, seg = members
        return Cascade([cls], [seg], thresholds, runtime=runtime)


def calibrate(model: Cascade, paths: Sequence[Path]) -> Thresholds:
    """Thresholds for random networks: the gate passes 22% of ``paths``, ``bottom`` at the median of their maps."""
    probs = [p.probability for p in model.predict_many(paths, workers=0)]
    cls = float(np.quantile(probs, 1 - PREVALENCE))
    model.thresholds = Thresholds(cls=cls, top=0.0, area=0, bottom=0.0, min_component=0)
    seg = model._stages.segmenter
    passing = [p for p, q in zip(paths, probs) if q >= cls][:4]
    maps = [seg(np.stack([_input(model, p)]), False) for p in passing]
    bottom = float(np.median(np.concatenate([m.ravel() for m in maps])))
    return Thresholds(cls=cls, top=bottom, area=0, bottom=bottom, min_component=0)


def _input(model: Cascade, path: Path) -> np.ndarray:
    from cascade.data.dicom import read_dicom
    from cascade.data.preprocess import prepare_image

    return prepare_image(read_dicom(path).pixels, model._stages.segmenter.prep.size)


def drift(reference: Sequence[Prediction], other: Sequence[Prediction],
          truth: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Share of images whose decision differs, largest probability change, mean Dice of both against ``truth``."""
    assert [p.image_id for p in reference] == [p.image_id for p in other]
    changed = np.mean([a.positive != b.positive for a, b in zip(reference, other)])
    out = {
        "images": len(reference),
        "decisions_changed": float(changed),
        "max_abs_prob_diff": float(max(abs(a.probability - b.probability) for a, b in zip(reference, other))),
        "mask_agreement": float(np.mean([(a.mask == b.mask).mean() for a, b in zip(reference, other)])),
    }
    if truth is not None:
        ref = np.mean([dice(p.mask, truth[p.image_id]) for p in reference])
        oth = np.mean([dice(p.mask, truth[p.image_id]) for p in other])
        out.update(mean_dice_reference=float(ref), mean_dice=float(oth), mean_dice_change=float(oth - ref))
    return out


def describe(name: str, d: dict[str, float]) -> str:
    line = (f"  {name:12s} decisions changed {100 * d['decisions_changed']:5.1f}% of {d['images']} "
            f"(target <= 1%), max |dprob| {d['max_abs_prob_diff']:.1e}, pixels agreeing {d['mask_agreement']:.5f}")
    if "mean_dice_change" in d:
        line += f", mean Dice {d['mean_dice_reference']:.4f} -> {d['mean_dice']:.4f} ({d['mean_dice_change']:+.4f}," \
                " target within 0.002)"
    return line


def calibration_set(folder: Path, image_size: int) -> list[Path]:
    """Synthetic images other than the measured ones (another seed), to calibrate int8 on."""
    found = generate(folder, images=CALIBRATION_IMAGES, positive_fraction=PREVALENCE, size=image_size, seed=1,
                     difficulty="realistic", progress=False)
    return sorted(found.paths.values())


def truth_masks(labels: Path, paths: Sequence[Path]) -> dict[str, np.ndarray]:
    from cascade.data.dicom import read_dicom

    found = read_labels(labels)
    out = {}
    for path in paths:
        image = read_dicom(path)
        out[path.stem] = found.mask(path.stem, image.height, image.width)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=1024, help="side of the synthetic DICOMs")
    parser.add_argument("--input-size", type=int, help="network input size (default: the shipped 512)")
    parser.add_argument("--model-dir", help="a tuned model folder instead of random shipped networks")
    parser.add_argument("--engines", nargs="+", default=["bf16", "onnxruntime", "int8"], choices=sorted(ENGINES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="12 images of 256², 64² input: checks the script runs")
    add_json_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.images, args.image_size, args.input_size = 12, 256, 64

    with tempfile.TemporaryDirectory() as tmp:
        synth = generate(Path(tmp) / "synth", images=args.images, positive_fraction=PREVALENCE,
                         size=args.image_size, seed=0, difficulty="realistic", progress=False)
        paths = sorted(synth.paths.values())
        truth = truth_masks(synth.labels, paths)
        calibration = calibration_set(Path(tmp) / "calibration", args.image_size)
        members = None if args.model_dir else shipped_members(args.input_size)
        reference = load("fp32 eager", model_dir=args.model_dir, members=members, thresholds=None
                         if args.model_dir else Thresholds(cls=0.5, top=0.5, area=0, bottom=0.5, min_component=0))
        thresholds = reference.thresholds if args.model_dir else calibrate(reference, paths)
        reference.thresholds = thresholds
        start = time.perf_counter()
        ref_preds = list(reference.predict_many(paths, batch_size=args.batch_size, workers=0))
        ref_seconds = time.perf_counter() - start
        print(f"{len(paths)} synthetic images, reference fp32 eager in {ref_seconds:.1f} s; "
              f"thresholds {thresholds}")
        figures: dict = {"images": len(paths)}
        baselines: dict = {"fp32 eager s": ref_seconds}
        for engine in args.engines:
            model = load(engine, model_dir=args.model_dir, members=members, thresholds=thresholds,
                         cache_dir=str(Path(tmp) / "engines"), calibration=calibration)
            start = time.perf_counter()
            preds = list(model.predict_many(paths, batch_size=args.batch_size, workers=0))
            seconds = time.perf_counter() - start
            d = drift(ref_preds, preds, truth)
            print(describe(engine, d) + f" ({seconds:.1f} s)")
            figures.update({f"{engine} decisions changed %": 100 * d["decisions_changed"],
                            f"{engine} max |dprob|": d["max_abs_prob_diff"], f"{engine} mean Dice": d["mean_dice"],
                            f"{engine} s": seconds})
            baselines["fp32 eager mean Dice"] = d["mean_dice_reference"]
    write_result("precision_drift", figures, baselines, args)


if __name__ == "__main__":
    main()
