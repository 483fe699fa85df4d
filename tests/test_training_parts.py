"""The training loop's parts on their own: configuration, sampler, schedule, loss, pretrained weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.errors import ConfigError, ModelError
from cascade.stages import config as cfg
from cascade.stages.checkpoint import build_model
from cascade.stages.losses import ComboLoss, soft_dice_loss
from cascade.stages.sampling import PositiveShareSampler, epoch_indices
from cascade.stages.trainer import lr_factor
from cascade.stages.weights import load_pretrained

CONFIGS = Path(__file__).resolve().parents[1] / "cascade" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_resolves(path: Path) -> None:
    stage = cfg.read_yaml(path)["stage"]
    assert cfg.resolve(stage, path)["stage"] == stage


def test_flags_override_the_file_and_bad_keys_are_named(tmp_path: Path) -> None:
    resolved = cfg.resolve("seg", CONFIGS / "tiny-seg.yaml", {"optim": {"epochs": 2}, "seed": 7})
    assert resolved["optim"]["epochs"] == 2 and resolved["seed"] == 7 and resolved["preprocessing"]["size"] == 64
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1e-3, epochs: 3, learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.learning_rate"):
        cfg.resolve("cls", bad)
    bad.write_text("optim: {epochs: 0}\n")
    with pytest.raises(ConfigError, match=r"optim\.epochs must be an integer"):
        cfg.resolve("cls", bad)
    bad.write_text("sampling: {positive_share: [0.8, 1.5]}\n")
    with pytest.raises(ConfigError, match=r"sampling\.positive_share"):
        cfg.resolve("seg", bad)
    with pytest.raises(ConfigError, match=r"network\.arch"):
        cfg.resolve("cls", None, {"network": {"arch": "unet"}})
    with pytest.raises(ConfigError, match=r"data\.fold 5 must be below data\.folds 5"):
        cfg.resolve("cls", None, {"data": {"fold": 5}})
    with pytest.raises(ConfigError, match="stage 'cls'"):
        cfg.resolve("seg", CONFIGS / "tiny-cls.yaml")


def test_segmenter_families_are_smps_registry_and_a_bad_arch_lists_them() -> None:
    """network.arch offers every architecture smp.create_model knows (not a copied subset); the names configs
    already use keep working (any case); a wrong name is refused with every choice listed."""
    import segmentation_models_pytorch as smp

    from cascade.stages.segmenter import ARCHS, build_segmenter

    assert dict(ARCHS) == dict(smp.MODEL_ARCHITECTURES_MAPPING)
    used = {"unet", "unetplusplus", "fpn", "deeplabv3plus", "linknet", "pspnet", "manet", "pan"}
    assert used <= set(ARCHS) and "upernet" in ARCHS  # a family smp added is usable without a change here
    for arch in ("upernet", "FPN"):
        model = build_segmenter({"arch": arch, "encoder": "tu-resnet10t", "in_chans": 1}).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    assert cfg.resolve("seg", None, {"network": {"arch": "upernet"}})["network"]["arch"] == "upernet"
    with pytest.raises(ConfigError, match=r"network\.arch must be one of ") as refused:
        cfg.resolve("seg", None, {"network": {"arch": "unet3d"}})
    assert all(name in str(refused.value) for name in ARCHS)
    with pytest.raises(ConfigError, match="segmentation architecture 'unet3d' is not one of unet, "):
        build_segmenter({"arch": "unet3d", "encoder": "tu-resnet10t"})


def test_resume_config_refuses_changes_that_would_alter_the_run(tmp_path: Path) -> None:
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml(cfg.resolve("seg", CONFIGS / "tiny-seg.yaml")))
    kept = cfg.resume_config(saved, "seg", None, {"data": {"cache_dir": "/elsewhere"}})
    assert kept["data"]["cache_dir"] == "/elsewhere" and kept["optim"]["epochs"] == 6
    assert cfg.resume_config(saved, "seg", CONFIGS / "tiny-seg.yaml")["optim"]["epochs"] == 6
    with pytest.raises(ConfigError, match=r"cannot change optim\.lr"):
        cfg.resume_config(saved, "seg", None, {"optim": {"lr": 0.1}})


def test_positive_share_schedule_is_interpolated_over_epochs() -> None:
    c = cfg.resolve("seg", None, {"optim": {"epochs": 5}, "sampling": {"positive_share": [0.8, 0.6, 0.4]}})
    assert [round(cfg.positive_share(c, e), 6) for e in range(5)] == [0.8, 0.7, 0.6, 0.5, 0.4]


def test_sampler_takes_every_positive_and_the_share_of_negatives() -> None:
    positive = np.array([True] * 20 + [False] * 80)
    for share, n_neg in ((0.8, 5), (0.5, 20), (0.2, 80)):
        idx = epoch_indices(positive, share, seed=3, epoch=1)
        assert len(set(idx)) == len(idx) == 20 + n_neg
        assert positive[idx].sum() == 20
    assert sorted(epoch_indices(positive, None, 3, 0)) == list(range(100))
    a, b = epoch_indices(positive, 0.5, 3, 0), epoch_indices(positive, 0.5, 3, 1)
    assert not np.array_equal(a, b) and np.array_equal(a, epoch_indices(positive, 0.5, 3, 0))


def test_distributed_sampler_ranks_are_disjoint_and_cover_the_epoch() -> None:
    positive = np.array([True] * 7 + [False] * 30)
    ranks = [PositiveShareSampler(positive, [0.5, 0.4], seed=1, rank=r, world_size=3) for r in range(3)]
    for s in ranks:
        s.set_epoch(1)
    parts = [list(s) for s in ranks]
    whole = epoch_indices(positive, 0.4, 1, 1)
    assert len({len(p) for p in parts}) == 1
    assert set().union(*parts) == set(whole.tolist())
    assert sum(len(p) for p in parts) - len(whole) < 3  # padding only to equalise ranks


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    values = [lr_factor(p, epochs=10, warmup=1.0, min_ratio=0.1) for p in np.linspace(0, 10, 101)]
    peak = int(np.argmax(values))
    assert values[0] < 0.01 and peak == 10 and values[peak] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1 :]))
    assert values[-1] == pytest.approx(0.1)


def test_combo_loss_terms() -> None:
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, 2:5, 2:5] = 1
    perfect = (target * 2 - 1) * 20
    assert soft_dice_loss(perfect, target).item() < 1e-3
    assert soft_dice_loss(-perfect, target).item() > 0.5
    loss = ComboLoss(bce=1.0, dice=1.0, focal=2.0)
    worse, better = loss(torch.zeros_like(target), target), loss(perfect, target)
    assert better < worse and torch.isfinite(worse)
    cls = ComboLoss(bce=0.0, focal=1.0)(torch.tensor([3.0, -3.0]), torch.tensor([1.0, 0.0]))
    assert 0 < cls.item() < ComboLoss()(torch.tensor([3.0, -3.0]), torch.tensor([1.0, 0.0])).item()


def test_pretrained_file_fills_the_backbone_and_sums_rgb_into_one_channel(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    rgb = timm.create_model("test_resnet", pretrained=False, in_chans=3, num_classes=1000)
    path = tmp_path / "rgb.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in rgb.state_dict().items()}, str(path))
    config = cfg.resolve("cls", CONFIGS / "tiny-cls.yaml")
    model = build_model({"stage": "cls", "in_chans": 1, **config["network"]})
    head_before = model.backbone.get_classifier().weight.clone()
    n = load_pretrained(model, config, str(path))
    first = next(k for k, v in rgb.state_dict().items() if v.ndim == 4)
    assert n > 10
    assert torch.equal(model.backbone.state_dict()[first], rgb.state_dict()[first].sum(1, keepdim=True))
    assert torch.equal(model.backbone.get_classifier().weight, head_before)  # the 1000-class head is not used
    torch.save({"state_dict": rgb.state_dict()}, tmp_path / "rgb.pt")
    assert load_pretrained(model, config, str(tmp_path / "rgb.pt")) == n


def test_pretrained_fills_a_segmenter_encoder_and_rejects_a_wrong_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    config = cfg.resolve("seg", CONFIGS / "tiny-seg.yaml")
    source = build_model({"stage": "seg", "in_chans": 1, **config["network"]})
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    model = build_model({"stage": "seg", "in_chans": 1, **config["network"]})
    load_pretrained(model, config, str(tmp_path / "enc.safetensors"))
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v)
    save_file({"unrelated.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match=r"other\.safetensors: no weights for"):
        load_pretrained(model, config, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="no such weights file"):
        load_pretrained(model, config, str(tmp_path / "absent.safetensors"))


@pytest.mark.parametrize("encoder", ["resnet18", "tu-resnet18"])
@pytest.mark.parametrize("naming", ["smp", "timm"])
def test_a_local_imagenet_style_file_fills_smp_and_timm_encoders_through_pretrained_path(
    tmp_path: Path, encoder: str, naming: str
) -> None:
    """``--pretrained PATH`` (what ``start_weights`` calls for a new run) with the two namings of a downloaded
    ImageNet ResNet: smp's encoder file (torchvision names, ``conv1``/``layer1.0.conv1``, no ``fc``: what
    ``--pretrained imagenet`` fetches for ``resnet34``) and a timm checkpoint (the same names plus its 1000-class
    ``fc`` head), into an smp encoder (``resnet18``) and a timm one wrapped by smp (``tu-resnet18``, tensors under
    ``model.``); the RGB first convolution is summed to our one channel, every other tensor copied exactly."""
    import segmentation_models_pytorch as smp
    import timm
    from safetensors.torch import save_file

    from cascade.stages.training import start_weights

    torch.manual_seed(1)
    if naming == "smp":
        source = smp.encoders.get_encoder("resnet18", in_channels=3, weights=None).state_dict()
    else:
        source = timm.create_model("resnet18", pretrained=False, num_classes=1000).state_dict()
        assert "fc.weight" in source
    path = tmp_path / f"resnet18-{naming}.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    config = cfg.resolve("seg", CONFIGS / "tiny-seg.yaml", {"network": {"encoder": encoder}})
    model = build_model({"stage": "seg", "in_chans": 1, **config["network"]})
    start_weights(model, config, str(path), report=False, warn=False)
    loaded = {k.removeprefix("model."): v for k, v in model.encoder.state_dict().items()}
    assert set(loaded) <= set(source)  # the names met; nothing of the encoder is left as built
    assert torch.equal(loaded["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    for name, value in loaded.items():
        if name != "conv1.weight":
            assert torch.equal(value, source[name]), name


def test_pretrained_hub_name_fails_at_once_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = cfg.resolve("cls", CONFIGS / "tiny-cls.yaml")
    model = build_model({"stage": "cls", "in_chans": 1, **config["network"]})
    with pytest.raises(ModelError, match=r"--pretrained imagenet: cannot fetch hub weights .* offline"):
        load_pretrained(model, config, "imagenet")


def test_an_all_empty_segmenter_is_never_the_best_checkpoint() -> None:
    from cascade.stages.trainer import selection_score

    empty = {"val_mean_dice_area": 0.6, "val_dice_pos": 0.0}  # predicts nothing: scores the all-empty baseline
    learning = {"val_mean_dice_area": 0.4, "val_dice_pos": 0.3}
    assert math.isnan(selection_score("seg", empty))
    assert selection_score("seg", learning) == 0.4
    assert selection_score("cls", {"val_auc": 0.7}) == 0.7


def test_pretrained_hub_name_fails_at_once_when_the_hub_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as s:  # a loopback port nobody listens on: the connection is refused, like no network
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    config = cfg.resolve("cls", CONFIGS / "tiny-cls.yaml")
    model = build_model({"stage": "cls", "in_chans": 1, **config["network"]})
    start = time.monotonic()
    with pytest.raises(ModelError, match=r"--pretrained imagenet: .* the hub is unreachable .* --pretrained PATH"):
        load_pretrained(model, config, "imagenet")
    assert time.monotonic() - start < 10


def test_loader_workers_never_exceed_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade.stages.trainer import loader_workers

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers({"workers": 8, "cache": True}) == 1  # one core left to the training step
    assert loader_workers({"workers": 8, "cache": False}) == 2  # decoding every epoch: all cores
    assert loader_workers({"workers": 0, "cache": True}) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert loader_workers({"workers": 8, "cache": True}) == 8


def test_a_collapsing_segmenter_is_named_after_three_empty_epochs_only() -> None:
    from cascade.stages.trainer import collapse_warning

    def rows(*dices: float) -> list[dict]:
        return [{"val_dice_pos": d} for d in dices]

    assert collapse_warning("seg", rows(0.3, 0.01, 0.0)) is None  # two epochs are not yet a collapse
    assert collapse_warning("seg", rows(0.0, 0.05, 0.0, 0.0)) is None  # learning in between
    message = collapse_warning("seg", rows(0.2, 0.016, 0.0, 0.0))
    assert message is not None and "0.016, 0.000, 0.000" in message
    assert "optim.lr" in message and "sampling.positive_share" in message and "loss.dice" in message
    assert collapse_warning("cls", rows(0.0, 0.0, 0.0)) is None


def test_init_from_an_untrained_segmenter_warns_loudly(tmp_path: Path) -> None:
    from cascade.stages.weights import untrained_warning

    assert untrained_warning({"metrics": {"val_dice_pos": 0.23}}, tmp_path) is None
    assert untrained_warning({"metrics": {}}, tmp_path) is None  # a stage folder without metrics: nothing to judge
    message = untrained_warning({"metrics": {"val_dice_pos": 0.004}}, tmp_path)
    assert message is not None and "0.004" in message and str(tmp_path) in message


def test_combo_loss_is_the_weighted_sum_of_hand_computed_terms() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 6, 6), (torch.rand(2, 1, 6, 6) > 0.6).float()
    p = torch.sigmoid(logits)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    dice = 1 - ((2 * (p * target).flatten(1).sum(1) + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)).mean()
    p_t = torch.where(target > 0, p, 1 - p)
    focal = ((1 - p_t) ** 3.0 * bce).mean()
    expected = 0.7 * bce.mean() + 1.3 * dice + 2.5 * focal
    got = ComboLoss(bce=0.7, dice=1.3, focal=2.5, focal_gamma=3.0)(logits, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)  # a loss ignoring a weight or a term fails
    assert ComboLoss(bce=0.0, dice=1.0)(logits, target).item() == pytest.approx(dice.item(), rel=1e-5)


def test_resolve_amp_follows_the_mode_and_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade.errors import ConfigError
    from cascade.stages import training

    cpu = torch.device("cpu")
    assert training.resolve_amp("none", cpu) is None
    assert training.resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        training.resolve_amp("fp16", cpu)
    monkeypatch.setattr(training, "cpu_supports_bf16", lambda: True)
    assert training.resolve_amp("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(training, "cpu_supports_bf16", lambda: False)
    assert training.resolve_amp("auto", cpu) is None  # bf16 emulated in software is slower than fp32


def test_the_recipe_sets_only_what_is_auto_and_by_the_size_of_the_data() -> None:
    seg = cfg.resolve("seg")
    assert seg["optim"]["lr"] == cfg.AUTO and seg["sampling"]["positive_share"] == cfg.AUTO
    small, line = cfg.apply_recipe(seg, 480)
    assert (small["optim"]["lr"], small["optim"]["batch_size"], small["sampling"]["positive_share"]) == (
        3e-4, 8, [0.8, 0.5])
    assert line is not None and "small data (480 training images < 2000)" in line and "optim.lr 0.0003" in line
    large, _ = cfg.apply_recipe(seg, cfg.SMALL_DATA)
    assert (large["optim"]["lr"], large["optim"]["batch_size"], large["sampling"]["positive_share"]) == (
        3e-4, 16, [0.8, 0.4])
    small["sampling"]["positive_share"].append(0.1)  # a run's configuration is its own: the recipe is unchanged
    assert cfg.apply_recipe(seg, 480)[0]["sampling"]["positive_share"] == [0.8, 0.5]
    given = cfg.resolve("seg", None, {"optim": {"lr": 0.01}})  # a value given by the user is never replaced
    chosen, line = cfg.apply_recipe(given, 480)
    assert chosen["optim"]["lr"] == 0.01 and chosen["optim"]["batch_size"] == 8 and "optim.lr" not in line
    cls, line = cfg.apply_recipe(cfg.resolve("cls"), 480)
    assert cls["sampling"]["positive_share"] is None  # the classifier sees every image each epoch
    assert cls["optim"]["lr"] == 1e-3 and "optim.lr 0.001" in line  # the small recipe's rate differs by stage
    assert cfg.apply_recipe(cfg.resolve("cls"), cfg.SMALL_DATA)[0]["optim"]["lr"] == 3e-4
    assert cfg.apply_recipe(cfg.resolve("seg", CONFIGS / "tiny-seg.yaml"), 480)[1] is None
    with pytest.raises(ConfigError, match=r"optim\.lr must be auto or a number"):
        cfg.resolve("seg", None, {"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"optim\.batch_size must be auto or an integer"):
        cfg.resolve("seg", None, {"optim": {"batch_size": 2.5}})


def test_mask_head_trains_on_the_pooled_mask_and_is_never_saved() -> None:
    from cascade.stages.losses import MaskAuxLoss

    torch.manual_seed(0)
    model = build_model({"stage": "cls", "model": "resnet18", "in_chans": 1}).add_mask_head()
    x = torch.randn(2, 1, 64, 64)
    logits, mask_logits = model.train()(x)
    assert logits.shape == (2,) and mask_logits.shape == (2, 1, 2, 2)  # stride 32: a 2x2 grid at 64 px
    assert model.eval()(x).shape == (2,)  # eval mode: an ordinary classifier
    saved = model.deployable().state_dict()
    assert not any(k.startswith("mask_head") for k in saved) and len(saved) == len(model.state_dict()) - 2
    labels, masks = torch.tensor([1.0, 0.0]), torch.zeros(2, 1, 64, 64)
    masks[0, 0, 40:42, 5:7] = 1  # one lesion in the bottom-left cell only
    cells = torch.tensor([[[[0.0, 0.0], [1.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    expected = ComboLoss()(logits, labels) + 0.5 * ComboLoss(bce=1.0, dice=1.0, dice_per="batch")(mask_logits, cells)
    got = MaskAuxLoss(ComboLoss(), 0.5)((logits, mask_logits), (labels, masks))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert MaskAuxLoss(ComboLoss(), 0.5)(logits, (labels, masks)).item() == pytest.approx(
        ComboLoss()(logits, labels).item())
    with pytest.raises(ConfigError, match="loss.mask .* classifier only"):
        cfg.resolve("seg", None, {"loss": {"mask": 1.0}})


def test_a_classifier_run_saved_before_the_mask_loss_resumes_without_it(tmp_path: Path) -> None:
    old = cfg.resolve("cls", CONFIGS / "tiny-cls.yaml")
    del old["loss"]["mask"]
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml(old))
    assert cfg.resume_config(saved, "cls")["loss"]["mask"] == 0.0
    assert cfg.resolve("cls")["loss"]["mask"] == 1.0


def test_each_stage_spec_is_the_one_source_of_its_defaults_and_validation_metrics() -> None:
    from cascade.stages.specs import SPECS, stage_spec
    from cascade.stages.trainer import validation_metrics

    truth = {"cls": torch.tensor([1.0, 0.0, 1.0, 0.0]), "seg": torch.zeros(4, 1, 8, 8)}
    truth["seg"][0, 0, 2:5, 2:5] = 1.0
    truth["seg"][2, 0, 0:3, 0:8] = 1.0
    for code, spec in SPECS.items():
        assert stage_spec(code) is spec and cfg.resolve(code)["network"] == spec.defaults["network"]
        network = {"cls": {"model": "test_resnet"}, "seg": {"encoder": "tu-test_resnet"}}[code]
        model = build_model({"stage": code, "in_chans": 1, **{**spec.defaults["network"], **network}})
        backbone, head = spec.backbone(model)  # what --pretrained fills and freezing freezes: part of the model
        assert {id(p) for p in backbone.parameters()} <= {id(p) for p in model.parameters()}
        heads = sorted(n for n, _ in backbone.named_parameters() if head and n.startswith(head))
        assert heads == (["fc.bias", "fc.weight"] if code == "cls" else [])  # left as built: the classifier's fc
        y = truth[code]
        perfect = torch.where(y > 0.5, 6.0, -6.0)  # logits that say exactly the truth
        stats = {"loss": np.zeros(1), **spec.batch_stats(perfect, y)}
        assert validation_metrics(code, stats, len(y))[spec.best_key] == 1.0
        wrong = {"loss": np.zeros(1), **spec.batch_stats(-perfect, y)}
        assert validation_metrics(code, wrong, len(y))[spec.best_key] <= 0.5  # no better than drawing nothing
    with pytest.raises(ModelError, match="stage 'det' is not one of 'cls', 'seg'"):
        stage_spec("det")


def test_a_saved_classifier_config_without_a_network_name_still_loads_as_resnet18() -> None:
    """The training default (resnet34) and what a config.json lacking ``model`` means (resnet18, as ever) differ on
    purpose: a folder written before keeps loading the network it was saved from."""
    assert cfg.defaults("cls")["network"]["model"] == "resnet34"
    assert build_model({"stage": "cls"}).backbone.pretrained_cfg["architecture"] == "resnet18"


def test_batch_dice_charges_a_false_positive_by_the_batch_lesion_area_not_the_whole_image() -> None:
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, :4, :4] = 1  # image 0: a 16-pixel lesion; image 1: negative
    logits = torch.full((2, 1, 8, 8), -20.0)
    logits[0, 0, :4, :4] = 20.0  # the lesion found exactly ...
    logits[1, 0, 0, 0] = 20.0  # ... and one false-positive pixel on the negative image
    per_image = soft_dice_loss(logits, target)
    per_batch = soft_dice_loss(logits, target, per="batch")
    assert per_image.item() == pytest.approx((0 + (1 - 1 / 2)) / 2, abs=1e-4)  # the negative's term: 1 - 1/(1+1)
    assert per_batch.item() == pytest.approx(1 - 33 / 34, abs=1e-4)  # (2·16 + 1) / (17 + 16 + 1)
    assert ComboLoss(bce=0.0, dice=1.0, dice_per="batch")(logits, target).item() == pytest.approx(per_batch.item())
    assert cfg.resolve("seg")["loss"]["dice_per"] == "batch"
    shipped = cfg.resolve("seg", CONFIGS / "seg-unet-resnet34-512.yaml")
    assert shipped["loss"]["dice_per"] == "image"  # the shipped, measured configurations keep their loss


def test_best_min_area_empties_small_predictions_where_that_raises_mean_dice() -> None:
    from cascade.thresholds.metrics import best_min_area

    # image: 0 positive found (area 50), 1 positive missed by a 3-pixel blob, 2-3 negatives with 2 and 4 stray pixels
    inter, pred, area = [40, 0, 0, 0], [50, 3, 2, 4], [50, 60, 0, 0]
    score, minimum = best_min_area(inter, pred, area)
    assert minimum == 5 and score == pytest.approx((0.8 + 0 + 1 + 1) / 4)  # strays gone, the hit kept
    assert best_min_area([10], [10], [10]) == (1.0, 0)  # nothing to gain: keep every prediction (minimum 0)
    assert best_min_area([0, 0], [0, 900], [0, 0]) == (1.0, 901)


@pytest.mark.parametrize("arch", ["unet", "fpn", "deeplabv3plus"])
def test_a_new_segmenter_starts_at_the_foreground_prior_and_an_old_run_resumes_without_it(
        arch: str, tmp_path: Path) -> None:
    from cascade.stages.trainer import build_training_model, network_config

    config = cfg.resolve("seg", None, {"network": {"arch": arch, "encoder": "tu-test_resnet"}})
    assert config["network"]["prior"] == 0.01 and config["runtime"]["ema"] == 0.99  # the segmenter's defaults
    assert cfg.resolve("cls")["runtime"]["ema"] == 0.0 and "prior" not in cfg.resolve("cls")["network"]
    torch.manual_seed(0)
    probs = torch.sigmoid(build_training_model(config).eval()(torch.randn(2, 1, 64, 64)).detach())
    assert 0.002 < probs.median().item() < 0.05  # every pixel near 0.01, not smp's 0.5
    torch.manual_seed(0)
    plain = torch.sigmoid(build_training_model({**config, "network": {**config["network"], "prior": None}}).eval()(
        torch.randn(2, 1, 64, 64)).detach())
    assert plain.median().item() > 0.2  # null: smp's own start
    assert "prior" not in network_config(config)  # training only: config.json describes the network
    old = {**config, "network": {k: v for k, v in config["network"].items() if k != "prior"}}
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml(old))
    assert cfg.resume_config(saved, "seg")["network"]["prior"] is None  # trained before the key: as it ran then
    with pytest.raises(ConfigError, match=r"network.prior must be a probability in \(0, 1\), or null, got 1.0"):
        cfg.resolve("seg", None, {"network": {"prior": 1.0}})
