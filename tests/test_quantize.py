"""int8 graphs (cascade.inference.quantize): the probability a quantized network answers is fp32, neither rounded to 256
levels nor clipped at the largest value its calibration images reached; graphs say which recipe made them."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import CLS_CONFIG, OPEN, SEG_CONFIG, tiny_stage

from cascade.data.preprocess import Preprocessing
from cascade.inference.engines.onnxruntime import OnnxRuntimeInt8Engine
from cascade.inference.engines.torch import TorchEngine
from cascade.inference.pipeline import Cascade
from cascade.inference.precision import PrecisionWarning
from cascade.inference.quantize import RECIPE, RECIPE_KEY, quantized_graph
from cascade.inference.runtime import Runtime



@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per stage: a tiny network, 24 textured films from dark to bright, its fp32 answers, and its int8 graph
    calibrated on the 12 films it scores lowest."""
    out = {}
    for config in (CLS_CONFIG, SEG_CONFIG):
        model, config = tiny_stage(config, seed=0)
        if config["stage"] == "cls":
            with torch.no_grad():  # spread the random classifier's answers over most of (0, 1)
                model.backbone.get_classifier().weight.mul_(100)
        prep = Preprocessing.from_dict(config["preprocessing"])
        rng = np.random.default_rng(0)
        levels = np.linspace(20, 235, 24)[:, None, None]
        images = np.clip(levels + rng.normal(0, 25, (24, prep.size, prep.size)), 0, 255).astype(np.uint8)
        fp32 = TorchEngine([(model, config)], prep, Runtime.resolve("cpu", "fp32", "torch"))(images, False)
        score = fp32.reshape(len(images), -1).max(axis=1)  # the probability, or a map's largest one
        low = np.argsort(score)[:12]
        graph = quantized_graph(model, config, prep, images[low], tmp_path_factory.mktemp("engines"))
        out[config["stage"]] = {"member": (model, config), "prep": prep, "images": images, "fp32": fp32,
                                "score": score, "low": low, "high": np.argsort(score)[12:], "graph": graph.read_bytes()}
    return out


@pytest.mark.parametrize("stage", ["cls", "seg"])
def test_int8_probabilities_reach_past_the_calibration_range(quantized: dict, stage: str) -> None:
    """The int8 graph scores the films it was not calibrated on higher than any calibration film — a quantized
    output layer clipped them all to the calibration maximum — and a segmenter's map keeps more than 256 distinct
    probabilities."""
    q = quantized[stage]
    int8 = OnnxRuntimeInt8Engine([q["member"]], q["prep"], Runtime.resolve("cpu", "int8"), [q["graph"]])(q["images"], False)
    int8_score = int8.reshape(len(int8), -1).max(axis=1)
    assert int8_score[q["high"]].max() > q["score"][q["low"]].max() + 0.005, "clipped at the calibration maximum"
    assert np.abs(int8 - q["fp32"]).max() < 0.1
    if stage == "seg":
        assert len(np.unique(int8)) > 256, "the segmenter's probabilities were rounded to 8 bits"


def test_graphs_of_the_first_recipe_are_named_at_load(quantized: dict) -> None:
    """Each graph carries its recipe; a folder whose graphs lack it (recipe v1, which clipped probabilities) loads
    with one PrecisionWarning saying to tune again."""
    graphs = ([quantized["cls"]["graph"]], [quantized["seg"]["graph"]])
    members = ([quantized["cls"]["member"]], [quantized["seg"]["member"]])
    stamped = {p.key: p.value for p in onnx.load_from_string(graphs[1][0]).metadata_props}
    assert stamped[RECIPE_KEY] == RECIPE
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        Cascade(*members, OPEN, runtime=Runtime.resolve("cpu", "int8"), int8_graphs=graphs)

    old = onnx.load_from_string(graphs[1][0])
    del old.metadata_props[:]
    with pytest.warns(PrecisionWarning, match="first int8 recipe .* clipped at the calibration images' maximum.*"
                      "cascade tune --precision int8") as caught:
        Cascade(*members, OPEN, runtime=Runtime.resolve("cpu", "int8"),
                int8_graphs=(graphs[0], [old.SerializeToString()]))
    assert len([w for w in caught if issubclass(w.category, PrecisionWarning)]) == 1


def test_scratch_files_of_onnx_runtimes_tools_stay_out_of_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime's symbolic shape inference, failing, saves sym_shape_infer_temp.onnx + <uuid>.data into the
    current directory (four such files were once committed): the quantizer runs in its temporary folder instead.
    The stand-in writes there as that code does, then does the real work; relative paths in and out still work."""
    from onnxruntime.quantization import shape_inference

    real = shape_inference.quant_pre_process
    scratch: list[Path] = []

    def writes_scratch_into_cwd(*args: Any, **kwargs: Any) -> None:
        Path("sym_shape_infer_temp.onnx").write_bytes(b"scratch")
        scratch.append(Path.cwd() / "sym_shape_infer_temp.onnx")
        real(*args, **kwargs)

    monkeypatch.setattr(shape_inference, "quant_pre_process", writes_scratch_into_cwd)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model, config = tiny_stage(CLS_CONFIG, seed=0)
    prep = Preprocessing.from_dict(config["preprocessing"])
    images = np.random.default_rng(0).integers(0, 256, (2, prep.size, prep.size), dtype=np.uint8)
    graph = quantized_graph(model, config, prep, images, "engines")  # a relative cache folder
    assert Path.cwd() == work and graph.is_file() and graph.is_absolute()
    assert graph.parent == work / "engines"
    assert scratch and not scratch[0].exists(), "the scratch file outlived the call"
    assert sorted(p.name for p in work.iterdir()) == ["engines"]
