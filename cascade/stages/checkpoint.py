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
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import nn

from cascade.data.preprocess import Preprocessing
from cascade.errors import CascadeError, ModelError
from cascade.stages.specs import SPECS, stage_spec
from cascade.storage.fileio import atomic_path, atomic_write_json, input_file, path_kind, read_json_object

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build the network of either stage from its config (``config["stage"]`` names its :data:`SPECS` entry)."""
    return stage_spec(config.get("stage")).build(config)


def stored_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a stage folder holds: the state dict, or a shared-encoder gate's head only (its encoder is the
    segmenter's, stored once: :mod:`cascade.stages.gate`)."""
    return model.stored_state() if hasattr(model, "stored_state") else model.state_dict()


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU, contiguous, unshared copy of :func:`stored_state` (what safetensors requires)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in stored_state(model).items()}


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


def validate_config(config: dict[str, Any], where: str | os.PathLike[str]) -> None:
    """Check every field a network is built from (type and range) before anything is built: a ``ModelError``
    naming ``where`` and the field, never a traceback from timm or smp, nor gigabytes spent on a bogus network."""
    stage = config.get("stage")
    if stage not in SPECS:
        raise ModelError(f"{where}: stage must be {' or '.join(repr(code) for code in SPECS)}")
    spec = SPECS[stage]
    for key in spec.network_names:
        value = config.get(key, "default")
        if not isinstance(value, str) or not 0 < len(value) <= 200:
            raise ModelError(f"{where}: {key} must be a network name (a short string)")
    in_chans = config.get("in_chans", 1)
    if type(in_chans) is not int or in_chans != 1:
        raise ModelError(f"{where}: in_chans must be the integer 1 (cascade feeds greyscale images)")
    spec.check_config(config, str(where))
    prep = config.get("preprocessing")
    if not isinstance(prep, dict):
        raise ModelError(f"{where}: preprocessing must be an object with size, mean and std")
    try:
        Preprocessing.from_dict(prep)
    except (CascadeError, TypeError) as err:
        raise ModelError(f"{where}: bad preprocessing ({err})") from None


def load_stage(
    directory: str | os.PathLike[str], *, config: dict[str, Any] | None = None, sha256: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a stage's network from ``config.json`` (or ``config``, already read) and load ``model.safetensors``
    into it (strictly).

    The weights file is read once: its bytes are hashed (checked against ``sha256`` when given) and loaded. The
    network is first built on the meta device (no memory) and its tensor names and shapes compared with the file,
    so weights for another network are refused before a real one is allocated.
    """
    directory = Path(directory)
    where = directory / CONFIG
    config = read_config(directory) if config is None else config
    validate_config(config, where)
    path = directory / WEIGHTS
    if path_kind(path) == "missing":
        raise ModelError(f"{path}: missing")
    try:
        data = input_file(path, ModelError).read_bytes()
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ModelError(f"{path}: sha256 does not match cascade.json: the file was changed or truncated")
    try:
        state = load_bytes(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        with torch.device("meta"):
            skeleton = build_model(config)
    except CascadeError as err:
        raise ModelError(f"{where}: {err}") from None
    expected = {k: tuple(v.shape) for k, v in stored_state(skeleton).items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = min(set(expected.items()) ^ set(found.items()))[0]
        raise ModelError(f"{path}: weights do not fit the network in {CONFIG} (first difference: {diff})")
    model = build_model(config)
    try:
        if hasattr(model, "load_stored_state"):
            model.load_stored_state(state)
        else:
            model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ModelError(f"{path}: weights do not fit the network in {CONFIG} ({first})") from None
    return model.eval(), config


def load_weights_only(path: str | os.PathLike[str], what: str) -> Any:
    """``torch.load(path, weights_only=True)``; any failure is a ``ModelError`` in cascade's words (torch's own
    message advises ``weights_only=False``, which would let the file run code: never relayed)."""
    file = input_file(path, ModelError)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (torch raises many types for a bad or unsafe file; all mean "not usable")
        raise ModelError(
            f"{path}: not a readable {what} (truncated, not a torch file, or holding objects other than tensors "
            "and plain values, which cascade never unpickles)"
        ) from None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
