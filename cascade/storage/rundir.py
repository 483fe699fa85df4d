"""RUN_DIR: the folder one ``cascade train`` run writes — its names, its writer and its readers.

Layout (what ``cascade tune``, ``--resume`` and ``--init-from`` read back)::

    RUN_DIR/config.yaml      the resolved training configuration (``--resume`` rebuilds the run from it)
    RUN_DIR/split.csv        ImageId,fold,positive of every image (the validation fold ``cascade tune`` predicts)
    RUN_DIR/data.json        the absolute images folder and label file the run was trained on
    RUN_DIR/metrics.csv      one row per finished epoch
    RUN_DIR/best/            the stage folder (``model.safetensors`` + ``config.json``) of the best epoch so far
    RUN_DIR/last/            the stage folder of the last finished epoch
    RUN_DIR/state.pt         everything a resumed run needs (weights-only loadable: tensors and plain values)

The first three are written once, after the first epoch; the rest after every epoch, each file atomically and
``state.pt`` last, so a run killed at any point names only completed epochs. Only rank 0 writes.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cascade.data.splits import write_split_csv
from cascade.errors import ConfigError, ModelError
from cascade.stages.checkpoint import load_weights_only, save_stage
from cascade.storage.fileio import atomic_path, atomic_write_json, atomic_write_text, read_json_object

CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.csv"
METRICS_FILE = "metrics.csv"
STATE_FILE = "state.pt"
DATA_FILE = "data.json"
"""Where the run's images and labels were (absolute paths), so ``cascade tune`` can find the validation fold."""
BEST = "best"
LAST = "last"


def best_stage(run_dir: str | os.PathLike[str]) -> Path:
    """The stage folder of the run's best epoch (what ``tune`` and ``--init-from`` read)."""
    return Path(run_dir) / BEST


def last_stage(run_dir: str | os.PathLike[str]) -> Path:
    """The stage folder of the run's last finished epoch."""
    return Path(run_dir) / LAST


# ---------------------------------------------------------------------------------------------------- readers


def check_run_dir(out: Path, resume: bool) -> None:
    """A new run needs an absent or empty RUN_DIR; ``--resume`` needs a run folder with a saved state."""
    if resume:
        if not (out / STATE_FILE).is_file() or not (out / CONFIG_FILE).is_file():
            raise ModelError(f"{out}: nothing to resume (no {STATE_FILE} and {CONFIG_FILE}; did an epoch finish?)")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not empty; pass --resume to continue it or choose a new --out")


def read_sources(out: Path) -> dict[str, str]:
    """The images folder and label file a run was trained on (its ``data.json``)."""
    data = read_json_object(out / DATA_FILE, "written by 'cascade train' at the start of a run")
    if not all(isinstance(data.get(k), str) for k in ("images", "labels")):
        raise ModelError(f"{out / DATA_FILE}: expected an object with the strings 'images' and 'labels'")
    return {"images": data["images"], "labels": data["labels"]}


def load_state(out: Path) -> dict[str, Any]:
    """Read ``state.pt`` with ``weights_only=True``."""
    return load_weights_only(out / STATE_FILE, "training state")


# ---------------------------------------------------------------------------------------------------- writer


def write_start(
    out: Path, config_yaml: str, folds: Mapping[str, int], positive: Mapping[str, bool], sources: dict[str, str]
) -> None:
    """The run's fixed files, once: ``config.yaml``, ``split.csv`` and ``data.json`` (no-op when present)."""
    if (out / CONFIG_FILE).exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, config_yaml)
    write_split_csv(out / SPLIT_FILE, folds, positive)
    atomic_write_json(out / DATA_FILE, sources)


def write_epoch(
    out: Path,
    model: nn.Module,
    stage_config: dict[str, Any],
    improved: bool,
    history: Sequence[dict[str, Any]],
    state: dict[str, Any],
) -> None:
    """An epoch's files: ``last/`` (and ``best/`` when ``improved``), ``metrics.csv``, then ``state.pt`` last."""
    save_stage(last_stage(out), model, stage_config)
    if improved:
        save_stage(best_stage(out), model, stage_config)
    write_metrics_csv(out, history)
    with atomic_path(out / STATE_FILE) as tmp:  # plain tensors, numbers and dicts: loadable with weights_only
        torch.save(state, tmp)


def write_metrics_csv(out: Path, history: Sequence[dict[str, Any]]) -> None:
    """``metrics.csv``: one row per finished epoch (rewritten whole, atomically); a column added in a later version
    (a resumed old run) is left empty in the rows that lack it."""
    buffer = io.StringIO()
    columns = list(dict.fromkeys(key for row in history for key in row))
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out / METRICS_FILE, buffer.getvalue())
