"""The training configuration: one nested dict per run, checked against a schema so a typo never trains silently.

A run's configuration is built in three layers: the stage's defaults, then a YAML file (``--config``), then command
line flags. Every key is checked: an unknown key or a value of the wrong type or range raises ``ConfigError`` naming
the dotted key (``optim.lr``) and the file it came from. The resolved configuration is what ``config.yaml`` in the
run folder records, so ``--resume`` can rebuild the run from it.

Two keys serve a classifier trained on little data (see docs/classifier-init.md): ``network.init_from`` names a
segmenter run whose encoder starts the classifier's backbone, and ``optim.freeze_backbone_epochs`` keeps the
backbone fixed for the first epochs so only the head learns.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from cascade.common.devices import CHOICES as DEVICE_CHOICES
from cascade.common.devices import is_device_name
from cascade.configs import shipped_config
from cascade.data.augment import LEVELS as AUGMENT_LEVELS
from cascade.errors import ConfigError
from cascade.stages import GATES
from cascade.stages.segmenter import ARCHS
from cascade.stages.specs import SPECS
from cascade.storage.fileio import input_file, path_kind

STAGES = tuple(SPECS)
AMP_MODES = ("auto", "bf16", "fp16", "none")

Check = Callable[[Any], bool]


def _int(lo: int, hi: float = math.inf) -> tuple[type, Check, str]:
    return (int, lambda v: lo <= v <= hi, f"an integer in [{lo}, {hi}]")


def _float(lo: float, hi: float = math.inf, *, open_lo: bool = False) -> tuple[type, Check, str]:
    if open_lo:
        return (float, lambda v: lo < v <= hi, f"a number in ({lo}, {hi}]")
    return (float, lambda v: lo <= v <= hi, f"a number in [{lo}, {hi}]")


def _choice(options: tuple[str, ...]) -> tuple[type, Check, str]:
    return (str, lambda v: v in options, "one of " + ", ".join(options))


def _share(v: Any) -> bool:
    values = v if isinstance(v, list) else [v]
    return bool(values) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1 for x in values)


def _shared_encoder(v: Any) -> bool:
    """The segmenter a shared gate reads, as a run records it: network names and the encoder's sha256."""
    return isinstance(v, dict) and set(v) == {"arch", "encoder", "sha256"} and all(isinstance(x, str) for x in v.values())


BOOL = (bool, lambda v: True, "true or false")
TEXT = (str, lambda v: bool(v), "a non-empty string")
OPTIONAL_TEXT = (str, lambda v: v is None or bool(v), "a path or null")
SHARE = (object, lambda v: v is None or v == AUTO or _share(v), "null, auto, a share in (0, 1] or a list of shares")
AUTO = "auto"
"""A value the training recipe sets from the size of the training split (:func:`apply_recipe`)."""


def _auto_or(kind: type, lo: float, hi: float) -> tuple[type, Check, str]:
    def check(v: Any) -> bool:
        return v == AUTO or (isinstance(v, (int, float)) and not isinstance(v, bool) and lo < v <= hi
                             and (kind is float or isinstance(v, int)))

    return (object, check, f"auto or {'an integer' if kind is int else 'a number'} in ({lo:g}, {hi:g}]")

# section -> key -> (type, check, description); "network" differs by stage.
NETWORK_SCHEMA: dict[str, dict[str, tuple[type, Check, str]]] = {
    "cls": {"model": TEXT, "pool": TEXT, "drop_rate": _float(0.0, 1.0), "init_from": OPTIONAL_TEXT,
            "gate": _choice(GATES),
            "shared_encoder": (object, lambda v: v is None or _shared_encoder(v), "null (cascade records it)")},
    "seg": {"arch": _choice(tuple(ARCHS)), "encoder": TEXT,
            "prior": (float, lambda v: v is None or 0.0 < v < 1.0, "a probability in (0, 1), or null")},
}
SCHEMA: dict[str, dict[str, tuple[type, Check, str]]] = {
    "preprocessing": {"size": _int(16, 4096), "mean": _float(0.0, 1.0), "std": _float(0.0, 1.0, open_lo=True)},
    "data": {
        "folds": _int(2, 100),
        "fold": _int(0, 99),
        "workers": _int(0, 64),
        "cache": BOOL,
        "cache_dir": OPTIONAL_TEXT,
        "augment": _choice(AUGMENT_LEVELS),
    },
    "optim": {
        "epochs": _int(1, 10_000),
        "batch_size": _auto_or(int, 0, 65_536),
        "accumulate": _int(1, 1024),
        "lr": _auto_or(float, 0.0, 10.0),
        "weight_decay": _float(0.0, 10.0),
        "warmup_epochs": _float(0.0, 1000.0),
        "min_lr_ratio": _float(0.0, 1.0),
        "grad_clip": _float(0.0),
        "freeze_backbone_epochs": _int(0, 10_000),
        "time_budget": _float(0.0),
    },
    "loss": {
        "bce": _float(0.0),
        "dice": _float(0.0),
        "focal": _float(0.0),
        "focal_gamma": _float(0.0, 10.0),
        "mask": _float(0.0),
        "dice_per": _choice(("image", "batch")),
        "distill": _float(0.0),
    },
    "sampling": {"positive_share": SHARE},
    "runtime": {
        "device": (str, is_device_name, DEVICE_CHOICES),
        "amp": _choice(AMP_MODES),
        "channels_last": BOOL,
        "compile": BOOL,
        "ema": _float(0.0, 1.0),
    },
}
TOP_LEVEL = ("stage", "seed", "network", *SCHEMA)

COMMON_DEFAULTS: dict[str, Any] = {
    "seed": 42,
    "preprocessing": {"size": 512, "mean": 0.5, "std": 0.25},
    "data": {"folds": 5, "fold": 0, "workers": 4, "cache": True, "cache_dir": None, "augment": "light"},
    "optim": {
        "epochs": 20,
        "batch_size": AUTO,
        "accumulate": 1,
        "lr": AUTO,
        "weight_decay": 1e-4,
        "warmup_epochs": 1.0,
        "min_lr_ratio": 0.01,
        "grad_clip": 1.0,
        "freeze_backbone_epochs": 0,
        "time_budget": 0.0,
    },
    "runtime": {"device": "auto", "amp": "auto", "channels_last": True, "compile": False, "ema": 0.0},
}

SMALL_DATA = 2000
"""Training splits with fewer images than this get the small-data recipe (docs/training-recipe.md)."""
RECIPES: dict[str, dict[str, Any]] = {
    "small": {"lr": {"cls": 1e-3, "seg": 3e-4}, "batch_size": 8, "positive_share": [0.8, 0.5]},
    "large": {"lr": 3e-4, "batch_size": 16, "positive_share": [0.8, 0.4]},
}
"""What ``auto`` means; a value given per stage code applies to that stage. Small: a few hundred images give few
optimizer steps per epoch, so smaller batches (more steps) and segmenter epochs 80% positive falling to 50% (each
positive seen more often than at 0.5 throughout, for the same images seen); the classifier at a higher learning rate.
The segmenter's 3e-4 was measured with its foreground prior and weight average: at 1e-3 it swung back to empty masks
mid-run (both in docs/training-recipe.md). Large: the SIIM winners' first stage, the shipped 512 px configurations'
values."""


def apply_recipe(config: dict[str, Any], train_images: int) -> tuple[dict[str, Any], str | None]:
    """``config`` with every ``auto`` value set by the recipe for ``train_images``, and a line saying what was
    chosen and why (None when nothing was ``auto``). ``config.yaml`` records the numbers, so a resumed run keeps them."""
    name = "small" if train_images < SMALL_DATA else "large"
    recipe = RECIPES[name]
    out = copy.deepcopy(config)
    chosen = []
    for section, key in (("optim", "lr"), ("optim", "batch_size"), ("sampling", "positive_share")):
        if out[section][key] == AUTO:
            value = copy.deepcopy(recipe[key][out["stage"]] if isinstance(recipe[key], dict) else recipe[key])
            out[section][key] = value
            chosen.append(f"{section}.{key} {value}")
    if not chosen:
        return out, None
    reason = f"{'<' if name == 'small' else '>='} {SMALL_DATA}"
    return out, f"recipe: {name} data ({train_images} training images {reason}): " + ", ".join(chosen)


def defaults(stage: str) -> dict[str, Any]:
    """The full default configuration of a stage."""
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    out = {"stage": stage, **copy.deepcopy(COMMON_DEFAULTS)}
    for section, values in copy.deepcopy(SPECS[stage].defaults).items():  # a stage may change a common key
        out[section] = {**out.get(section, {}), **values}
    return out


def find_config(name_or_path: str | os.PathLike[str]) -> Path:
    """``--config`` value → a YAML file: an existing path, else the name of a shipped configuration."""
    path = Path(name_or_path)
    kind = path_kind(path)
    if kind == "file":
        return path
    if kind != "missing":
        input_file(path, ConfigError, what="configuration file")  # a folder, FIFO or symlink loop: say which
    if path.suffix or len(path.parts) > 1:
        raise ConfigError(f"{path}: no such configuration file")
    return shipped_config(str(name_or_path))


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a configuration YAML file (a mapping) with a clear error when missing or malformed."""
    if path_kind(path) == "missing":
        raise ConfigError(f"{path}: no such configuration file")
    try:
        data = yaml.safe_load(input_file(path, ConfigError, what="configuration file").read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def merge(base: dict[str, Any], update: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, section by section; unknown keys raise ConfigError naming ``origin``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in TOP_LEVEL:
            raise ConfigError(f"{origin}: unknown configuration key {key!r} (known: {', '.join(TOP_LEVEL)})")
        if key in ("stage", "seed"):
            out[key] = value
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{origin}: {key} must be a mapping of keys, got {value!r}")
        known = NETWORK_SCHEMA[out["stage"]] if key == "network" else SCHEMA[key]
        for sub, sub_value in value.items():
            if sub not in known:
                raise ConfigError(
                    f"{origin}: unknown configuration key '{key}.{sub}' for stage {out['stage']} "
                    f"(known: {', '.join(known)})"
                )
            out[key][sub] = sub_value
    return out


def _coerce(value: Any, kind: type) -> Any:
    """Accept an int where a float is asked for (YAML writes ``1`` for ``1.0``); nothing else is converted."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def validate(config: dict[str, Any], origin: str) -> dict[str, Any]:
    """Check every value's type and range; returns the config with ints widened to floats where asked."""
    out = copy.deepcopy(config)
    if out.get("stage") not in STAGES:
        raise ConfigError(f"{origin}: stage {out.get('stage')!r} is not one of {', '.join(STAGES)}")
    seed = out.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise ConfigError(f"{origin}: seed must be an integer in [0, 2**31), got {seed!r}")
    sections = {"network": NETWORK_SCHEMA[out["stage"]], **SCHEMA}
    for section, keys in sections.items():
        for key, (kind, check, text) in keys.items():
            value = _coerce(out[section][key], kind)
            type_ok = kind is object or isinstance(value, kind) or (value is None and text.endswith("null"))
            if kind is not bool and isinstance(value, bool):
                type_ok = False
            if not type_ok or not check(value):
                raise ConfigError(f"{origin}: {section}.{key} must be {text}, got {value!r}")
            out[section][key] = value
    optim = out["optim"]
    if optim["freeze_backbone_epochs"] > optim["epochs"]:
        raise ConfigError(
            f"{origin}: optim.freeze_backbone_epochs {optim['freeze_backbone_epochs']} exceeds optim.epochs "
            f"{optim['epochs']}"
        )
    if out["data"]["fold"] >= out["data"]["folds"]:
        raise ConfigError(f"{origin}: data.fold {out['data']['fold']} must be below data.folds {out['data']['folds']}")
    loss = out["loss"]
    if out["stage"] == "cls" and loss["dice"] > 0:
        raise ConfigError(f"{origin}: loss.dice applies to the segmenter only; set it to 0 for stage cls")
    if out["stage"] == "seg" and loss["mask"] > 0:
        raise ConfigError(f"{origin}: loss.mask (the auxiliary mask head) applies to the classifier only; set it to 0 "
                          "for stage seg")
    if loss["bce"] + loss["dice"] + loss["focal"] <= 0:
        raise ConfigError(f"{origin}: loss.bce, loss.dice and loss.focal are all 0; give at least one a weight")
    return out


def resolve(
    stage: str, config_file: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Defaults of ``stage`` ← ``config_file`` ← ``overrides`` (a nested mapping, e.g. from flags), validated."""
    config = defaults(stage)
    if config_file is not None:
        config_file = find_config(config_file)
        data = read_yaml(config_file)
        if data.get("stage", stage) != stage:
            raise ConfigError(f"{config_file}: configures stage {data['stage']!r} but --stage is {stage!r}")
        config = merge(config, data, str(config_file))
    if overrides:
        config = merge(config, overrides, "command line")
    return validate(config, str(config_file) if config_file is not None else "configuration")


ADDED_LATER: dict[str, dict[str, Any]] = {
    "loss": {"mask": 0.0, "dice_per": "image", "distill": 0.0},
    "network": {"gate": "separate", "shared_encoder": None, "prior": None},
}
"""Keys added after runs were first saved, with the value that reproduces how those runs trained."""

RESUME_MAY_CHANGE = ("data.cache", "data.cache_dir", "runtime.device", "optim.time_budget")
"""Keys a resumed run may change: where images are cached and which device runs (same device, same numbers)."""


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{key}" if isinstance(values, dict) else section: value
        for section, values in config.items()
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)])
    }


def resume_config(
    saved_path: str | os.PathLike[str],
    stage: str,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration of a run being resumed: its ``config.yaml``, with flags allowed to change only
    ``RESUME_MAY_CHANGE`` (anything else would make the resumed run differ from an uninterrupted one)."""
    raw = read_yaml(saved_path)
    if raw.get("stage") in STAGES:  # a run saved before a key existed gets that key's default ...
        known = {"network": NETWORK_SCHEMA[raw["stage"]], **SCHEMA}
        legacy = {section: {k: v for k, v in keys.items() if k not in (raw.get(section) or {}) and k in known[section]}
                  for section, keys in ADDED_LATER.items()}  # ... or, where the default changed, how it ran then
        raw = merge(merge(defaults(raw["stage"]), legacy, "defaults"), raw, str(saved_path))
    saved = validate(raw, str(saved_path))
    if saved["stage"] != stage:
        raise ConfigError(f"{saved_path}: the run trained stage {saved['stage']!r} but --stage is {stage!r}")
    config = saved
    if config_file is not None:
        config_file = find_config(config_file)
        config = merge(config, read_yaml(config_file), str(config_file))
    if overrides:
        config = merge(config, overrides, "command line")
    config = validate(config, "configuration")
    before, after = _flat(saved), _flat(config)
    for key, value in after.items():
        if key not in RESUME_MAY_CHANGE and value != before[key]:
            raise ConfigError(
                f"{saved_path}: --resume cannot change {key} (the run has {before[key]!r}, asked {value!r})"
            )
    return config


def to_yaml(config: dict[str, Any]) -> str:
    """The YAML text of a resolved configuration (what ``config.yaml`` in a run folder holds)."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def positive_share(config: dict[str, Any], epoch: int) -> float | None:
    """The share of positives for ``epoch`` (0-based): the list in ``sampling.positive_share`` interpolated
    linearly from the first epoch to the last; ``None`` when sampling is off (every image once per epoch)."""
    share = config["sampling"]["positive_share"]
    if share is None:
        return None
    points = [float(x) for x in (share if isinstance(share, list) else [share])]
    epochs = config["optim"]["epochs"]
    if len(points) == 1 or epochs == 1:
        return points[0]
    t = epoch / (epochs - 1) * (len(points) - 1)
    i = min(int(t), len(points) - 2)
    return points[i] + (points[i + 1] - points[i]) * (t - i)
