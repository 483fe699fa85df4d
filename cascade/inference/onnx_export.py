"""Export a MODEL_DIR's networks to ONNX and check that ONNX Runtime reproduces PyTorch.

Each member of each stage becomes ``<member>.onnx`` (``classifier.onnx``, ``segmenter.onnx``, ``classifier-1.onnx``
…). The graph takes what :func:`cascade.data.preprocess.prepare_image` produces — ``image``: uint8
``[batch, 1, height, width]`` at the stage's input size — and contains the normalisation and the sigmoid, so its
output ``probability`` (``[batch]`` for the classifier, ``[batch, 1, height, width]`` for the segmenter) is what
``Cascade`` thresholds. Batch is dynamic; height and width are dynamic where the network allows (convolutional
ones do; the segmenter needs multiples of 32). ``cascade.json`` is copied beside the files for the thresholds, and
``export.json`` records the inputs, dynamic axes and the measured parity. A folder tuned at int8 (its thresholds
fit the int8 probabilities) also gets each member's int8 graph as ``<member>.int8.onnx`` (same input and output),
listed under ``int8`` in ``export.json``: run those with its thresholds.

The ``onnxruntime`` inference backend (:class:`cascade.Cascade` ``backend="onnxruntime"``) uses the same graphs,
exported on first use by :func:`cached_graph` into a cache folder (``--cache-dir``, else ``$CASCADE_ENGINE_CACHE``,
else ``~/.cache/cascade/engines``; never inside MODEL_DIR) under a digest of the network's configuration, its
weights, the opset and the torch version, so a changed weight file or a new exporter never reuses a stale graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cascade.data.preprocess import Preprocessing, normalize
from cascade.errors import ConfigError, ModelError
from cascade.storage.fileio import atomic_path, atomic_write_json
from cascade.storage.modeldir import MANIFEST, read_model_dir

TOLERANCE = 1e-4
"""Largest absolute difference in probability allowed between ONNX Runtime and PyTorch (float32 on CPU)."""
OPSET = 17
ENGINE_TOLERANCE = 1e-3
"""The same check for the graphs the ``onnxruntime`` backend runs: a 512² U-Net with random weights differs by up
to ~3e-4 in probability (float32 summation order); decisions are what must not move, and ``benchmarks/latency.py``
counts how many do."""


@dataclass(frozen=True)
class ExportedMember:
    """One exported network and how closely ONNX Runtime matched PyTorch on it."""

    member: str
    file: str
    input_size: int
    dynamic_spatial: bool
    max_abs_diff: float


class _WithPreprocessing(nn.Module):
    """uint8 image → normalisation → network → sigmoid, so the ONNX graph is self-contained."""

    def __init__(self, model: nn.Module, prep: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.prep = prep

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(normalize(image, self.prep)))


def export_onnx(
    model_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, tolerance: float = TOLERANCE, seed: int = 0
) -> list[ExportedMember]:
    """Export every member of a MODEL_DIR to ``out`` and check each with ONNX Runtime on random inputs.

    Raises ``ModelError`` when ONNX Runtime differs from PyTorch by more than ``tolerance`` (in probability).
    """
    try:
        import onnxruntime  # noqa: F401  (the optional extra; checked before any work)
    except ImportError:
        raise ConfigError("ONNX export needs onnx and onnxruntime: pip install 'pneumothorax-cascade[onnx]'") from None
    info = read_model_dir(model_dir)
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    results = []
    members = info.load()
    for stage, dirs, loaded in zip(("classifier", "segmenter"), (info.classifiers, info.segmenters), members):
        prep = info.preprocessing[stage]
        for directory, (model, _) in zip(dirs, loaded):
            wrapped = _WithPreprocessing(model, prep).eval()
            path = target / f"{directory.name}.onnx"
            dynamic_spatial = _export(wrapped, path, prep.size)
            checks = [(2, prep.size), (3, prep.size + 32 if dynamic_spatial else prep.size)]
            diff = max(_parity(wrapped, path, rng, batch, size) for batch, size in checks)
            if not diff <= tolerance:
                path.unlink()
                raise ModelError(f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} > {tolerance:.0e}")
            results.append(ExportedMember(directory.name, path.name, prep.size, dynamic_spatial, diff))
    int8 = []
    if info.precision == "int8":
        for stage, dirs in (("classifier", info.classifiers), ("segmenter", info.segmenters)):
            for directory, graph in zip(dirs, info.int8_graphs(stage)):
                with atomic_path(target / f"{directory.name}.int8.onnx") as tmp:
                    tmp.write_bytes(graph)
                int8.append(f"{directory.name}.int8.onnx")
    with atomic_path(target / MANIFEST) as tmp:
        shutil.copyfile(Path(model_dir) / MANIFEST, tmp)
    atomic_write_json(
        target / "export.json",
        {
            "format": "onnx",
            "opset": OPSET,
            "input": "image: uint8 [batch, 1, height, width], the output of prepare_image at input_size",
            "output": "probability: float32, [batch] (classifier) or [batch, 1, height, width] (segmenter)",
            "tolerance": tolerance,
            "members": [asdict(r) for r in results],
            "precision": info.precision,
            "int8": int8,
        },
    )
    return results


def engine_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where exported inference graphs are kept: ``cache_dir``, ``$CASCADE_ENGINE_CACHE`` or ~/.cache/cascade/engines."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CASCADE_ENGINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cascade" / "engines"


def member_digest(model: nn.Module, config: dict) -> str:
    """sha256 of what defines a graph: the member's config, every weight (name, dtype, shape, bytes), opset, torch."""
    digest = hashlib.sha256(json.dumps([config, OPSET, torch.__version__], sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_graph(
    model: nn.Module, config: dict, prep: Preprocessing, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The ONNX graph (uint8 image in, probability out) of one member: from the cache, or exported and checked now.

    A new export is checked against PyTorch like :func:`export_onnx` does and written atomically, so processes
    exporting the same member at once (``torchrun`` ranks) each leave a complete file.
    """
    path = engine_cache_dir(cache_dir) / f"{member_digest(model, config)[:32]}.onnx"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _WithPreprocessing(model, prep).eval()
    with atomic_path(path) as tmp:
        _export(wrapped, tmp, prep.size)
        diff = _parity(wrapped, tmp, np.random.default_rng(0), 2, prep.size)
        if not diff <= ENGINE_TOLERANCE:
            raise ModelError(f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} > {ENGINE_TOLERANCE:.0e}")
    return path


def _export(model: nn.Module, path: Path, size: int) -> bool:
    """Write ``model`` as ONNX with a dynamic batch, and dynamic height/width if that exports; say which."""
    example = torch.zeros(1, 1, size, size, dtype=torch.uint8)
    spatial_out = {2: "height", 3: "width"} if _is_map(model, example) else {}
    for dynamic_spatial in (True, False):
        spatial = {2: "height", 3: "width"} if dynamic_spatial else {}
        axes = {"image": {0: "batch", **spatial}, "probability": {0: "batch", **(spatial_out if spatial else {})}}
        try:
            with atomic_path(path) as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and tracer warnings
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    input_names=["image"],
                    output_names=["probability"],
                    dynamic_axes=axes,
                    opset_version=OPSET,
                )
            return dynamic_spatial
        except Exception as err:  # the exporter fails in many ways on architectures it cannot trace generically
            if not dynamic_spatial:
                raise ModelError(f"{path}: the network cannot be exported to ONNX ({type(err).__name__}: {err})") from None
    raise AssertionError("unreachable")


def _is_map(model: nn.Module, example: torch.Tensor) -> bool:
    with torch.inference_mode():
        return model(example).ndim == 4


def _parity(model: nn.Module, path: Path, rng: np.random.Generator, batch: int, size: int) -> float:
    """Largest absolute difference between ONNX Runtime and PyTorch on a random uint8 batch."""
    import onnxruntime as ort

    image = rng.integers(0, 256, size=(batch, 1, size, size), dtype=np.uint8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["probability"], {"image": image})[0]
    with torch.inference_mode():
        expected = model(torch.from_numpy(image)).numpy()
    if got.shape != expected.shape:
        raise ModelError(f"{path}: ONNX output shape {got.shape} differs from PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())


def describe(results: list[ExportedMember]) -> str:
    """One line per exported network, for the command's output."""
    return "\n".join(
        f"{r.file}: input {r.input_size}px, dynamic batch{' + height/width' if r.dynamic_spatial else ''}, "
        f"max |ONNX - PyTorch| = {r.max_abs_diff:.1e}"
        for r in results
    )

