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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cascade.errors import ModelError

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")


def target_module(model: nn.Module, stage: str) -> tuple[nn.Module, tuple[str, ...]]:
    """The part of ``model`` that pretrained weights fill, and the name prefixes of its head (left as built)."""
    if stage == "cls":
        backbone = model.backbone
        head = backbone.pretrained_cfg.get("classifier", "fc")
        heads = head if isinstance(head, (list, tuple)) else (head,)
        return backbone, tuple(f"{h}." for h in heads)
    return model.encoder, ()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a weights-only torch file (unwrapping ``state_dict``/``model``)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad or unsafe file; all mean "not usable"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(f"{path}: not a weights-only torch state dict ({first})") from None
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


def hub_state_dict(config: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """Hub weights ``name`` for the network in ``config``, or ModelError at once when offline."""
    model_name = config["network"]["model"] if config["stage"] == "cls" else config["network"]["encoder"]
    hint = "download the weights on a connected machine and pass --pretrained PATH to the file"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("CASCADE_OFFLINE"):
        raise ModelError(
            f"--pretrained {name}: cannot fetch hub weights for {model_name} offline (HF_HUB_OFFLINE); {hint}"
        )
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
    target, head = target_module(model, config["stage"])
    if path.is_file():
        state, origin = read_state_dict(path), str(path)
    elif path.suffix in (".safetensors", ".pt", ".pth", ".bin") or os.sep in source:
        raise ModelError(f"{source}: no such weights file")
    else:
        state, origin = hub_state_dict(config, source), f"--pretrained {source}"
    adapted = adapt_state_dict(state, target, head, origin)
    target.load_state_dict(adapted, strict=False)
    return len(adapted)
