"""Stage folders: ``model.safetensors`` (weights) + ``config.json`` (everything needed to rebuild the network).

Nothing here unpickles: weights are safetensors and metadata is JSON, so a model folder can never run code.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cascade.errors import CascadeError, ModelError
from cascade.fileio import atomic_path, atomic_write_json, read_json_object
from cascade.stages.classifier import build_classifier
from cascade.stages.segmenter import build_segmenter

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build the network of either stage from its config (``config["stage"]`` is ``"cls"`` or ``"seg"``)."""
    stage = config.get("stage")
    if stage == "cls":
        return build_classifier(config)
    if stage == "seg":
        return build_segmenter(config)
    raise ModelError(f"config has stage {stage!r}; expected 'cls' or 'seg'")


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU, contiguous, unshared copy of the model's state dict (what safetensors requires)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_stage(directory: str | os.PathLike[str], model: nn.Module, config: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``, each atomically."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state_for_saving(model), str(tmp), metadata={"format": "pt", "stage": str(config.get("stage"))})
    atomic_write_json(out / CONFIG, config)


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a stage folder's ``config.json`` with a clear error when missing or malformed."""
    return read_json_object(Path(directory) / CONFIG, f"a stage folder needs {CONFIG} and {WEIGHTS}")


def load_stage(directory: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a stage's network from ``config.json`` and load ``model.safetensors`` into it (strictly)."""
    config = read_config(directory)
    path = Path(directory) / WEIGHTS
    try:
        model = build_model(config)
    except CascadeError as err:
        raise ModelError(f"{Path(directory) / CONFIG}: {err}") from None
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ModelError(f"{path}: weights do not fit the network in {CONFIG} ({first})") from None
    return model.eval(), config


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
