"""Tiny real training runs on synthetic data: both stages learn, resume is exact, the run folder is complete."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import killed_after_epoch

from cascade.cli.main import main
from cascade.data.splits import read_split_csv
from cascade.stages.checkpoint import load_stage
from cascade.stages.trainer import build_training_model
from cascade.storage.rundir import STATE_FILE

CONFIGS = Path(__file__).resolve().parents[1] / "cascade" / "configs"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from cascade.data.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, images=160, positive_fraction=0.5, size=64, seed=1, progress=False)
    return out


def train(synth: Path, out: Path, stage: str, *extra: str, config: Path | None = None) -> int:
    return main([
        "train", "--stage", stage, "--images", str(synth / "dicom-images-train"), "--labels",
        str(synth / "train-rle.csv"), "--out", str(out), "--config", str(config or CONFIGS / f"tiny-{stage}.yaml"),
        "--cache-dir", str(synth.parent / f"{synth.name}-cache"), "--quiet", *extra,
    ])


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_classifier_learns_and_writes_a_complete_run(synth: Path, tmp_path: Path) -> None:
    run = tmp_path / "cls"
    assert train(synth, run, "cls") == 0
    rows = metrics(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    aucs = [float(r["val_auc"]) for r in rows]
    assert max(aucs) > 0.8, aucs
    split = read_split_csv(run / "split.csv")
    val_ids = [i for i, fold in split.folds.items() if fold == 0]
    last = rows[-1]
    assert sum(int(last[k]) for k in ("tp", "fp", "fn", "tn")) == len(val_ids)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["stage"] == "cls" and config["network"]["model"] == "test_resnet"

    best, best_cfg = load_stage(run / "best")
    assert best_cfg["epoch"] == 1 + aucs.index(max(aucs))
    assert best_cfg["preprocessing"] == {"size": 64, "mean": 0.5, "std": 0.25}
    assert best_cfg["fold"] == 0 and len(best_cfg["split_fingerprint"]) == 64
    assert math.isclose(best_cfg["metrics"]["val_auc"], max(aucs))

    last_model, _ = load_stage(run / "last")
    state = torch.load(run / STATE_FILE, weights_only=True)
    assert config["loss"]["mask"] == 1.0 and any(k.startswith("mask_head.") for k in state["model"])
    fresh = build_training_model(config)  # state.pt resumes the auxiliary mask head too; best/ and last/ lack it
    fresh.load_state_dict(state["model"])
    fresh.eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(last_model(x), fresh(x))
    assert state["epoch"] == 8 and len(state["history"]) == 8


def test_segmenter_learns(synth: Path, tmp_path: Path) -> None:
    run = tmp_path / "seg"
    assert train(synth, run, "seg", "--epochs", "5") == 0
    rows = metrics(run)
    shares = [float(r["positive_share"]) for r in rows]
    assert shares[0] == pytest.approx(0.8) and shares[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(shares, shares[1:]))
    pos = [float(r["val_dice_pos"]) for r in rows]
    assert max(pos[1:]) > pos[0] + 0.3, pos
    assert [r["collapsed"] for r in rows] == ["0"] * 5  # a learning segmenter is never flagged
    _, cfg = load_stage(run / "best")
    assert cfg["stage"] == "seg" and cfg["encoder"] == "tu-test_resnet"
    best = max(float(r["val_mean_dice_area"]) for r in rows)  # best/ is the epoch the area rule scores highest
    assert cfg["metrics"]["val_mean_dice_area"] == pytest.approx(best)
    assert all(float(r["val_mean_dice_area"]) >= float(r["val_mean_dice"]) for r in rows)  # minimum 0 is a choice


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "last" / "model.safetensors"))


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_resume_after_a_kill_matches_an_uninterrupted_run_bit_exactly(
    synth: Path, tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_ema = tmp_path / "ema.yaml"  # the EMA and the accumulation counters must survive the restart too
    with_ema.write_text(
        (CONFIGS / "tiny-seg.yaml").read_text().replace("ema: 0.0", "ema: 0.9").replace("accumulate: 1", "accumulate: 2")
    )
    flags = ["--epochs", "3", "--workers", str(workers)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train(synth, straight, "seg", *flags, config=with_ema) == 0

    killed_after_epoch(monkeypatch, 2)
    assert train(synth, killed, "seg", *flags, config=with_ema) == 130
    monkeypatch.undo()
    assert len(metrics(killed)) == 2
    assert train(synth, killed, "seg", *flags, config=with_ema) != 0  # without --resume a started run is refused
    assert train(synth, killed, "seg", *flags, "--resume", config=with_ema) == 0

    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("epoch", "train_loss", "val_loss", "val_mean_dice", "val_dice_pos")
    assert [{k: r[k] for k in keep} for r in metrics(straight)] == [{k: r[k] for k in keep} for r in metrics(killed)]


def test_two_process_gloo_run_validates_every_image_once(synth: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cascade",
        "train", "--stage", "cls", "--images", str(synth / "dicom-images-train"), "--labels",
        str(synth / "train-rle.csv"), "--out", str(run), "--config", str(CONFIGS / "tiny-cls.yaml"),
        "--epochs", "2", "--folds", "3", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--quiet",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("cascade train:") == 1  # only rank 0 reports
    rows = metrics(run)
    split = read_split_csv(run / "split.csv")
    n_val = sum(1 for fold in split.folds.values() if fold == 0)
    assert len(rows) == 2
    assert all(sum(int(r[k]) for k in ("tp", "fp", "fn", "tn")) == n_val for r in rows)
    assert all(int(r["train_images"]) >= len(split.folds) - n_val for r in rows)
    model, cfg = load_stage(run / "last")
    assert cfg["folds"] == 3 and sorted(p.name for p in run.iterdir()) == [
        "best", "config.yaml", "data.json", "last", "metrics.csv", "split.csv", "state.pt"
    ]


def test_resume_with_the_run_folder_alone_reads_everything_else_from_the_run(
    synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    killed_after_epoch(monkeypatch, 1)
    assert train(synth, run, "seg", "--epochs", "2", "--workers", "0") == 130
    monkeypatch.undo()
    capsys.readouterr()
    other = tmp_path / "other-labels.csv"
    other.write_text((synth / "train-rle.csv").read_text())
    assert main(["train", "--resume", str(run), "--labels", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resume cannot change --labels: the run was trained on" in err and str(other) in err
    assert main(["train", "--resume", str(run), "--epochs", "5", "--quiet"]) == 2
    assert "--resume cannot change optim.epochs" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--stage", "cls", "--quiet"]) == 2
    assert "the run trained stage 'seg' but --stage is 'cls'" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert [int(r["epoch"]) for r in metrics(run)] == [1, 2]
    assert main(["train", "--stage", "seg", "--quiet"]) == 2
    assert "--images, --labels, --out required (or --resume RUN_DIR" in capsys.readouterr().err


def test_time_budget_plans_the_epochs_that_fit_and_stops_cleanly(synth: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    run = tmp_path / "budget"  # far less than one epoch: the plan is the one epoch already done
    assert main([
        "train", "--stage", "seg", "--images", str(synth / "dicom-images-train"), "--labels",
        str(synth / "train-rle.csv"), "--out", str(run), "--config", str(CONFIGS / "tiny-seg.yaml"),
        "--cache-dir", str(synth.parent / f"{synth.name}-cache"), "--time-budget", "0.001", "--workers", "0",
    ]) == 0
    err = capsys.readouterr().err
    assert "time budget 0.001 min: the first epoch took" in err and "so 1 epochs fit" in err
    assert len(metrics(run)) == 1 and (run / "best" / "model.safetensors").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["epochs"] == 1 and saved["optim"]["time_budget"] == 0.001


def test_time_budget_clock() -> None:
    from cascade.stages.trainer import TimeBudget

    clock = TimeBudget(100.0)
    clock.begin_epochs()
    clock.start -= 30.0  # 10 s of loading, then a first epoch of 20 s
    clock.last -= 20.0
    clock.epoch_done()
    assert 19.9 < clock.epoch_seconds < 20.5
    assert clock.epochs_that_fit(50) == 1 + 3  # 70 s left hold three more 20-s epochs
    assert clock.epochs_that_fit(2) == 2
    assert not clock.stop_before_next()  # 30 s spent + 20 s < 100 s
    clock.start -= 55.0
    assert clock.stop_before_next()  # 85 s spent + 20 s > 100 s
    assert not TimeBudget(0.0).stop_before_next()  # no budget: never stops


def test_auto_values_are_set_by_the_recipe_and_recorded_for_resume(
    synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = yaml.safe_load((CONFIGS / "tiny-seg.yaml").read_text())
    del tiny["optim"]["lr"], tiny["optim"]["batch_size"], tiny["sampling"]
    config = tmp_path / "auto.yaml"
    config.write_text(yaml.safe_dump(tiny))
    run = tmp_path / "seg"
    assert main(["train", "--stage", "seg", "--images", str(synth / "dicom-images-train"), "--labels",
                 str(synth / "train-rle.csv"), "--out", str(run), "--config", str(config), "--epochs", "1",
                 "--cache-dir", str(synth.parent / f"{synth.name}-cache")]) == 0
    assert "recipe: small data (120 training images < 2000): optim.lr 0.0003, optim.batch_size 8, " \
           "sampling.positive_share [0.8, 0.5]" in capsys.readouterr().err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["optim"]["lr"], saved["optim"]["batch_size"], saved["sampling"]["positive_share"]) == (
        3e-4, 8, [0.8, 0.5])
    assert saved["loss"]["dice_per"] == "batch"
    split = read_split_csv(run / "split.csv")
    positives = sum(split.positive[i] for i, fold in split.folds.items() if fold != 0)
    # the first epoch at 80% positive: every training positive and a quarter as many negatives
    assert int(metrics(run)[0]["train_images"]) == positives + round(positives / 4)
