"""The shared-encoder gate: a head on the segmenter's frozen encoder, stored without the encoder, attached to the one
segmenter it was trained on, and run so that the encoder computes each image's features once."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_train, tiny_synth
from safetensors.torch import load_file

from cascade.cli.main import main
from cascade.errors import ModelError
from cascade.stages.checkpoint import load_stage
from cascade.stages.gate import SharedEncoderGate, attach_shared_gates, encoder_sha256

CONFIGS = Path(__file__).resolve().parents[1] / "cascade" / "configs"


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_synth(tmp_path_factory.mktemp("synth"), seed=5)


train = cli_train


@pytest.fixture(scope="module")
def runs(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two segmenter runs (one split, 2 and 1 epochs) and a gate trained from the first with ``--init-from`` and no other flag."""
    root = tmp_path_factory.mktemp("runs")
    assert train(synth, root / "seg", "seg", "--epochs", "2") == 0
    assert train(synth, root / "other", "seg", "--epochs", "1") == 0  # same split, other weights
    assert train(synth, root / "gate", "cls", "--epochs", "2", "--init-from", str(root / "seg")) == 0
    return root / "seg", root / "other", root / "gate"


@pytest.fixture(scope="module")
def model_dir(runs: tuple[Path, Path, Path]) -> Path:
    seg, _, gate = runs
    out = seg.parent / "model"
    assert main(["tune", "--cls", str(gate), "--seg", str(seg), "--out", str(out), "--precision", "fp32", "--quiet"]) == 0
    return out


def test_init_from_makes_a_shared_gate_that_stores_only_its_head(runs: tuple[Path, Path, Path]) -> None:
    seg_run, _, gate_run = runs
    config = json.loads((gate_run / "best" / "config.json").read_text())
    assert config["gate"] == "shared" and config["segmenter"]["encoder"] == "tu-test_resnet"
    segmenter, _ = load_stage(seg_run / "best")
    assert config["encoder_sha256"] == encoder_sha256(segmenter.encoder)
    stored = load_file(str(gate_run / "best" / "model.safetensors"))
    assert stored and all(k.startswith("head.") for k in stored)  # no encoder tensor stored twice
    # the segmenter stayed frozen, BatchNorm statistics included: state.pt's copy equals the segmenter run's best/
    state = torch.load(gate_run / "state.pt", weights_only=True)["model"]
    seg_state = load_file(str(seg_run / "best" / "model.safetensors"))
    assert all(torch.equal(state["segmenter." + k], v) for k, v in seg_state.items())
    assert "gate: shared" in (gate_run / "config.yaml").read_text()


def test_a_gate_refuses_a_segmenter_it_was_not_trained_on(
    runs: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, other, gate_run = runs
    gate, config = load_stage(gate_run / "best")
    with pytest.raises(ModelError, match="a shared-encoder gate needs its segmenter attached"):
        gate(torch.zeros(1, 1, 64, 64))  # never silently on an encoder of random weights
    with pytest.raises(ModelError, match="not among this cascade's segmenters"):
        attach_shared_gates([(gate, config)], [load_stage(other / "best")])
    assert main(["tune", "--cls", str(gate_run), "--seg", str(other), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "not among this cascade's segmenters" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_the_encoder_runs_once_per_image_and_the_decoder_only_on_passed_images(
    model_dir: Path, synth: Path
) -> None:
    from cascade import Cascade

    files = sorted((synth / "dicom-images-train").rglob("*.dcm"))[:20]
    cascade = Cascade.from_pretrained(model_dir, device="cpu", precision="fp32", backend="torch")
    gate, segmenter = cascade._stages.classifier.models[0], cascade._stages.segmenter.models[0]
    assert isinstance(gate, SharedEncoderGate) and gate.segmenter is segmenter and cascade._stages.shared
    seen = {"encoder": 0, "decoder": 0}
    segmenter.encoder.register_forward_hook(lambda m, i, o: seen.__setitem__("encoder", seen["encoder"] + len(i[0])))
    segmenter.decoder.register_forward_hook(lambda m, i, o: seen.__setitem__("decoder", seen["decoder"] + len(o)))
    probs = [p.probability for p in cascade.predict_many(files, batch_size=8, workers=0, gate=False)]
    cascade.thresholds = dataclasses.replace(cascade.thresholds, cls=float(np.median(probs)))
    seen.update(encoder=0, decoder=0)
    gated = list(cascade.predict_many(files, batch_size=8, workers=0))
    passed = sum(p >= cascade.thresholds.cls for p in probs)
    assert 0 < passed < len(files)
    assert seen == {"encoder": len(files), "decoder": passed}
    # the same answers as the two networks run one after the other (ONNX Runtime runs each stage's own graph)
    onnx = Cascade.from_pretrained(model_dir, device="cpu", precision="fp32", backend="onnxruntime")
    assert not onnx._stages.shared
    onnx.thresholds = cascade.thresholds
    for a, b in zip(gated, onnx.predict_many(files, batch_size=8, workers=0)):
        assert abs(a.probability - b.probability) < 1e-4
        assert a.positive == b.positive and (a.mask == b.mask).mean() > 0.999


def test_the_model_card_and_export_name_the_shared_gate(model_dir: Path, tmp_path: Path) -> None:
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert "shared-encoder gate" in card and "tu-test_resnet" in card
    assert main(["export", "--format", "onnx", "--out", str(tmp_path / "onnx"), str(model_dir)]) == 0
    exported = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert {m["file"] for m in exported["members"]} == {"classifier.onnx", "segmenter.onnx"}
    assert all(m["max_abs_diff"] <= 1e-4 for m in exported["members"])


def test_gate_shared_without_a_segmenter_run_is_refused(synth: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert train(synth, tmp_path / "g", "cls", "--gate", "shared") == 2
    assert "give --init-from SEG_RUN_DIR" in capsys.readouterr().err
    assert train(synth, tmp_path / "g", "seg", "--gate", "shared") == 2
    assert "--gate applies to the classifier" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_serve_and_listen_answer_as_the_library_with_a_shared_gate(
    model_dir: Path, shared_data: Path, tmp_path: Path
) -> None:
    """The web service and the DICOM node load a shared-gate folder and answer exactly as ``Cascade.predict``."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient
    from listen_helpers import store, wait_findings

    from cascade import Cascade
    from cascade.apps.listen import Node
    from cascade.apps.serve import create_app
    from cascade.data.rle import rle_decode
    from cascade.inference.runtime import Runtime

    samples = sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))[:4]
    runtime = Runtime.resolve("cpu", "fp32", "torch")
    library = Cascade.from_pretrained(model_dir, runtime=runtime)
    expected = {p.stem: library.predict(p) for p in samples}
    with TestClient(create_app(model_dir, runtime=runtime, batch_window_ms=0, max_batch=1)) as client:
        deadline = time.monotonic() + 60
        while client.get("/healthz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        member = client.get("/v1/model").json()["stages"]["classifier"]["members"][0]
        assert member["gate"] == "shared" and len(member["shared_encoder_sha256"]) == 64
        for path in samples:
            answer = client.post("/v1/predict", content=path.read_bytes(),
                                 headers={"content-type": "application/dicom"}).json()
            assert answer["probability"] == expected[path.stem].probability
            assert answer["rle"] == expected[path.stem].rle
    node = Node(Cascade.from_pretrained(model_dir, runtime=runtime), tmp_path / "node", port=0)
    node.start()
    try:
        assert store(node.address[1], samples) == [0] * len(samples)
        rows = wait_findings(tmp_path / "node", len(samples))
    finally:
        node.stop()
    for row in rows:
        assert abs(float(row["probability"]) - expected[row["ImageId"]].probability) < 1e-6, row
        mask = expected[row["ImageId"]].mask  # the node batches what arrives together: float rounding at the edge
        assert (rle_decode(row["EncodedPixels"], *mask.shape) != mask).sum() <= 1e-4 * mask.size
