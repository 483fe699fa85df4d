"""``--init-from``: a classifier's backbone starts as a segmenter run's encoder, tensor for tensor, or is refused."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from conftest import cli_train, killed_after_epoch, tiny_synth
from safetensors.torch import load_file, save_file

from cascade.errors import ModelError
from cascade.stages.checkpoint import build_model, save_stage
from cascade.stages.weights import init_from_segmenter, set_backbone_trainable

CONFIGS = Path(__file__).resolve().parents[1] / "cascade" / "configs"


def seg_run(root: Path, encoder: str, stage: str = "seg", seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A run folder whose ``best/`` holds a randomly initialised network, as ``cascade train`` writes it."""
    torch.manual_seed(seed)
    config = {"stage": stage, "in_chans": 1, **({"arch": "unet", "encoder": encoder} if stage == "seg" else
                                                 {"model": encoder, "pool": "avg", "drop_rate": 0.0})}
    model = build_model(config)
    save_stage(root / "best", model, config)
    return root, model


def cls_config(model: str, source: Path) -> dict:
    return {"stage": "cls", "network": {"model": model, "pool": "avg", "drop_rate": 0.0, "init_from": str(source)}}


def build_cls(model: str) -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model({"stage": "cls", "in_chans": 1, "model": model, "pool": "avg", "drop_rate": 0.0})


@pytest.mark.parametrize(
    ("encoder", "model", "prefix", "loaded", "left"),
    [
        ("tu-test_resnet", "test_resnet", "encoder.model.", 90, ()),
        # timm's features_only wrapper names ConvNeXt's stem_0 what the classifier calls stem.0
        ("tu-test_convnext", "test_convnext", "encoder.model.", 97, ("head.norm.weight", "head.norm.bias")),
        # a segmentation encoder ends before EfficientNet's conv_head/bn2: they stay new, and are reported
        ("tu-test_efficientnet", "test_efficientnet", "encoder.model.", 80,
         ("conv_head.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
          "bn2.num_batches_tracked")),
        ("resnet18", "resnet18", "encoder.", 120, ()),  # smp's torchvision ResNet <-> timm resnet18
    ],
)
def test_every_encoder_tensor_is_copied_exactly(
    tmp_path: Path, encoder: str, model: str, prefix: str, loaded: int, left: tuple[str, ...]
) -> None:
    run, seg = seg_run(tmp_path, encoder)
    cls = build_cls(model)
    before = {k: v.clone() for k, v in cls.state_dict().items()}
    report = init_from_segmenter(cls, cls_config(model, run))
    assert report.loaded == loaded and report.left == left and report.source == run / "best"
    assert str(loaded) in report.describe()

    encoder_state = {k[len(prefix):]: v for k, v in seg.state_dict().items() if k.startswith(prefix)}
    after = cls.backbone.state_dict()
    copied = 0
    for name, value in after.items():
        source = encoder_state.get(name, encoder_state.get(name.replace(".", "_", 1)))
        if source is not None:
            assert torch.equal(value, source), name
            copied += 1
        else:  # head and reported tail: exactly as built
            assert torch.equal(value, before[f"backbone.{name}"]), name
    assert copied == loaded == len(encoder_state)


def test_smp_resnet_encoder_computes_the_same_features_as_the_timm_backbone(tmp_path: Path) -> None:
    """Equal names are not enough: the copied backbone must compute what the encoder computed."""
    run, seg = seg_run(tmp_path, "resnet18")
    cls = build_cls("resnet18")
    init_from_segmenter(cls, cls_config("resnet18", run))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        deepest = seg.eval().encoder(x)[-1]
        features = cls.eval().backbone.forward_features(x)
    torch.testing.assert_close(features, deepest, rtol=0, atol=0)


def test_a_different_architecture_is_refused_naming_both(tmp_path: Path) -> None:
    run, _ = seg_run(tmp_path, "tu-test_resnet")
    with pytest.raises(ModelError, match=r"encoder 'tu-test_resnet' is timm 'test_resnet' but the classifier is "
                                         r"'resnet18'.*--encoder test_resnet"):
        init_from_segmenter(build_cls("resnet18"), cls_config("resnet18", run))


def test_same_name_but_different_tensors_is_refused(tmp_path: Path) -> None:
    """A segmenter saved with another encoder variant under the same name: the tensor check catches it."""
    run, _ = seg_run(tmp_path, "tu-test_resnet")
    weights = run / "best" / "model.safetensors"
    state = load_file(str(weights))
    state["encoder.model.layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(state, str(weights))
    with pytest.raises(ModelError, match=r"layer1\.0\.conv1\.weight' has shape \(3, 3, 3, 3\)"):
        init_from_segmenter(build_cls("test_resnet"), cls_config("test_resnet", run))
    del state["encoder.model.layer1.0.conv1.weight"]
    save_file(state, str(weights))
    with pytest.raises(ModelError, match=r"the classifier's 'layer1\.0\.conv1\.weight' has no tensor in the segmenter"):
        init_from_segmenter(build_cls("test_resnet"), cls_config("test_resnet", run))
    state["encoder.model.layer1.0.conv1.weight"] = seg_run(tmp_path / "again", "tu-test_resnet")[1].state_dict()[
        "encoder.model.layer1.0.conv1.weight"]
    state["encoder.model.extra.weight"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(ModelError, match=r"the encoder's 'extra\.weight' \(and 0 more\) has no place"):
        init_from_segmenter(build_cls("test_resnet"), cls_config("test_resnet", run))


def test_a_classifier_run_or_a_non_run_is_refused(tmp_path: Path) -> None:
    run, _ = seg_run(tmp_path / "cls-run", "test_resnet", stage="cls")
    with pytest.raises(ModelError, match="a 'cls' run; --init-from needs a segmenter run"):
        init_from_segmenter(build_cls("test_resnet"), cls_config("test_resnet", run))
    with pytest.raises(ModelError, match="not a training run"):
        init_from_segmenter(build_cls("test_resnet"), cls_config("test_resnet", tmp_path / "nothing"))


def test_freezing_touches_the_backbone_parameters_only() -> None:
    cls = build_cls("test_resnet")
    n = sum(1 for name, _ in cls.backbone.named_parameters() if not name.startswith("fc."))
    assert set_backbone_trainable(cls, "cls", False) == n
    assert [name for name, p in cls.named_parameters() if p.requires_grad] == ["backbone.fc.weight", "backbone.fc.bias"]
    assert set_backbone_trainable(cls, "cls", False) == 0
    assert set_backbone_trainable(cls, "cls", True) == n
    assert all(p.requires_grad for p in cls.parameters())


# ------------------------------------------------------------------------------------------------ through the CLI


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_synth(tmp_path_factory.mktemp("synth"), seed=3)


train = cli_train


@pytest.fixture(scope="module")
def trained_seg(synth: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "run"
    assert train(synth, out, "seg", "--epochs", "1") == 0
    return out


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_cli_classifier_with_a_frozen_backbone_keeps_the_encoder_weights(
    synth: Path, trained_seg: Path, tmp_path: Path
) -> None:
    """Frozen for its only epoch, the classifier's backbone parameters are the segmenter's encoder's, bit for bit
    (BatchNorm running statistics follow the data, so buffers are not compared); the head has learnt."""
    out = tmp_path / "cls"
    flags = ["--epochs", "1", "--init-from", str(trained_seg), "--gate", "separate", "--freeze-backbone-epochs", "1"]
    assert train(synth, out, "cls", *flags) == 0
    seg, cls = _weights(trained_seg / "best"), _weights(out / "last")
    model = build_model({"stage": "cls", "in_chans": 1, "model": "test_resnet"})
    params = {name for name, _ in model.named_parameters()}
    backbone = [k for k in params if not k.startswith("backbone.fc.")]
    assert len(backbone) > 40
    for k in backbone:
        assert torch.equal(cls[k], seg["encoder.model." + k[len("backbone."):]]), k
    assert not torch.equal(cls["backbone.fc.weight"], build_cls("test_resnet").state_dict()["backbone.fc.weight"])
    assert "init_from: " + str(trained_seg.resolve()) in (out / "config.yaml").read_text()
    assert "init_from" not in (out / "best" / "config.json").read_text()


@pytest.mark.parametrize("gate", [["--gate", "separate", "--freeze-backbone-epochs", "1"], []],
                         ids=["separate-across-the-unfreeze-epoch", "shared-encoder-gate"])
def test_resume_is_bit_exact(
    synth: Path, trained_seg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gate: list[str]
) -> None:
    flags = ["--epochs", "3", "--init-from", str(trained_seg), *gate]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train(synth, straight, "cls", *flags) == 0
    killed_after_epoch(monkeypatch, 1)
    assert train(synth, killed, "cls", *flags) == 130
    monkeypatch.undo()
    assert train(synth, killed, "cls", *flags, "--resume") == 0
    a, b = _weights(straight / "last"), _weights(killed / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("epoch", "train_loss", "val_loss", "val_auc")
    assert [{k: r[k] for k in keep} for r in _metrics(straight)] == [{k: r[k] for k in keep} for r in _metrics(killed)]


def test_cli_refusals(synth: Path, trained_seg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cls"
    assert train(synth, out, "cls", "--init-from", str(trained_seg), "--gate", "separate", "--encoder", "resnet18") == 2
    assert "the classifier is 'resnet18'" in capsys.readouterr().err
    assert train(synth, out, "cls", "--init-from", str(trained_seg), "--pretrained", "x.safetensors") == 2
    assert "choose one starting point" in capsys.readouterr().err
    assert train(synth, out, "seg", "--init-from", str(trained_seg)) == 2
    assert "--init-from applies to the classifier" in capsys.readouterr().err
    assert train(synth, out, "cls", "--freeze-backbone-epochs", "9", "--epochs", "2") == 2
    assert "freeze_backbone_epochs 9 exceeds optim.epochs 2" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_on_realistic_data_the_gates_from_the_segmenter_beat_one_from_scratch(tmp_path: Path) -> None:
    """benchmarks/classifier_init.py in small: same data, epochs and seed; only the gate differs: a separate
    classifier from scratch, one ``--init-from`` (``gate: separate``) and the shared-encoder gate (``--init-from``'s
    default). Films made at the networks' 128² (synthesis 5 s instead of minutes). Measured on a 2-core native-bf16
    EPYC (the tiny configurations train in fp32): best epochs scratch 0.543, separate ``--init-from`` 0.819 (seg
    147 s, each classifier about 26 s, two threads); the shared gate: see the assertion's message when it fails."""
    from cascade.data.synth import generate
    from cascade.stages import config as cfg
    from cascade.stages import training

    torch.set_num_threads(min(2, os.cpu_count() or 1))  # no loader workers here: both cores for the networks
    data = tmp_path / "data"
    generate(data, images=640, positive_fraction=0.5, size=128, seed=0, difficulty="realistic", progress=False)
    images, labels = data / "dicom-images-train", data / "train-rle.csv"
    common = {"preprocessing": {"size": 128}, "optim": {"epochs": 12}, "data": {"cache_dir": str(tmp_path / "c")}}
    seg = tmp_path / "seg"
    seg_config = cfg.resolve("seg", CONFIGS / "tiny-seg.yaml", {**common, "optim": {"epochs": 12, "batch_size": 16}})
    training.train(seg_config, images, labels, seg, progress=False)
    auc = {}
    variants = (("scratch", {"gate": "separate"}), ("init", {"init_from": str(seg), "gate": "separate"}),
                ("shared", {"init_from": str(seg)}))
    for name, network in variants:
        config = cfg.resolve("cls", CONFIGS / "tiny-cls-from-seg.yaml", {**common, "network": network})
        training.train(config, images, labels, tmp_path / name, progress=False)
        auc[name] = max(float(r["val_auc"]) for r in _metrics(tmp_path / name))
    assert auc["init"] >= auc["scratch"] + 0.1, auc  # the margin the segmenter's encoder buys, whatever scratch does
    assert auc["shared"] >= auc["scratch"] + 0.1, auc


def test_a_run_saved_before_these_keys_existed_still_resumes(tmp_path: Path) -> None:
    from cascade.stages import config as cfg

    old = cfg.resolve("cls", CONFIGS / "tiny-cls.yaml")
    del old["network"]["init_from"], old["optim"]["freeze_backbone_epochs"]
    (tmp_path / "config.yaml").write_text(cfg.to_yaml(old))
    resumed = cfg.resume_config(tmp_path / "config.yaml", "cls")
    assert resumed["network"]["init_from"] is None and resumed["optim"]["freeze_backbone_epochs"] == 0
