"""Training datasets and the preprocessing cache: same pixels as inference, joint augmentation, cache reuse."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from torch.utils.data import DataLoader

from cascade.data import dicom
from cascade.data.augment import build_augment, seed_augment, seed_worker
from cascade.data.cache import PreprocessCache, default_cache_dir
from cascade.data.datasets import ClassifierDataset, Item, SegmenterDataset, make_items
from cascade.data.labels import read_labels
from cascade.data.preprocess import Preprocessing, normalize, prepare_image, resize_mask
from cascade.data.rle import rle_encode
from cascade.data.synth import generate
from cascade.errors import ConfigError, DicomError

SIZE = 64


def write_dicom(path: Path, pixels: np.ndarray) -> Path:
    """An uncompressed 8-bit MONOCHROME2 DICOM holding ``pixels`` (uint8 H x W)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def square_image(n: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with one bright off-centre square, and the mask drawn exactly on that square."""
    image = np.full((n, n), 30, dtype=np.uint8)
    mask = np.zeros((n, n), dtype=bool)
    mask[n // 4 : n // 2, n // 8 : n // 3] = True
    image[mask] = 220
    return image, mask


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path ``read_dicom`` decodes, in order (the real reader still runs)."""
    seen: list[Path] = []
    real = dicom.read_dicom

    def counting(source):  # type: ignore[no-untyped-def]
        seen.append(Path(source))
        return real(source)

    monkeypatch.setattr(dicom, "read_dicom", counting)
    return seen


@pytest.fixture(scope="module")
def siim(shared_data: Path):  # type: ignore[no-untyped-def]
    """The official SIIM sample images and their labels."""
    root = shared_data / "siim"
    paths = {p.stem: p for p in sorted((root / "sample-images").glob("*.dcm"))}
    labels = read_labels(root / "train-rle-sample.csv")
    return paths, labels


@pytest.fixture
def square_set(tmp_path: Path):  # type: ignore[no-untyped-def]
    """One marked image (bright square + its mask) and one blank negative, as files plus labels."""
    image, mask = square_image()
    pos = write_dicom(tmp_path / "images" / "a" / "pos.dcm", image)
    neg = write_dicom(tmp_path / "images" / "neg.dcm", np.full((SIZE, SIZE), 30, np.uint8))
    csv = tmp_path / "labels.csv"
    csv.write_text(f"ImageId,EncodedPixels\npos,{rle_encode(mask)}\nneg,-1\n", encoding="utf-8")
    labels = read_labels(csv)
    return make_items({"pos": pos, "neg": neg}, labels), labels, image, mask


def test_images_are_the_inference_preprocessing(siim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, labels = siim
    items = make_items(paths, labels)
    assert {it.image_id for it in items} == set(labels.annotations) & set(paths)
    assert sum(it.positive for it in items) == 5
    prep = Preprocessing(size=SIZE)
    ds = ClassifierDataset(items[:3], prep, PreprocessCache(tmp_path / "cache", SIZE))
    assert ds.positive.dtype == np.bool_ and ds.positive.tolist() == [it.positive for it in items[:3]]
    for i, item in enumerate(items[:3]):
        image, label = ds[i]
        expected = normalize(prepare_image(dicom.read_dicom(item.path).pixels, SIZE), prep)
        assert image.dtype == torch.float32 and image.shape == (1, SIZE, SIZE)
        np.testing.assert_array_equal(image.numpy()[0], expected)
        assert label.dtype == torch.float32 and label.shape == () and float(label) == float(item.positive)
        assert ds.image_id(i) == item.image_id


def test_segmenter_mask_is_the_resized_label_mask(siim, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths, labels = siim
    items = make_items(paths, labels)
    pick = [next(it for it in items if it.positive), next(it for it in items if not it.positive)]
    ds = SegmenterDataset(pick, Preprocessing(size=SIZE), PreprocessCache(None, SIZE), labels)
    image, mask = ds[0]
    expected = resize_mask(labels.mask(pick[0].image_id, 1024, 1024), SIZE)
    assert expected.any() and mask.dtype == torch.float32 and mask.shape == (1, SIZE, SIZE)
    np.testing.assert_array_equal(mask.numpy()[0], expected.astype(np.float32))
    assert not ds[1][1].any()


def test_synthetic_jpeg_set_matches_inference(tmp_path: Path) -> None:
    """Without the real data too: SIIM-layout JPEG DICOMs at 128² give inference's image and the label mask."""
    summary = generate(tmp_path / "synth", images=4, positive_fraction=0.5, size=128, seed=0, progress=False)
    labels = read_labels(summary.labels)
    items = make_items(summary.paths, labels)
    assert len(items) == 4 and sum(it.positive for it in items) == 2
    prep = Preprocessing(size=SIZE)
    ds = SegmenterDataset(items, prep, PreprocessCache(tmp_path / "cache", SIZE), labels)
    for i, item in enumerate(items):
        image, mask = ds[i]
        expected = normalize(prepare_image(dicom.read_dicom(item.path).pixels, SIZE), prep)
        np.testing.assert_array_equal(image.numpy()[0], expected)
        truth = resize_mask(labels.mask(item.image_id, 128, 128), SIZE)
        assert truth.any() == item.positive
        np.testing.assert_array_equal(mask.numpy()[0], truth.astype(np.float32))


def test_augmentation_moves_mask_with_image(square_set) -> None:  # type: ignore[no-untyped-def]
    items, labels, _, truth = square_set
    prep = Preprocessing(size=SIZE)
    ds = SegmenterDataset(items, prep, PreprocessCache(None, SIZE), labels, augment=build_augment("default", seed=1))
    threshold = float(normalize(np.array([125], np.uint8), prep)[0])
    flipped = unflipped = 0
    for _ in range(40):
        image, mask = (t.numpy()[0] for t in ds[0])
        assert set(np.unique(mask)) <= {0.0, 1.0}
        on = mask > 0
        bright = image > threshold
        # Nearest-neighbour mask against bilinear image: only the square's one-pixel rim may disagree.
        assert (on & bright).sum() >= 0.85 * on.sum() and (on & bright).sum() >= 0.85 * bright.sum()
        left = on[:, : SIZE // 2].sum() > on[:, SIZE // 2 :].sum()
        flipped += not left
        unflipped += left
    assert flipped and unflipped
    assert truth[:, : SIZE // 2].sum() > truth[:, SIZE // 2 :].sum()


def test_cache_hit_skips_decoding(siim, tmp_path: Path, decodes: list[Path]) -> None:  # type: ignore[no-untyped-def]
    paths, _ = siim
    image_id, path = next(iter(paths.items()))
    first = PreprocessCache(tmp_path, SIZE).get(image_id, path)
    assert decodes == [path] and (first.height, first.width) == (1024, 1024)
    again = PreprocessCache(tmp_path, SIZE).get(image_id, path)  # a fresh object, as in another worker
    assert decodes == [path]
    np.testing.assert_array_equal(again.image, first.image)
    assert (again.height, again.width) == (1024, 1024)
    assert PreprocessCache(tmp_path, 32).get(image_id, path).image.shape == (32, 32)  # another size: its own entry
    assert len(decodes) == 2
    memory = PreprocessCache(None, SIZE)
    np.testing.assert_array_equal(memory.get(image_id, path).image, first.image)
    np.testing.assert_array_equal(memory.get(image_id, path).image, first.image)
    assert len(decodes) == 3
    assert not any(tmp_path.glob("**/*.tmp"))


def test_changed_or_corrupt_entry_is_decoded_again(tmp_path: Path, decodes: list[Path]) -> None:
    path = write_dicom(tmp_path / "img.dcm", np.zeros((40, 48), np.uint8))
    cache = PreprocessCache(tmp_path / "cache", SIZE)
    assert not cache.get("img", path).image.any()
    new = np.full((40, 48), 200, np.uint8)
    write_dicom(path, new)
    os.utime(path, ns=(0, 10**9))  # same size: only the mtime tells; make sure it differs from the first write
    got = cache.get("img", path)
    assert len(decodes) == 2 and (got.height, got.width) == (40, 48)
    np.testing.assert_array_equal(got.image, prepare_image(new / 255.0, SIZE))
    entry = next((tmp_path / "cache").glob("**/img.npz"))
    entry.write_bytes(entry.read_bytes()[:100])
    np.testing.assert_array_equal(cache.get("img", path).image, got.image)
    assert len(decodes) == 3
    cache.get("img", path)
    assert len(decodes) == 3


def test_unwritable_cache_warns_and_still_serves(tmp_path: Path, decodes: list[Path]) -> None:
    path = write_dicom(tmp_path / "img.dcm", np.full((32, 32), 90, np.uint8))
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be", encoding="utf-8")
    cache = PreprocessCache(blocker, SIZE)
    with pytest.warns(UserWarning, match="cannot write"):
        got = cache.get("img", path)
    np.testing.assert_array_equal(got.image, prepare_image(np.full((32, 32), 90 / 255.0), SIZE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get("img", path)  # one warning per cache, not one per image
    assert len(decodes) == 2


def test_warm_fills_cache_and_reports_bad_files(square_set, tmp_path: Path, decodes) -> None:  # type: ignore[no-untyped-def]
    items, *_ = square_set
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom")
    cache = PreprocessCache(tmp_path / "cache", SIZE)
    errors = cache.warm([*items, Item("broken", broken, False)], workers=2, progress=False)
    assert [str(broken) in str(e) for e in errors] == [True]
    n = len(decodes)
    for item in items:
        cache.get(item.image_id, item.path)
    assert len(decodes) == n


def test_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "gone" / "missing.dcm"
    ds = ClassifierDataset([Item("missing", missing, False)], Preprocessing(size=SIZE), PreprocessCache(None, SIZE))
    with pytest.raises(DicomError, match="missing.dcm"):
        ds[0]


def test_workers_draw_different_augmentations_reproducibly(square_set, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    items, labels, _, _ = square_set
    cache = PreprocessCache(tmp_path / "cache", SIZE)
    ds = SegmenterDataset([items[0]] * 8, Preprocessing(size=SIZE), cache, labels, augment=build_augment("default"))

    def run(seed: int) -> list[torch.Tensor]:
        loader = DataLoader(
            ds, batch_size=1, num_workers=2, worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed)
        )
        return [image for image, _ in loader]

    first = run(0)
    # Worker 0 yields batches 0, 2, 4, ...; worker 1 batches 1, 3, 5, ...: unseeded they would be identical pairs.
    assert any(not torch.equal(first[k], first[k + 1]) for k in range(0, 8, 2))
    assert len({tuple(t.flatten()[::37].tolist()) for t in first}) > 4
    assert all(torch.equal(a, b) for a, b in zip(first, run(0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, run(1), strict=True))


def test_one_pipeline_stream_decorrelates_transforms() -> None:
    """Two p=0.5 flips must fire independently once seeded (``Compose(seed=)`` would fire them together)."""
    import albumentations as A

    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    pipeline = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    seed_augment(pipeline, 3)
    outcomes = {pipeline(image=image)["image"].tobytes() for _ in range(50)}
    assert len(outcomes) == 4


def test_dataset_pickles_and_checks_size(square_set, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    items, labels, _, _ = square_set
    prep = Preprocessing(size=SIZE)
    ds = SegmenterDataset(items, prep, PreprocessCache(tmp_path / "c", SIZE), labels, augment=build_augment("light"))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.image_id(1) == ds.image_id(1) and clone[0][1].shape == (1, SIZE, SIZE)
    with pytest.raises(ConfigError, match="32px"):
        ClassifierDataset(items, prep, PreprocessCache(None, 32))
    assert build_augment("none") is None
    with pytest.raises(ConfigError, match="heavy"):
        build_augment("heavy")


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CASCADE_CACHE", raising=False)
    a, b = default_cache_dir(tmp_path / "a"), default_cache_dir(tmp_path / "b")
    assert a != b and a.parent == b.parent == Path.home() / ".cache" / "cascade"
    assert default_cache_dir(tmp_path / "x" / ".." / "a") == a
    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir(tmp_path / "a") == tmp_path / "mine"
