"""Shared test setup: offline hubs, no albumentations version check, the real data folder, and a check that the test
run leaves the repository as it found it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
if "CASCADE_ENGINE_CACHE" not in os.environ:  # exported ONNX graphs of the tiny test networks: one folder per session
    import tempfile

    os.environ["CASCADE_ENGINE_CACHE"] = tempfile.mkdtemp(prefix="cascade-test-engines-")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real SIIM-ACR files); tests that need it skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it lives beside the repository, not in it)")
    return SHARED_DATA


NOT_WATCHED = {".git", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", ".hypothesis"}
"""Folders (at any depth, with ``*.egg-info``) that tools rightly write while tests run, or that are not the tree."""


def tree_snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file under ``root`` as ``relative path -> (size, mtime_ns)`` and every folder as ``path/ -> None``,
    outside :data:`NOT_WATCHED`; links are not followed (their own size and time count)."""
    tree: dict[str, tuple[int, int] | None] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in NOT_WATCHED and not d.endswith(".egg-info")]
        here = Path(folder).relative_to(root)
        tree.update({f"{(here / d).as_posix()}/": None for d in dirs})
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:  # removed between listing and stat
                continue
            tree[(here / name).as_posix()] = (st.st_size, st.st_mtime_ns)
    return tree


def tree_changes(before: dict[str, tuple[int, int] | None], after: dict[str, tuple[int, int] | None]) -> list[str]:
    """``added X`` / ``removed X`` / ``changed X`` lines, sorted by path."""
    lines = [(path, "added") for path in after.keys() - before.keys()]
    lines += [(path, "removed") for path in before.keys() - after.keys()]
    lines += [(path, "changed") for path in before.keys() & after.keys() if before[path] != after[path]]
    return [f"{what} {path}" for path, what in sorted(lines)]


@pytest.fixture(scope="session", autouse=True)
def repository_left_as_found() -> Iterator[None]:
    """Fail the run when the tests added, removed or changed any file of the repository (scratch files of a tool
    run in the working directory, a benchmark result, an output written beside its input): tests write under
    ``tmp_path``. ``.ci/run``'s ``.ci-venv`` inside the clone is not watched. ``CASCADE_TREE_CHECK=0`` turns the
    check off, for a working tree that people edit while the tests run."""
    if os.environ.get("CASCADE_TREE_CHECK") == "0":
        yield
        return
    before = tree_snapshot(REPO)
    yield
    changes = tree_changes(before, tree_snapshot(REPO))
    if changes:
        shown = "\n  ".join(changes[:50]) + (f"\n  ... and {len(changes) - 50} more" if len(changes) > 50 else "")
        pytest.fail(
            f"the test run changed the repository at {REPO} ({len(changes)} path(s)); tests must write under "
            f"tmp_path (if you edited these files yourself meanwhile, run again, or set CASCADE_TREE_CHECK=0):"
            f"\n  {shown}",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread per test where torch is in use: on two cores shared with data loading it is faster than
    two threads fighting, and tiny models gain nothing from more."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Tiny real networks (random weights) for inference tests: imported by test modules with ``from conftest import``.
PREP = {"size": 64, "mean": 0.5, "std": 0.25}
CLS_CONFIG = {"stage": "cls", "model": "resnet10t", "in_chans": 1, "preprocessing": PREP}
SEG_CONFIG = {"stage": "seg", "arch": "unet", "encoder": "tu-resnet10t", "in_chans": 1, "preprocessing": PREP}


def _open_thresholds() -> Any:
    from cascade.thresholds.rule import Thresholds

    return Thresholds(cls=0.0, top=0.0, area=0.0, bottom=0.5, min_component=0.0)


OPEN = _open_thresholds()
"""Every image passes the gate and every pixel over 0.5 is kept."""


def tiny_stage(config: dict[str, Any], seed: int, bias: float | None = None) -> tuple[Any, dict]:
    """A randomly initialised tiny network; ``bias`` sets its output layer's bias (to force the gate open/shut)."""
    import torch

    from cascade.stages.checkpoint import build_model

    torch.manual_seed(seed)
    model = build_model(config).eval()
    if bias is not None:
        head = model.backbone.get_classifier() if config["stage"] == "cls" else model.segmentation_head[0]
        with torch.no_grad():
            head.bias.fill_(bias)
    return model, dict(config)


def make_model_dir(
    path: Path,
    thresholds: Any = OPEN,
    *,
    cls_bias: float | None = None,
    seg_bias: float | None = None,
    classifiers: int = 1,
    tta: bool = False,
) -> Path:
    """A MODEL_DIR of tiny random networks written by the one writer."""
    from cascade.storage.modeldir import write_model_dir

    cls = [tiny_stage(CLS_CONFIG, seed=i, bias=cls_bias) for i in range(classifiers)]
    return write_model_dir(path, cls, [tiny_stage(SEG_CONFIG, seed=10, bias=seg_bias)], thresholds, tta=tta)


def assert_refused_when_damaged(model_dir: Path, tmp_path: Path, damage: Any, message: str) -> None:
    """A copy of ``model_dir`` damaged by ``damage(copy)`` is refused by ``Cascade.from_pretrained`` with one
    ``ModelError`` line matching ``message``."""
    import shutil

    from cascade.errors import ModelError
    from cascade.inference.pipeline import Cascade

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    damage(copy)
    with pytest.raises(ModelError, match=message) as err:
        Cascade.from_pretrained(copy, device="cpu")
    assert "\n" not in str(err.value)


def tiny_synth(out: Path, seed: int) -> Path:
    """48 easy synthetic 64² films, half positive (the tiny configurations' data)."""
    from cascade.data.synth import generate

    generate(out, images=48, positive_fraction=0.5, size=64, seed=seed, progress=False)
    return out


def cli_train(synth: Path, out: Path, stage: str, *extra: str) -> int:
    """``cascade train`` of ``stage`` on ``synth`` with the shipped tiny configuration (quiet, cache beside it)."""
    from cascade.cli.main import main

    return main([
        "train", "--stage", stage, "--images", str(synth / "dicom-images-train"), "--labels",
        str(synth / "train-rle.csv"), "--out", str(out), "--config", str(REPO / "cascade" / "configs" /
                                                                         f"tiny-{stage}.yaml"),
        "--cache-dir", str(synth.parent / f"{synth.name}-cache"), "--quiet", *extra,
    ])


def killed_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Make every training run stop as Ctrl-C would, right after ``epoch``'s checkpoint is written (``undo`` to
    restore)."""
    from cascade.stages.trainer import Trainer

    save_checkpoint = Trainer.save_checkpoint

    def save_then_stop(self: Trainer, row: dict, improved: bool) -> None:
        save_checkpoint(self, row, improved)
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
