"""Starting weights for a stage's backbone (classifier) or encoder (segmenter).

``--pretrained PATH`` loads a local state dict — safetensors, or a torch file read with ``weights_only=True`` — into
the backbone/encoder: tensors are matched by name (common wrapper prefixes such as ``module.`` are removed), a
3-channel first convolution is adapted to our single channel by summing over its input channels (a grey image
replicated to RGB gives the same activations), and the source's own classification head is ignored.
``--pretrained NAME`` asks timm (classifier: a pretrained tag such as ``a1_in1k``) or smp (segmenter: an encoder
weight name such as ``imagenet``) for hub weights; offline it fails at once with a message saying what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cascade.errors import ConfigError, ModelError
from cascade.stages.checkpoint import CONFIG, WEIGHTS, load_stage, load_weights_only, read_config
from cascade.stages.gate import SharedEncoderGate, encoder_sha256
from cascade.stages.specs import SPECS, stage_spec
from cascade.storage.fileio import input_file
from cascade.storage.rundir import best_stage

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a weights-only torch file (unwrapping ``state_dict``/``model``)."""
    input_file(path, ModelError)  # stat first: a FIFO would block the read
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(f"{path}: not a readable safetensors file ({err})") from None
    obj: Any = load_weights_only(path, "weights-only torch state dict")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: expected a mapping of tensor names to tensors")
    return obj


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def adapt_state_dict(
    source: dict[str, torch.Tensor], target: nn.Module, head: tuple[str, ...], origin: str
) -> dict[str, torch.Tensor]:
    """``source`` renamed and reshaped to fit ``target``; raises ModelError when a non-head tensor is missing.

    Names are compared with wrapper prefixes removed on both sides (an smp ``tu-`` encoder nests timm in ``model.``).
    """
    wanted = target.state_dict()
    by_name = {_strip(k): v for k, v in source.items()}
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name, ref in wanted.items():
        if name.startswith(head):
            continue
        value = by_name.get(_strip(name))
        if value is None:
            missing.append(name)
            continue
        if value.ndim == 4 and ref.ndim == 4 and value.shape[1] == 3 and ref.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != ref.shape:
            raise ModelError(
                f"{origin}: tensor {name!r} has shape {tuple(value.shape)}, the network needs {tuple(ref.shape)}"
            )
        out[name] = value.to(ref.dtype)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelError(f"{origin}: no weights for {shown} (is it the same architecture?)")
    return out


HUB_PROBE_SECONDS = 3.0
"""How long to wait for the weight hub to answer a connection before calling it unreachable."""


def _hub_reachable() -> bool:
    """Whether a TCP connection to the weight hub opens within ``HUB_PROBE_SECONDS``: without this check an offline
    machine spends half a minute in the hub client's retries before failing."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def hub_state_dict(config: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """Hub weights ``name`` for the network in ``config``, or ModelError at once when offline."""
    model_name = config["network"][stage_spec(config["stage"]).backbone_key]
    hint = "download the weights on a connected machine and pass --pretrained PATH to the file"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("CASCADE_OFFLINE"):
        raise ModelError(
            f"--pretrained {name}: cannot fetch hub weights for {model_name} offline (HF_HUB_OFFLINE); {hint}"
        )
    if not _hub_reachable():
        raise ModelError(f"--pretrained {name}: cannot fetch hub weights for {model_name}: the hub is unreachable "
                         f"(no network?); {hint}")
    try:
        if config["stage"] == "cls":
            import timm

            return timm.create_model(f"{model_name}.{name}", pretrained=True).state_dict()
        import segmentation_models_pytorch as smp

        return smp.encoders.get_encoder(model_name, in_channels=3, weights=name).state_dict()
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(f"--pretrained {name}: cannot get hub weights for {model_name} ({first}); {hint}") from None


def load_pretrained(model: nn.Module, config: dict[str, Any], source: str) -> int:
    """Fill the backbone/encoder of ``model`` from a file path or a hub name; returns the number of tensors set."""
    path = Path(source).expanduser()
    target, head = stage_spec(config["stage"]).backbone(model)
    if path.is_file():
        state, origin = read_state_dict(path), str(path)
    elif path.suffix in (".safetensors", ".pt", ".pth", ".bin") or os.sep in source:
        raise ModelError(f"{source}: no such weights file")
    else:
        state, origin = hub_state_dict(config, source), f"--pretrained {source}"
    adapted = adapt_state_dict(state, target, head, origin)
    target.load_state_dict(adapted, strict=False)
    return len(adapted)


# ------------------------------------------------------------------------------------- --init-from a segmenter run


def timm_name_of_encoder(encoder: str) -> str:
    """The timm architecture of an smp encoder: ``tu-NAME`` is timm ``NAME``; smp's own encoders keep their name
    (smp's ``resnet*``/``resnext*`` are torchvision ResNets, whose weight names equal timm's)."""
    return encoder.removeprefix("tu-")


def _base_name(model: str) -> str:
    """A timm model name without its pretrained tag (``resnet18.a1_in1k`` -> ``resnet18``)."""
    return model.split(".", 1)[0]


def segmenter_stage_dir(source: str | os.PathLike[str]) -> Path:
    """The stage folder that ``--init-from`` reads: ``RUN_DIR/best`` of a training run, or a stage folder itself
    (``model.safetensors`` + ``config.json``, such as ``MODEL_DIR/segmenter``)."""
    path = Path(source).expanduser()
    for candidate in (best_stage(path), path):
        if (candidate / CONFIG).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    raise ModelError(
        f"{source}: not a training run (no best/config.json and best/model.safetensors); "
        "--init-from needs a finished segmenter run (cascade train --stage seg)"
    )


def _backbone_name_in_encoder(name: str, encoder: dict[str, torch.Tensor]) -> str | None:
    """The encoder tensor holding backbone tensor ``name``: the same name, or — timm's ``features_only`` wrapper
    flattens top-level ``nn.Sequential`` children — ``a_b.rest`` for ``a.b.rest`` (``stem.0.weight`` ->
    ``stem_0.weight`` in ConvNeXt)."""
    if name in encoder:
        return name
    head, _, rest = name.partition(".")
    flat = head + "_" + rest
    return flat if "." in rest and flat in encoder else None


@dataclass(frozen=True)
class InitReport:
    """What ``--init-from`` did: the stage folder read, how many backbone tensors it set, and the backbone tensors
    besides the head left as built (layers timm puts after the last feature stage, e.g. EfficientNet's
    ``conv_head``/``bn2``: a segmentation encoder stops before them)."""

    source: Path
    loaded: int
    left: tuple[str, ...]
    warning: str | None = None
    """Set when the segmenter never learned (:func:`untrained_warning`)."""
    shared: bool = False
    """A shared-encoder gate: the encoder is the segmenter's, frozen, and only the head trains."""

    def describe(self) -> str:
        if self.shared:
            return (f"--init-from {self.source}: shared-encoder gate: a new head reads the segmenter's encoder "
                    f"({self.loaded} tensors, frozen) and learns from the labels and the segmenter's own maps")
        left = f"; also new (after the encoder's last stage): {', '.join(self.left)}" if self.left else ""
        return (
            f"--init-from {self.source}: {self.loaded} backbone tensors loaded from the segmenter's encoder, "
            f"the head is new{left}"
        )


def encoder_to_backbone(
    encoder: dict[str, torch.Tensor], backbone: nn.Module, head: tuple[str, ...], origin: str
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Map a segmenter encoder's tensors onto a classifier backbone by name, exactly (no reshaping).

    Every encoder tensor must find its place and keep its shape, and the backbone tensors without a source must be
    the head or a tail after the last mapped tensor (layers past the last feature stage); anything else means the
    two networks are not the same architecture, and ModelError says which tensor differs.
    ``encoder`` is named as the timm model names its own tensors (an smp ``tu-`` encoder's ``model.`` removed).
    Returns the tensors to load and the non-head backbone names left as built.
    """
    source = encoder
    wanted = backbone.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    unmatched: list[str] = []
    for name, ref in wanted.items():
        if name.startswith(head):
            continue
        key = _backbone_name_in_encoder(name, source)
        if key is None:
            unmatched.append(name)
            continue
        if source[key].shape != ref.shape:
            raise ModelError(
                f"{origin}: encoder tensor {key!r} has shape {tuple(source[key].shape)}, "
                f"the classifier's {name!r} needs {tuple(ref.shape)}"
            )
        if unmatched:
            raise ModelError(f"{origin}: the classifier's {unmatched[0]!r} has no tensor in the segmenter's encoder")
        mapped[name] = source[key].to(ref.dtype)
        used.add(key)
    unused = [k for k in source if k not in used]
    if unused:
        raise ModelError(
            f"{origin}: the encoder's {unused[0]!r} (and {len(unused) - 1} more) has no place in the classifier"
        )
    return mapped, tuple(unmatched)


def init_source(config: dict[str, Any]) -> Path:
    """The segmenter stage folder named by ``network.init_from``, checked to be a segmenter whose encoder is the
    classifier's timm architecture (cheap: reads ``config.json`` only, so a run fails before any work)."""
    source = config["network"]["init_from"]
    stage_dir = segmenter_stage_dir(source)
    seg = read_config(stage_dir)
    origin = f"--init-from {source}"
    if seg.get("stage") != "seg":
        raise ModelError(
            f"{origin}: a {seg.get('stage')!r} run; --init-from needs a segmenter run (cascade train --stage seg)"
        )
    encoder = str(seg.get("encoder", ""))
    timm_name, model_name = timm_name_of_encoder(encoder), str(config["network"]["model"])
    if _base_name(timm_name) != _base_name(model_name):
        raise ModelError(
            f"{origin}: the segmenter's encoder {encoder!r} is timm {timm_name!r} but the classifier is "
            f"{model_name!r}; the architectures must match (train the classifier with --encoder {timm_name})"
        )
    return stage_dir


def init_from_segmenter(model: nn.Module, config: dict[str, Any]) -> InitReport:
    """Fill the classifier's backbone from the encoder of the segmenter run in ``network.init_from`` (its
    ``best/``); ModelError naming both networks when they are not the same architecture."""
    stage_dir = init_source(config)
    weights = stage_dir / WEIGHTS
    encoder = str(read_config(stage_dir)["encoder"])
    prefix = "encoder.model." if encoder.startswith("tu-") else "encoder."
    state = read_state_dict(weights)
    encoder_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder_state:
        raise ModelError(f"{weights}: no {prefix}* tensors (is it the weights of a segmenter with encoder {encoder}?)")
    backbone, head = SPECS["cls"].backbone(model)
    names = f"{encoder} -> {config['network']['model']}"
    mapped, left = encoder_to_backbone(encoder_state, backbone, head, f"--init-from {stage_dir} ({names})")
    backbone.load_state_dict(mapped, strict=False)
    return InitReport(stage_dir, len(mapped), left, untrained_warning(read_config(stage_dir), stage_dir))


def resolve_gate(config: dict[str, Any]) -> tuple[dict[str, Any], tuple[nn.Module, dict[str, Any]] | None]:
    """A new classifier run's ``network.gate`` made concrete: ``auto`` → ``shared`` when ``--init-from`` names a
    segmenter run, else ``separate``. A shared gate records the segmenter it reads (``network.shared_encoder``: arch,
    encoder and the encoder's sha256), takes the segmenter's preprocessing (it reads the segmenter's input) and has no
    auxiliary mask head (``loss.mask`` 0); a separate classifier ``--init-from`` must be the encoder's architecture
    (:func:`init_source`). Returns the configuration and, for a shared gate, the segmenter member it read (network and
    ``config.json``, loaded once: what :func:`attach_segmenter_run` attaches)."""
    if config["stage"] != "cls":
        return config, None
    network = config["network"]
    gate = network["gate"]
    if gate == "auto":
        gate = "shared" if network.get("init_from") else "separate"
    out = {**config, "network": {**network, "gate": gate}}
    if gate == "separate":
        if network.get("init_from"):
            init_source(out)
        return out, None
    if not network.get("init_from"):
        raise ConfigError("network.gate shared reads a segmenter's encoder: give --init-from SEG_RUN_DIR")
    stage_dir = segmenter_stage_dir(network["init_from"])
    seg, seg_config = load_stage(stage_dir)
    if seg_config.get("stage") != "seg":
        raise ModelError(f"--init-from {network['init_from']}: a {seg_config.get('stage')!r} run; --init-from needs a "
                         "segmenter run (cascade train --stage seg)")
    out["network"]["shared_encoder"] = {"arch": str(seg_config["arch"]), "encoder": str(seg_config["encoder"]),
                                        "sha256": encoder_sha256(seg.encoder)}
    out["preprocessing"] = dict(seg_config["preprocessing"])
    out["loss"] = {**config["loss"], "mask": 0.0}
    return out, (seg, seg_config)


def attach_segmenter_run(gate: SharedEncoderGate, segmenter: tuple[nn.Module, dict[str, Any]],
                         config: dict[str, Any]) -> InitReport:
    """Attach the ``--init-from`` segmenter member that :func:`resolve_gate` read (and hashed) to a new shared-encoder
    gate."""
    stage_dir = segmenter_stage_dir(config["network"]["init_from"])
    seg, seg_config = segmenter
    gate.attach(seg, check=False)
    return InitReport(stage_dir, len(seg.encoder.state_dict()), (), untrained_warning(seg_config, stage_dir),
                      shared=True)


UNTRAINED_DICE = 0.02
"""A segmenter whose best Dice on the validation positives is under this learned nothing its encoder could pass on."""


def untrained_warning(seg_config: dict[str, Any], stage_dir: Path) -> str | None:
    """The warning for an ``--init-from`` source whose best checkpoint found (almost) nothing on the validation
    positives: its encoder holds no pneumothorax features, so the classifier starts as if from scratch."""
    dice = seg_config.get("metrics", {}).get("val_dice_pos")
    if not isinstance(dice, (int, float)) or dice >= UNTRAINED_DICE:
        return None
    return (
        f"--init-from {stage_dir}: this segmenter's Dice on the validation positives is {dice:.3f}: it learned "
        "(almost) nothing, so its encoder gives the classifier no head start; train the segmenter until it draws "
        "masks (see its metrics.csv) before starting a classifier from it"
    )


def set_backbone_trainable(model: nn.Module, stage: str, trainable: bool) -> int:
    """Freeze (``trainable=False``) or unfreeze the backbone/encoder's parameters, never the head; returns how many
    parameter tensors changed. Frozen parameters get no gradient, so AdamW leaves them (and their moments) exactly
    as they are and backward skips their layers; BatchNorm running statistics still follow the data."""
    target, head = stage_spec(stage).backbone(model)
    changed = 0
    for name, param in target.named_parameters():
        if not name.startswith(head) and param.requires_grad != trainable:
            param.requires_grad_(trainable)
            changed += 1
    return changed
