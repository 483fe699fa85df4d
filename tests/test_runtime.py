"""Runtime: the requests resolved once, described in one line; engines registered by name, one module each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import OPEN, make_model_dir

from cascade.errors import ConfigError
from cascade.inference.engines import ENGINES, Engine, register_engine
from cascade.inference.pipeline import Cascade
from cascade.inference.runtime import Runtime


def test_a_runtime_is_resolved_once_and_describes_itself() -> None:
    torch_fp32 = Runtime.resolve("cpu", "fp32", "torch")
    assert (torch_fp32.device.type, torch_fp32.precision, torch_fp32.engine) == ("cpu", "fp32", "torch")
    assert torch_fp32.describe() == "device cpu, fp32 on torch"
    assert torch_fp32.as_dict() == {"device": "cpu", "precision": "fp32", "backend": "torch", "engine": "torch",
                                    "compile": False}
    int8 = Runtime.resolve("cpu", "int8")
    assert (int8.engine, int8.backend, int8.describe()) == ("onnxruntime-int8", "onnxruntime",
                                                            "device cpu, int8 on onnxruntime")
    assert Runtime.resolve("cpu", engine="onnxruntime").with_int8_graphs().precision == "int8"
    assert Runtime.resolve("cpu", "fp32").with_int8_graphs().precision == "fp32"  # asked for: kept
    assert Runtime.resolve("cpu", engine="torch").with_int8_graphs().engine == "torch"
    with pytest.raises(ConfigError, match="precision int8 runs on ONNX Runtime on the CPU only"):
        Runtime.resolve("cpu", "int8", "torch")


def test_from_pretrained_takes_a_runtime_or_the_old_requests_not_both(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "m")
    runtime = Runtime.resolve("cpu", "fp32", "torch")
    assert Cascade.from_pretrained(model_dir, runtime=runtime).runtime == runtime
    assert Cascade.from_pretrained(model_dir, device="cpu", precision="fp32", backend="torch").runtime == runtime
    with pytest.raises(ConfigError, match="give runtime= or the requests device, not both"):
        Cascade.from_pretrained(model_dir, runtime=runtime, device="cpu")


def test_a_new_engine_is_one_registered_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine registered by name runs a cascade through ``Runtime.resolve(engine=name)``; a name is taken once."""
    monkeypatch.setattr("cascade.inference.engines.ENGINES", dict(ENGINES))

    @register_engine("half")
    class Half(Engine):  # every probability 0.5: a map per image for a segmenter, one number for a classifier
        backend = "half"

        def __call__(self, images: np.ndarray, tta: bool) -> np.ndarray:
            segmenter = self.models[0].__class__.__name__ != "Classifier"
            return np.full(images.shape if segmenter else images.shape[:1], 0.5, dtype=np.float32)

    runtime = Runtime.resolve("cpu", "fp32", "half")
    assert runtime.describe() == "device cpu, fp32 on half"
    with pytest.raises(ValueError, match="engine 'half' is already registered"):
        register_engine("half")(type("Other", (Engine,), {}))
    model = Cascade.from_pretrained(make_model_dir(tmp_path / "m", OPEN), runtime=runtime)
    assert model.backend == "half" and model.predict(np.full((64, 64), 0.5, dtype=np.float32)).probability == 0.5
