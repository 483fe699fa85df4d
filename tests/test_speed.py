"""Precision and backends: what ``auto`` resolves to, what a model folder records, and that each engine computes
the same cascade (ONNX Runtime within its tolerance, bf16 close but really bf16), with graphs cached outside
MODEL_DIR."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OPEN, make_model_dir

from cascade.cli.main import main
from cascade.common.devices import cpu_supports_bf16
from cascade.data.synth import generate
from cascade.errors import ConfigError, ModelError
from cascade.inference.engines import engine_class
from cascade.inference.pipeline import Cascade, predict_probabilities
from cascade.inference.precision import PrecisionWarning
from cascade.inference.runtime import AUTO_ONNXRUNTIME, Runtime
from cascade.storage.modeldir import MANIFEST, read_model_dir



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    synth = generate(tmp_path_factory.mktemp("synth"), images=4, positive_fraction=0.5, size=96, seed=3,
                     progress=False)
    return sorted(synth.paths.values())


def test_native_bf16_is_detected_from_the_cpu_flags() -> None:
    assert cpu_supports_bf16("flags\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_supports_bf16("flags\t: fpu avx2 amx_bf16 amx_tile\n")
    assert not cpu_supports_bf16("flags\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert not cpu_supports_bf16("flags\t: fpu avx2 xavx512_bf16s\n")  # whole flags only


def test_auto_precision_is_bf16_on_cuda_and_native_bf16_cpus_only() -> None:
    assert engine_class("torch").auto_precision(torch.device("cuda")) == "bf16"
    assert Runtime.resolve("cpu").precision == ("bf16" if cpu_supports_bf16() else "fp32")
    for explicit in ("fp32", "bf16", "fp16"):
        assert Runtime.resolve("cpu", explicit, "torch").precision == explicit
    with pytest.raises(ConfigError, match="unknown precision 'int4'"):
        Runtime.resolve("cpu", "int4")


AVX2_ONLY = "flags\t: fpu sse avx2 fma avx512f avx512_vnni\n"
NATIVE_BF16 = "flags\t: fpu sse avx2 fma avx512f avx512_vnni avx512_bf16\n"


@pytest.mark.parametrize("flags, torch_auto", [(AVX2_ONLY, "fp32"), (NATIVE_BF16, "bf16")], ids=["avx2", "bf16"])
def test_auto_precision_resolves_per_engine_on_each_kind_of_cpu(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, flags: str, torch_auto: str
) -> None:
    """What ``auto`` picks on a CPU with and without native bf16 (flags faked): torch follows the CPU, ONNX Runtime
    always runs fp32 there, and ``--backend onnxruntime`` with the default precision is never refused."""
    monkeypatch.setattr("cascade.common.devices._cpuinfo", lambda: flags)
    assert Runtime.resolve("cpu").precision == torch_auto
    assert Runtime.resolve("cpu", engine="torch").precision == torch_auto
    assert Runtime.resolve("cpu", engine="onnxruntime").precision == "fp32"
    assert engine_class("torch").auto_precision(torch.device("cuda")) == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)  # the folder was tuned at fp32: ONNX Runtime must run fp32
        ort = Cascade.from_pretrained(model_dir, device="cpu", backend="onnxruntime")
    assert (ort.precision, ort.backend) == ("fp32", "onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        auto = Cascade.from_pretrained(model_dir, device="cpu")
    expected_backend = "onnxruntime" if torch_auto == "fp32" and AUTO_ONNXRUNTIME else "torch"
    assert (auto.precision, auto.backend) == (torch_auto, expected_backend)


def test_model_folder_records_precision_and_an_old_folder_reads_as_fp32(tmp_path: Path) -> None:
    folder = make_model_dir(tmp_path / "m")
    assert json.loads((folder / MANIFEST).read_text())["precision"] == "fp32"
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["precision"]  # a folder written before the field existed
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert read_model_dir(folder).precision == "fp32"
    manifest["precision"] = "int4"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="precision must be one of fp32, bf16, fp16, int8, got 'int4'"):
        read_model_dir(folder)
    manifest["precision"] = "int8"  # tuned at int8 but without the graphs that precision needs
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="no sha256 recorded for classifier/model.int8.onnx"):
        read_model_dir(folder)


def test_other_precision_than_tuned_warns_once_and_save_keeps_the_tuned_one(model_dir: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 as tuned: no warning at all
        Cascade.from_pretrained(model_dir, device="cpu", precision="fp32", backend="torch")
    with pytest.warns(PrecisionWarning, match="tuned at fp32 but inference runs at bf16") as record:
        model = Cascade.from_pretrained(model_dir, device="cpu", precision="bf16")
    assert len(record) == 1 and (model.precision, model.backend) == ("bf16", "torch")
    copy = model.save_pretrained(tmp_path / "copy")
    assert read_model_dir(copy).precision == "fp32", "the thresholds are still the ones tuned at fp32"


def test_predict_cli_warns_once_for_another_precision_and_still_writes(
    model_dir: Path, paths: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sub.csv"
    status = main(["predict", str(model_dir), *map(str, paths), "--out", str(out), "--device", "cpu",
                   "--workers", "0", "--precision", "bf16"])
    captured = capsys.readouterr()
    assert status == 0 and out.is_file()
    assert captured.err.count("cascade predict: warning:") == 1
    assert "thresholds were tuned at fp32 but inference runs at bf16" in captured.err
    assert "bf16 on torch" in captured.out


def test_bf16_runs_in_bf16_and_stays_close_to_fp32(model_dir: Path, paths: list[Path]) -> None:
    runs = {}
    for precision in ("fp32", "bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)
            runs[precision] = list(predict_probabilities([model_dir / "classifier"], [model_dir / "segmenter"], paths,
                                                         workers=0,
                                                         runtime=Runtime.resolve("cpu", precision, "torch")))
    fp32 = np.stack([p.seg_prob for p in runs["fp32"]])
    bf16 = np.stack([p.seg_prob for p in runs["bf16"]])
    diff = np.abs(fp32 - bf16).max()
    assert 0 < diff < 0.05, f"bf16 must change the maps a little (autocast applied), not a lot: {diff}"


def test_onnxruntime_matches_torch_and_caches_graphs_outside_the_model_folder(
    model_dir: Path, paths: list[Path], tmp_path: Path
) -> None:
    before = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*"))
    cache = tmp_path / "engines"
    torch_model = Cascade.from_pretrained(model_dir, device="cpu", backend="torch", precision="fp32")
    ort_model = Cascade.from_pretrained(model_dir, device="cpu", backend="onnxruntime", cache_dir=cache, tta=True)
    assert ort_model.backend == "onnxruntime" and ort_model.precision == "fp32"
    graphs = sorted(cache.glob("*.onnx"))
    assert len(graphs) == 2, "one graph per member (classifier, segmenter)"
    assert sorted(p.relative_to(model_dir) for p in model_dir.rglob("*")) == before, "nothing written into MODEL_DIR"
    torch_model.tta = True
    for a, b in zip(torch_model.predict_many(paths, workers=0), ort_model.predict_many(paths, workers=0)):
        assert a.probability == pytest.approx(b.probability, abs=1e-4)
        assert a.positive == b.positive and (a.mask == b.mask).mean() > 0.999
    stamps = [g.stat().st_mtime_ns for g in graphs]
    Cascade.from_pretrained(model_dir, device="cpu", backend="onnxruntime", cache_dir=cache)
    assert [g.stat().st_mtime_ns for g in sorted(cache.glob("*.onnx"))] == stamps, "second load reuses the cache"
    other = make_model_dir(tmp_path / "other", OPEN, seg_bias=1.0)  # other weights: another digest, another graph
    Cascade.from_pretrained(other, device="cpu", backend="onnxruntime", cache_dir=cache)
    assert len(list(cache.glob("*.onnx"))) == 3


def test_onnxruntime_refuses_what_it_cannot_run(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="onnxruntime runs fp32 on the CPU only"):
        Cascade.from_pretrained(model_dir, device="cpu", backend="onnxruntime", precision="bf16")
    with pytest.raises(ConfigError, match="torch.compile applies to the torch backend only"):
        Cascade.from_pretrained(model_dir, device="cpu", backend="onnxruntime", compile=True)
    with pytest.raises(ConfigError, match="unknown backend 'tensorrt'"):
        Cascade.from_pretrained(model_dir, device="cpu", backend="tensorrt")


def test_auto_backend_follows_the_rule(model_dir: Path) -> None:
    model = Cascade.from_pretrained(model_dir, device="cpu", precision="fp32")
    assert model.backend == ("onnxruntime" if AUTO_ONNXRUNTIME else "torch")
    with pytest.warns(PrecisionWarning):
        assert Cascade.from_pretrained(model_dir, device="cpu", precision="bf16").backend == "torch"
    assert Cascade.from_pretrained(model_dir, device="cpu", precision="fp32", compile=True).backend == "torch"


@pytest.mark.slow
def test_torch_compile_gives_the_eager_answers(model_dir: Path, paths: list[Path]) -> None:
    eager = Cascade.from_pretrained(model_dir, device="cpu", backend="torch")
    compiled = Cascade.from_pretrained(model_dir, device="cpu", backend="torch", compile=True)
    for a, b in zip(eager.predict_many(paths, workers=0), compiled.predict_many(paths, workers=0)):
        assert a.probability == pytest.approx(b.probability, abs=1e-4) and a.positive == b.positive


def test_cascade_cpuinfo_names_the_cpu_whose_decisions_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``$CASCADE_CPUINFO`` (how .ci/run runs the suite as if on an AVX2-only CPU) is read instead of /proc/cpuinfo."""
    for flags, native in ((AVX2_ONLY, False), (NATIVE_BF16, True)):
        (tmp_path / "cpuinfo").write_text(flags)
        monkeypatch.setenv("CASCADE_CPUINFO", str(tmp_path / "cpuinfo"))
        assert cpu_supports_bf16() is native
        assert Runtime.resolve("cpu").precision == ("bf16" if native else "fp32")
