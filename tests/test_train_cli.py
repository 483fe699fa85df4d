"""`cascade train` on bad input: one clear line, exit status 2, and nothing written into RUN_DIR."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.cli.main import main

CONFIGS = Path(__file__).resolve().parents[1] / "cascade" / "configs"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    from cascade.data.synth import generate

    out = tmp_path_factory.mktemp("small")
    generate(out, images=12, positive_fraction=0.5, size=32, seed=2, progress=False)
    return out


def train(data: Path, out: Path, *extra: str, stage: str = "seg", labels: Path | None = None) -> int:
    return main([
        "train", "--stage", stage, "--images", str(data / "dicom-images-train"),
        "--labels", str(labels or data / "train-rle.csv"), "--out", str(out),
        "--config", str(CONFIGS / f"tiny-{stage}.yaml"), "--cache-dir", str(data / "cache"), "--quiet", *extra,
    ])


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("cascade train: error: ")
    return lines[-1]


def test_help_names_the_contract_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--stage", "--images", "--labels", "--out", "--config", "--encoder", "--arch", "--image-size",
                 "--epochs", "--batch-size", "--folds", "--fold", "--seed", "--device", "--pretrained",
                 "--init-from", "--resume"):
        assert flag in text


def test_segmenter_without_positives_is_refused(small: Path, tmp_path: Path, capsys) -> None:
    labels = tmp_path / "negatives.csv"
    ids = [p.stem for p in (small / "dicom-images-train").rglob("*.dcm")]
    labels.write_text("ImageId,EncodedPixels\n" + "".join(f"{i},-1\n" for i in ids))
    assert train(small, tmp_path / "run", labels=labels) == 2
    assert "no positive image in the training split" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_labelled_image_without_a_file_is_refused(small: Path, tmp_path: Path, capsys) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text((small / "train-rle.csv").read_text() + "1.2.3.404, -1\n")
    assert train(small, tmp_path / "run", labels=labels) == 2
    line = error_line(capsys)
    assert str(labels) in line and "1.2.3.404" in line and "no DICOM file" in line
    assert not (tmp_path / "run").exists()


def test_unreadable_image_is_named_and_nothing_is_written(small: Path, tmp_path: Path, capsys) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small / "dicom-images-train", data / "dicom-images-train")
    shutil.copy(small / "train-rle.csv", data / "train-rle.csv")
    broken = sorted((data / "dicom-images-train").rglob("*.dcm"))[0]
    broken.write_bytes(b"not a dicom file")
    assert train(data, tmp_path / "run") == 2
    assert broken.name in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_bad_config_and_flags_are_refused(small: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: seg\nloss: {bce: 1.0, tversky: 1.0}\n")
    assert main(["train", "--stage", "seg", "--images", str(small), "--labels", str(small / "train-rle.csv"),
                 "--out", str(tmp_path / "run"), "--config", str(bad)]) == 2
    assert "loss.tversky" in error_line(capsys)
    assert train(small, tmp_path / "run", "--arch", "unet", stage="cls") == 2
    assert "--arch applies to the segmenter" in error_line(capsys)
    assert train(small, tmp_path / "run", "--init-from", str(tmp_path)) == 2
    assert "--init-from applies to the classifier" in error_line(capsys)
    assert train(small, tmp_path / "run", "--resume") == 2
    assert "nothing to resume" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_existing_run_dir_is_left_alone(small: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert train(small, run) == 2
    assert "exists and is not empty" in error_line(capsys)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


def test_split_is_the_same_for_both_stages(small: Path, tmp_path: Path) -> None:
    from cascade.data.splits import read_split_csv

    common = ("--epochs", "1", "--folds", "3", "--fold", "1", "--seed", "5")
    assert train(small, tmp_path / "seg", *common) == 0
    assert train(small, tmp_path / "cls", *common, stage="cls") == 0
    assert read_split_csv(tmp_path / "seg" / "split.csv") == read_split_csv(tmp_path / "cls" / "split.csv")
    assert (tmp_path / "seg" / "split.csv").read_bytes() == (tmp_path / "cls" / "split.csv").read_bytes()
