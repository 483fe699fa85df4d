"""int8 graphs for ONNX Runtime on the CPU: static quantization calibrated on the model's own validation images.

``cascade tune --precision int8`` calls :func:`int8_members` for each stage before it predicts the validation
fold: every member's fp32 graph (:func:`cascade.inference.onnx_export.cached_graph`) is quantized with ONNX Runtime's
static quantizer — weights int8 per output channel, activations uint8 with ranges taken (min/max) from the first
:data:`CALIBRATION_IMAGES` validation images — and the thresholds are then tuned on the int8 probabilities. The
graphs go into MODEL_DIR (``<member>/model.int8.onnx``, hashed like the weights), because the calibration images
are not available where the model is later used; they hold weights and activation ranges only, no image.

Weights use 7 of their 8 bits (ONNX Runtime's ``reduce_range``): a CPU without VNNI (AVX2 only) multiplies uint8 by
int8 in pairs summed into 16 bits, which saturates with full 8-bit weights, so the same graph answered differently
there than on a CPU with VNNI; 7-bit weights cannot saturate, so the probabilities the thresholds were tuned on are
the ones every x86 CPU computes. On this project's AVX2 CPU it also halved the decisions that moved against fp32.

Every convolution is quantized but the output layer: the chain from the last convolution (or fully connected
layer) to the ``probability`` output stays fp32. Quantized, that chain rounded the probability to 256 levels
between the smallest and largest value seen in calibration and clipped it there — a classifier whose calibration
images reached 0.66 answered 0.66 for every clearer image. Keeping the first convolution in fp32 too (it sees the
raw intensities) moved fewer decisions against fp32 but cost a fifth of the speed and did not tune to a better
Dice. What the recipe costs and gains on this project's CPU is measured in docs/speed.md ("int8").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from cascade.data.dicom import read_dicom
from cascade.data.preprocess import Preprocessing, prepare_image
from cascade.errors import CascadeError, ConfigError
from cascade.storage.fileio import atomic_path

if TYPE_CHECKING:
    import onnx

CALIBRATION_IMAGES = 32
"""How many validation images set the activation ranges (the first ones of the fold, in its order)."""
RECIPE = "qdq-u8s7-per-channel-minmax-fp32-head-v2"
"""Names the quantization settings below; part of the cache key, so a changed recipe never reuses a graph, and
stamped into each graph's metadata (:data:`RECIPE_KEY`), so a model folder says which recipe made its graphs."""
RECIPE_KEY = "cascade.int8_recipe"
"""The graph metadata key holding :data:`RECIPE`; graphs of recipe ``v1`` (before 2026-12-02) have none."""


def quantized_graph(
    model: nn.Module,
    config: dict,
    prep: Preprocessing,
    calibration: np.ndarray,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The int8 ONNX graph of one member, calibrated on ``calibration`` (uint8 ``[N, S, S]`` at the stage's size).

    Cached beside the fp32 graphs under a digest of the fp32 graph's key, the calibration images, the recipe and
    the ONNX Runtime version; written atomically.
    """
    try:
        import onnxruntime
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ConfigError(
            "precision int8 needs onnx and onnxruntime: pip install 'pneumothorax-cascade[onnx]'"
        ) from None
    from cascade.inference.onnx_export import cached_graph

    if calibration.dtype != np.uint8 or calibration.ndim != 3 or len(calibration) == 0:
        raise ValueError(f"calibration images must be uint8 [N, S, S], N > 0; got {calibration.dtype} "
                         f"{calibration.shape}")
    fp32 = cached_graph(model, config, prep, cache_dir).absolute()  # absolute: the quantizer runs in a scratch folder
    key = hashlib.sha256(f"{fp32.stem}:{RECIPE}:{onnxruntime.__version__}".encode())
    key.update(np.ascontiguousarray(calibration).tobytes())
    path = fp32.parent / f"{key.hexdigest()[:32]}.int8.onnx"
    if path.is_file():
        return path

    class _Images(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter({"image": image[None, None]} for image in calibration)

        def get_next(self) -> dict | None:
            return next(self._items, None)

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a warning per integer shape tensor it skips
    try:
        with (
            tempfile.TemporaryDirectory(prefix="cascade-int8-") as tmp,
            atomic_path(path) as out,
            _working_directory(tmp),
        ):
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(out), _Images(),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=True, reduce_range=True, nodes_to_exclude=_stamp_recipe(prepared),
            )
    finally:
        logging.getLogger().setLevel(quiet)
    return path


@contextlib.contextmanager
def _working_directory(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Run ONNX Runtime's quantization tools inside ``folder`` (the call's temporary folder), then return.

    Some of them write scratch files into the current directory, whatever paths they are given: symbolic shape
    inference (``quant_pre_process`` without ``skip_symbolic_shape``), when it cannot infer every shape, saves
    ``sym_shape_infer_temp.onnx`` with its weights as ``<uuid>.data`` beside it before raising — four such files were
    once committed at the repository root. Inside the temporary folder they go when it does. Every path handed to
    the tools is absolute. The working directory is the process's, so nothing else may rely on it meanwhile:
    ``tune`` quantizes between its prediction passes, while no loader or service runs.
    """
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _stamp_recipe(prepared: Path) -> list[str]:
    """Write :data:`RECIPE` into the metadata of the graph about to be quantized (the quantizer keeps it, and
    :func:`stale_recipe` reads it back at load); return its :func:`output_head`, read from the same load."""
    import onnx

    model = onnx.load(str(prepared))
    onnx.helper.set_model_props(model, {RECIPE_KEY: RECIPE})
    onnx.save(model, str(prepared))
    return output_head(model)


def stale_recipe(session: object) -> bool:
    """Whether an ONNX Runtime session runs an int8 graph of recipe ``v1``, which quantized the output layer: its
    probabilities are rounded to 256 levels and clipped at the calibration images' maximum."""
    return RECIPE_KEY not in session.get_modelmeta().custom_metadata_map  # type: ignore[attr-defined]


def output_head(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes from the graph's ``probability`` output back to the last Conv/Gemm/MatMul, inclusive:
    what stays fp32, so the probability is neither rounded to 256 levels nor clipped at the calibration range."""
    producers = {output: node for node in model.graph.node for output in node.output}
    names, tensor = [], "probability"
    while tensor in producers:
        node = producers[tensor]
        names.append(node.name)
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            return names
        tensor = node.input[0]
    raise CascadeError("no Conv, Gemm or MatMul leads to the network's probability output; cannot quantize it")


def calibration_images(
    sources: Sequence[str | os.PathLike[str]], size: int, count: int = CALIBRATION_IMAGES
) -> np.ndarray:
    """The first ``count`` readable images of ``sources``, prepared at ``size`` exactly as inference prepares them
    (uint8 ``[N, size, size]``); unreadable files are passed over (tune reports them)."""
    images = []
    for source in sources:
        try:
            pixels = read_dicom(source).pixels
        except Exception:  # noqa: BLE001  (tune's own pass over the fold names each unreadable file)
            continue
        images.append(prepare_image(pixels, size))
        if len(images) == count:
            break
    if not images:
        raise CascadeError(f"none of the {len(sources)} images could be read to calibrate int8 on")
    return np.stack(images)


def int8_members(
    members: Sequence[tuple[nn.Module, dict]],
    sources: Sequence[str | os.PathLike[str]],
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[bytes]:
    """The int8 graph of each member of one stage, calibrated on the first readable ``sources``."""
    prep = Preprocessing.from_dict(members[0][1]["preprocessing"])
    images = calibration_images(sources, prep.size)
    return [quantized_graph(model, config, prep, images, cache_dir).read_bytes() for model, config in members]
