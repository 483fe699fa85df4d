"""`cascade predict`: submission CSV, bad files among good ones, overlays, bad model folders, exit statuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from cascade.cli.main import main
from cascade.data.dicom import read_dicom
from cascade.data.labels import read_labels
from cascade.data.preprocess import to_uint8
from cascade.data.rle import rle_decode
from cascade.data.synth import SynthSummary, generate
from cascade.inference.pipeline import Cascade, Prediction
from cascade.outputs.overlay import overlay_png
from cascade.outputs.writers import OUTPUTS, Output
from cascade.storage.modeldir import MANIFEST
from cascade.thresholds.rule import Thresholds
from test_pipeline import make_model_dir

SIZE = 96
MARGIN = 0.2
"""How far the end-to-end model must beat the all-empty baseline on held-out films (mean Dice; measured 0.85 vs
0.50, bf16 on this AVX512-BF16 CPU)."""


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return generate(tmp_path_factory.mktemp("synth"), images=5, positive_fraction=0.4, size=SIZE, seed=7,
                    progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, synth: SynthSummary) -> Path:
    """Thresholds set from the networks' own outputs so that some images pass the gate and some do not."""
    path = make_model_dir(tmp_path_factory.mktemp("m") / "model")
    model = Cascade.from_pretrained(path, device="cpu")
    probs = sorted(p.probability for p in model.predict_many(sorted(synth.paths.values()), workers=0))
    th = Thresholds(cls=(probs[1] + probs[2]) / 2, top=0.0, area=0, bottom=0.0, min_component=0)
    return make_model_dir(path, th)


def test_folder_and_bad_files_give_csv_of_the_good_ones_and_exit_2(
    synth: SynthSummary, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_dir = tmp_path / "more" / "deep"
    bad_dir.mkdir(parents=True)
    (bad_dir / "broken.dcm").write_bytes(b"DICM" * 100)
    truncated = bad_dir / "truncated.dcm"
    first = sorted(synth.paths.values())[0]
    truncated.write_bytes(first.read_bytes()[:600])
    out = tmp_path / "sub.csv"
    images = synth.labels.parent / "dicom-images-train"
    status = main(["predict", str(model_dir), str(images), str(tmp_path / "more"), "--out", str(out),
                   "--device", "cpu", "--workers", "1", "--batch-size", "2", "--overlays", str(tmp_path / "ov")])
    captured = capsys.readouterr()
    assert status == 2
    assert "broken.dcm" in captured.err and "truncated.dcm" in captured.err
    labels = read_labels(out)
    assert sorted(labels.image_ids) == sorted(synth.paths)
    model = Cascade.from_pretrained(model_dir, device="cpu")
    positives = []
    for image_id, path in synth.paths.items():
        pred = model.predict(path)
        assert np.array_equal(labels.mask(image_id, SIZE, SIZE), pred.mask)
        if pred.positive:
            positives.append(image_id)
    assert 0 < len(positives) < len(synth.paths)
    assert "5 images predicted" in captured.out and f"{len(positives)} positive" in captured.out
    assert "2 failed" in captured.out and "images/s" in captured.out
    overlays = sorted(p.stem for p in (tmp_path / "ov").glob("*.png"))
    assert overlays == sorted(positives)
    overlay = cv2.imread(str(tmp_path / "ov" / f"{positives[0]}.png"))
    assert overlay.shape == (SIZE, SIZE, 3)
    assert (overlay[..., 2].astype(int) - overlay[..., 0]).max() > 100, "the red outline is drawn"


def test_a_registered_output_writer_is_called_once_per_image_with_the_decoded_image(
    synth: SynthSummary, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A writer added to the registry becomes `--<name> DIR`, sees every image once in ImageId order (a failed one
    too), gets the grey levels the reader decoded, and is closed once; overlays drawn on those grey levels are the
    bytes drawn on the image decoded again."""
    made: list[Recorder] = []

    class Recorder:
        needs_image = True

        def __init__(self, folder: Path) -> None:
            self.folder, self.seen, self.closed = folder, [], 0
            made.append(self)

        def write(self, pred: Prediction) -> bool:
            self.seen.append(pred)
            return pred.ok

        def close(self) -> None:
            self.closed += 1

    monkeypatch.setitem(OUTPUTS, "record", Output("record", Recorder, "test output", "{count} recorded in {folder}"))
    broken = tmp_path / "bad" / "broken.dcm"
    broken.parent.mkdir()
    broken.write_bytes(b"DICM" * 100)
    images = synth.labels.parent / "dicom-images-train"
    status = main(["predict", str(model_dir), str(images), str(broken.parent), "--out", str(tmp_path / "sub.csv"),
                   "--device", "cpu", "--workers", "1", "--batch-size", "2", "--record", str(tmp_path / "rec"),
                   "--overlays", str(tmp_path / "ov")])
    assert status == 2
    (recorder,) = made
    assert recorder.folder == tmp_path / "rec" and recorder.closed == 1
    assert [p.image_id for p in recorder.seen] == sorted(synth.paths) + ["broken"]
    assert recorder.seen[-1].image is None and not recorder.seen[-1].ok
    assert f", 5 recorded in {tmp_path / 'rec'}, 1 failed" in capsys.readouterr().out
    model = Cascade.from_pretrained(model_dir, device="cpu")
    for pred in recorder.seen[:-1]:
        grey = to_uint8(read_dicom(synth.paths[pred.image_id]).pixels)
        assert np.array_equal(pred.image, grey)
        if pred.positive:
            again = overlay_png(grey, model.predict(synth.paths[pred.image_id]))
            assert (tmp_path / "ov" / f"{pred.image_id}.png").read_bytes() == again


def test_all_good_exits_0_and_tta_flag_overrides_the_model_folder(
    synth: SynthSummary, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["tta"] = {"hflip": True}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    path = sorted(synth.paths.values())[0]
    out = tmp_path / "sub.csv"
    assert main(["predict", str(copy), str(path), "--out", str(out), "--device", "cpu", "--no-tta"]) == 0
    assert "tta off" in capsys.readouterr().out
    assert main(["predict", str(copy), str(path), "--out", str(out), "--device", "cpu", "--workers", "0"]) == 0
    assert "tta on" in capsys.readouterr().out
    rows = out.read_text().splitlines()
    assert rows[0] == "ImageId,EncodedPixels" and len(rows) == 2 and rows[1].startswith(path.stem + ",")
    rle_decode(rows[1].split(",", 1)[1], SIZE, SIZE)


@pytest.mark.parametrize("damage", ["tamper", "schema", "missing"])
def test_bad_model_folder_exits_2_with_one_line_and_writes_nothing(
    synth: SynthSummary, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    if damage == "tamper":
        weights = copy / "classifier" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "schema":
        text = (copy / MANIFEST).read_text()
        (copy / MANIFEST).write_text(text.replace('"schema_version": 1', '"schema_version": 2'))
    else:
        (copy / "segmenter" / "config.json").unlink()
    out = tmp_path / "sub.csv"
    status = main(["predict", str(copy), str(sorted(synth.paths.values())[0]), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and not out.exists()
    assert err.startswith("cascade predict: error: ") and "\n" not in err and str(copy) in err


def test_missing_input_and_bad_arguments_exit_2(model_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub.csv"
    assert main(["predict", str(model_dir), str(tmp_path / "nowhere"), "--out", str(out), "--device", "cpu"]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(model_dir), str(tmp_path / "empty"), "--out", str(out), "--device", "cpu"]) == 2
    assert "no DICOM files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # a usage error, as on every command (tests/test_batch_size.py)
        main(["predict", str(model_dir), str(tmp_path), "--out", str(out), "--batch-size", "0"])
    assert usage.value.code == 2
    assert not out.exists()


@pytest.mark.slow
def test_end_to_end_synth_train_tune_predict_beats_the_all_empty_baseline(tmp_path: Path) -> None:
    """tiny cls + seg training, tune, predict on a held-out folder: mean Dice at least MARGIN above the all-empty
    submission (seeded data, networks and one torch thread: the same score on every run)."""
    import torch

    from cascade.thresholds import mean_dice

    configs = Path(__file__).resolve().parents[1] / "cascade" / "configs"
    train = generate(tmp_path / "train", images=160, positive_fraction=0.5, size=SIZE, seed=3, progress=False)
    held = generate(tmp_path / "held", images=40, positive_fraction=0.5, size=SIZE, seed=11, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stage in ("cls", "seg"):
            assert main([
                "train", "--stage", stage, "--images", str(tmp_path / "train" / "dicom-images-train"),
                "--labels", str(train.labels), "--out", str(tmp_path / stage), "--config",
                str(configs / f"tiny-{stage}.yaml"), "--cache-dir", str(tmp_path / "cache"), "--quiet",
            ]) == 0
        assert main(["tune", "--cls", str(tmp_path / "cls"), "--seg", str(tmp_path / "seg"),
                     "--out", str(tmp_path / "model"), "--workers", "0", "--quiet"]) == 0
        out = tmp_path / "sub.csv"
        assert main(["predict", str(tmp_path / "model"), str(tmp_path / "held"), "--out", str(out),
                     "--device", "cpu", "--workers", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    submission, truth = read_labels(out), read_labels(held.labels)
    assert sorted(submission.image_ids) == sorted(truth.image_ids)
    ids = truth.image_ids
    score = mean_dice((submission.mask(i, SIZE, SIZE) for i in ids), (truth.mask(i, SIZE, SIZE) for i in ids))
    baseline = 1 - len(truth.positives) / len(ids)  # the all-empty submission: every negative image scores 1
    print(f"held-out mean Dice {score:.4f}, all-empty baseline {baseline:.4f}")
    assert score >= baseline + MARGIN, (score, baseline)


def test_max_pixels_refuses_a_bigger_image_and_the_batch_goes_on(
    synth: SynthSummary, model_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = sorted((shared_data / "siim" / "sample-images").glob("*.dcm"))[0]  # 1024 x 1024
    small = sorted(synth.paths.values())[:2]  # 96 x 96
    out = tmp_path / "sub.csv"
    status = main(["predict", str(model_dir), str(big), *map(str, small), "--out", str(out), "--device", "cpu",
                   "--workers", "0", "--max-pixels", str(SIZE * SIZE)])
    err = capsys.readouterr().err
    assert status == 2
    assert f"failed: {big}: image of 1024 x 1024 pixels is over the pixel budget of 9,216 pixels" in err
    rows = out.read_text().splitlines()[1:]
    assert sorted({row.split(",")[0] for row in rows}) == sorted(p.stem for p in small), "the small ones go on"
    with pytest.raises(SystemExit) as usage:
        main(["predict", str(model_dir), str(big), "--out", str(tmp_path / "x.csv"), "--max-pixels", "0"])
    assert usage.value.code == 2 and "--max-pixels: must be at least 1, got 0" in capsys.readouterr().err
