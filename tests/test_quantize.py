"""int8 graphs (cascade.quantize): the probability a quantized network answers is fp32, neither rounded to 256
levels nor clipped at the largest value its calibration images reached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLS_CONFIG, SEG_CONFIG, tiny_stage

from cascade.data.preprocess import Preprocessing
from cascade.pipeline import _Stage
from cascade.quantize import quantized_graph

CPU = torch.device("cpu")


@pytest.mark.parametrize("config", [CLS_CONFIG, SEG_CONFIG], ids=["classifier", "segmenter"])
def test_int8_probabilities_reach_past_the_calibration_range(config: dict, tmp_path: Path) -> None:
    """Calibrated on the images a network scores lowest, the int8 graph still scores the others higher than any of
    them — a quantized output layer clipped them all to the calibration maximum — and a segmenter's map keeps
    more than 256 distinct probabilities."""
    model, config = tiny_stage(config, seed=0)
    if config["stage"] == "cls":
        with torch.no_grad():  # spread the random classifier's answers over most of (0, 1)
            model.backbone.get_classifier().weight.mul_(100)
    prep = Preprocessing.from_dict(config["preprocessing"])
    rng = np.random.default_rng(0)
    levels = np.linspace(20, 235, 24)[:, None, None]  # dark to bright films, with texture
    images = np.clip(levels + rng.normal(0, 25, (24, prep.size, prep.size)), 0, 255).astype(np.uint8)

    fp32 = _Stage([(model, config)], prep, CPU)(images, False)
    score = fp32.reshape(len(images), -1).max(axis=1)  # the probability, or a map's largest one
    low, high = np.argsort(score)[:12], np.argsort(score)[12:]
    graph = quantized_graph(model, config, prep, images[low], tmp_path)
    int8 = _Stage([(model, config)], prep, CPU, precision="int8", int8=[graph.read_bytes()])(images, False)

    int8_score = int8.reshape(len(images), -1).max(axis=1)
    assert int8_score[high].max() > score[low].max() + 0.005, "int8 probabilities clipped at the calibration maximum"
    assert np.abs(int8 - fp32).max() < 0.1
    if config["stage"] == "seg":
        assert len(np.unique(int8)) > 256, "the segmenter's probabilities were rounded to 8 bits"
