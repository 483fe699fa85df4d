"""Synthetic SIIM-layout data: files that read back like the challenge's, labels that are exactly what is drawn."""

from __future__ import annotations

import csv
import gzip
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, JPEGBaseline8Bit, SecondaryCaptureImageStorage

from cascade.cli.main import main
from cascade.data.dicom import read_dicom
from cascade.data.labels import read_labels
from cascade.data.preprocess import resize_mask
from cascade.data.rle import rle_decode
from cascade.data.synth import IMAGES_DIR, LABELS_NAME, SynthSummary, generate, render
from cascade.errors import ConfigError

SIZE = 64
ROW = re.compile(r"^[0-9.]+, (-1|[0-9]+( [0-9]+)*)$")


def _rows(labels: Path) -> list[tuple[str, str]]:
    lines = labels.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(", ", 1)) for line in lines[1:]]  # type: ignore[misc]


def _masks(labels: Path, size: int) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for image_id, rle in _rows(labels):
        out.setdefault(image_id, [])
        if rle != "-1":
            out[image_id].append(rle_decode(rle, size, size))
    return out


def _ring(mask: np.ndarray, px: int) -> np.ndarray:
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)) > 0
    return grown & ~mask


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return generate(tmp_path_factory.mktemp("synth"), images=30, positive_fraction=0.5, size=SIZE, seed=5,
                    progress=False)


def test_layout_and_headers_are_the_challenges(dataset: SynthSummary) -> None:
    root = dataset.labels.parent
    assert len(dataset.paths) == dataset.images == 30
    for image_id, path in dataset.paths.items():
        rel = path.relative_to(root / IMAGES_DIR)
        assert len(rel.parts) == 3 and rel.stem == image_id and rel.suffix == ".dcm"
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == image_id
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert (ds.Modality, ds.PhotometricInterpretation, ds.BitsStored, ds.SamplesPerPixel) == (
            "CR", "MONOCHROME2", 8, 1)
        assert [rel.parts[0], rel.parts[1]] == [ds.StudyInstanceUID, ds.SeriesInstanceUID]
        assert all(UID(u).is_valid for u in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID))
        assert len(ds.PixelSpacing) == 2 and float(ds.PixelSpacing[0]) > 0
        pixels = ds.pixel_array
        assert pixels.shape == (SIZE, SIZE) and pixels.dtype == np.uint8
        assert pixels.std() > 10  # an image, not a flat field


def test_read_dicom_reads_them(dataset: SynthSummary) -> None:
    for image_id, path in list(dataset.paths.items())[:5]:
        image = read_dicom(path)
        assert image.image_id == image_id and image.pixels.shape == (SIZE, SIZE)
        assert image.pixels.dtype == np.float32
        np.testing.assert_allclose(image.pixels * 255, pydicom.dcmread(path).pixel_array, atol=1e-3)


def test_labels_are_stage1_style_and_match_the_files(dataset: SynthSummary) -> None:
    raw = dataset.labels.read_bytes()
    assert raw.startswith(b"ImageId, EncodedPixels\n") and raw.endswith(b"\n") and b"\r" not in raw
    lines = raw.decode().splitlines()[1:]
    assert all(ROW.match(line) for line in lines), [line for line in lines if not ROW.match(line)][:2]
    per_image = Counter(image_id for image_id, _ in _rows(dataset.labels))
    assert set(per_image) == {p.stem for p in dataset.paths.values()}
    masks = _masks(dataset.labels, SIZE)
    positives = [i for i, m in masks.items() if m]
    assert len(positives) == dataset.positives == 15
    assert all(1 <= per_image[i] <= 3 for i in positives) and max(per_image.values()) >= 2
    assert all(per_image[i] == 1 for i in masks if not masks[i])
    assert sum(len(m) for m in masks.values()) == dataset.annotations == len(lines) - (30 - 15)
    assert all(m.any() for ms in masks.values() for m in ms)


def test_labels_read_back_with_read_labels(dataset: SynthSummary) -> None:
    labels = read_labels(dataset.labels)
    masks = _masks(dataset.labels, SIZE)
    assert set(labels.annotations) == set(masks)
    for image_id, ms in masks.items():
        union = np.any(ms, axis=0) if ms else np.zeros((SIZE, SIZE), bool)
        np.testing.assert_array_equal(labels.mask(image_id, SIZE, SIZE), union)


def test_lesions_are_darker_than_their_surroundings(dataset: SynthSummary) -> None:
    masks = _masks(dataset.labels, SIZE)
    for image_id, ms in masks.items():
        if not ms:
            continue
        union = np.any(ms, axis=0)
        pixels = pydicom.dcmread(dataset.paths[image_id]).pixel_array.astype(float)
        assert pixels[union].mean() < pixels[_ring(union, 2)].mean() - 5, image_id


def test_patients_have_several_images(dataset: SynthSummary) -> None:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in dataset.paths.values()]
    per_patient = Counter(str(ds.PatientID) for ds in headers)
    assert len(per_patient) == dataset.patients
    assert max(per_patient.values()) >= 2 and max(per_patient.values()) <= 4
    assert len({ds.SOPInstanceUID for ds in headers}) == len(headers)
    assert all(str(ds.PatientName) == str(ds.PatientID) for ds in headers)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    runs = [generate(tmp_path / name, images=6, positive_fraction=0.5, size=SIZE, seed=seed, progress=False)
            for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    a, b, c = runs
    assert a.labels.read_bytes() == b.labels.read_bytes()
    assert list(a.paths) == list(b.paths)
    for image_id in a.paths:
        assert a.paths[image_id].read_bytes() == b.paths[image_id].read_bytes()
    assert a.labels.read_bytes() != c.labels.read_bytes()
    first_a = pydicom.dcmread(next(iter(a.paths.values()))).pixel_array
    first_c = pydicom.dcmread(next(iter(c.paths.values()))).pixel_array
    assert not np.array_equal(first_a, first_c)


@pytest.mark.parametrize("seed", range(6))
def test_procedural_lesions_lie_inside_a_lung_field(seed: int) -> None:
    picture = render(np.random.default_rng(seed), 128, n_lesions=3)
    assert len(picture.annotations) == 3
    for mask in picture.annotations:
        assert mask.any() and not (mask & ~picture.lungs).any()


def _lesion_effect(mask: np.ndarray, difficulty: str, seed: int = 5) -> np.ndarray:
    """Pixel change caused by painting ``mask`` (same anatomy, noise and exposure otherwise)."""
    size = mask.shape[0]
    with_lesion = render(np.random.default_rng(seed), size, difficulty=difficulty, shapes=[[mask]])
    without = render(np.random.default_rng(seed), size, difficulty=difficulty)
    assert len(with_lesion.annotations) == 1 and not without.annotations
    assert np.array_equal(with_lesion.annotations[0], mask & with_lesion.lungs)
    return with_lesion.pixels.astype(float) - without.pixels.astype(float)


def test_painted_region_is_exactly_the_mask() -> None:
    mask = np.zeros((128, 128), bool)
    mask[20:60, 14:30] = True  # upper lateral image-left lung
    effect = _lesion_effect(mask, "easy")
    mask &= render(np.random.default_rng(5), 128).lungs
    assert not effect[~(_ring(mask, 3) | mask)].any()  # nothing changes away from the lesion and its edge
    assert (effect[mask] < 0).mean() > 0.9 and effect[mask].mean() < -10


def test_realistic_lesions_are_subtler_than_easy() -> None:
    mask = np.zeros((128, 128), bool)
    mask[20:60, 14:30] = True
    easy, realistic = (np.abs(_lesion_effect(mask, d)[mask]).mean() for d in ("easy", "realistic"))
    assert 0 < realistic < easy / 2


def _bank_rows(shared_data: Path, count: int) -> list[tuple[str, str]]:
    with gzip.open(shared_data / "siim" / "siim-train-rle.csv.gz", "rt", encoding="utf-8") as fh:
        rows = [(r[0].strip(), r[1].strip()) for r in csv.reader(fh)][1:]
    positive_ids = list(dict.fromkeys(i for i, rle in rows if rle != "-1"))[:count]
    return [(i, rle) for i, rle in rows if i in positive_ids and rle != "-1"]


def test_mask_bank_shapes_come_from_the_bank(tmp_path: Path, shared_data: Path) -> None:
    bank_rows = _bank_rows(shared_data, 4)
    bank = tmp_path / "bank.csv"
    bank.write_text("ImageId, EncodedPixels\n" + "".join(f"{i}, {r}\n" for i, r in bank_rows))
    shapes = [resize_mask(rle_decode(r), SIZE) for _, r in bank_rows]
    summary = generate(tmp_path / "out", images=6, positive_fraction=1.0, size=SIZE, seed=1, mask_bank=bank,
                       progress=False)
    masks = _masks(summary.labels, SIZE)
    assert all(masks.values())
    for ms in masks.values():  # each annotation is a bank shape, clipped to the synthetic lung fields
        for m in ms:
            assert any(not (m & ~s).any() and (m & s).sum() >= 1 for s in shapes)


def test_mask_bank_reads_the_full_challenge_file(tmp_path: Path, shared_data: Path) -> None:
    summary = generate(tmp_path, images=3, positive_fraction=1.0, size=SIZE, seed=2,
                       mask_bank=shared_data / "siim" / "siim-train-rle.csv.gz", progress=False)
    masks = _masks(summary.labels, SIZE)
    assert summary.positives == 3 and all(1 <= len(ms) <= 3 for ms in masks.values())


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"images": 0}, "--images"), ({"positive_fraction": 1.5}, "--positive-fraction"), ({"size": 16}, "--size"),
     ({"seed": -1}, "--seed"), ({"difficulty": "hard"}, "difficulty")],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        generate(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())


def test_refuses_to_write_over_a_data_set(dataset: SynthSummary) -> None:
    with pytest.raises(ConfigError, match="already holds a data set"):
        generate(dataset.labels.parent, images=1, size=SIZE, progress=False)


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    assert main(["synth", str(out), "--images", "3", "--size", "48", "--seed", "4", "--quiet"]) == 0
    assert len(list((out / IMAGES_DIR).rglob("*.dcm"))) == 3 and (out / LABELS_NAME).is_file()
    assert "wrote 3 images" in capsys.readouterr().out
    assert main(["synth", str(out), "--images", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a data set" in err and str(out) in err


@pytest.mark.parametrize("args", [["--images", "0"], ["--positive-fraction", "-0.1"], ["--size", "4096"]])
def test_cli_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    assert main(["synth", str(tmp_path / "x"), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cascade synth: error: ") and err.count("\n") == 0 and args[0] in err
