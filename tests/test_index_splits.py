"""Scanning DICOM folders, matching them to labels, and patient-grouped stratified folds."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest

from cascade.data.index import image_id_of, match, scan_dicoms
from cascade.data.labels import Labels, read_labels
from cascade.data.splits import (
    Split,
    make_folds,
    read_groups,
    read_split_csv,
    split_fingerprint,
    write_split_csv,
)
from cascade.errors import CascadeError, ConfigError, LabelError

ID_6904 = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_scan_finds_nested_dcm_files_in_any_case_and_skips_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "train"
    a = _touch(root / "study" / "series" / "1.2.3.dcm")
    b = _touch(root / "x" / "y" / "z" / "w" / "4.5.6.DCM")
    _touch(root / "DICOMDIR")
    _touch(root / "notes.txt")
    _touch(root / "study" / "._1.2.3.dcm")
    _touch(root / ".cache" / "7.8.9.dcm")
    index = scan_dicoms(root)
    assert index.paths == {"1.2.3": a, "4.5.6": b}
    assert index.duplicates == {}


def test_duplicates_keep_the_first_path_in_sorted_order(tmp_path: Path) -> None:
    first = _touch(tmp_path / "a" / "1.2.dcm")
    second = _touch(tmp_path / "b" / "1.2.dcm")
    third = _touch(tmp_path / "c" / "deeper" / "1.2.dcm")
    other = _touch(tmp_path / "c" / "3.dcm")
    index = scan_dicoms(tmp_path / "c", tmp_path / "a", tmp_path / "b")
    assert index.paths == {"1.2": first, "3": other}
    assert index.duplicates == {"1.2": [second, third]}
    assert list(index.paths) == sorted(index.paths)


def test_explicit_files_keep_their_dotted_name_and_count_once(tmp_path: Path) -> None:
    bare = _touch(tmp_path / "1.2.840.113619.2.55")
    inside = _touch(tmp_path / "d" / "ID_abc.dcm")
    index = scan_dicoms(bare, tmp_path / "d", inside)
    assert index.paths == {"1.2.840.113619.2.55": bare, "ID_abc": inside}
    assert index.duplicates == {}
    assert image_id_of("x/1.2.3.Dcm") == "1.2.3" and image_id_of("1.2.3") == "1.2.3"


def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(CascadeError, match=f"{tmp_path / 'nowhere'}: no such file or folder"):
        scan_dicoms(tmp_path, tmp_path / "nowhere")


def test_real_sample_images_match_the_official_label_sample(shared_data: Path) -> None:
    index = scan_dicoms(shared_data / "siim" / "sample-images")
    assert len(index) == 11
    assert all(path.name == f"{image_id}.dcm" for image_id, path in index.paths.items())
    matched = match(index, read_labels(shared_data / "siim" / "train-rle-sample.csv"))
    assert matched.images_without_labels == [ID_6904]  # the stage-1 test image is not in the sample labels
    assert matched.labels_without_images == [] and len(matched.ids) == 10
    assert matched.report() == (
        f"10 images with labels, 1 images without labels ({ID_6904}), 0 labelled ids without images"
    )
    full = match(index, read_labels(shared_data / "siim" / "siim-train-rle.csv.gz"))
    assert len(full.ids) == 11 and len(full.labels_without_images) == 12047 - 11
    assert full.report().endswith(f"({', '.join(full.labels_without_images[:5])}, … (+{12047 - 11 - 5} more))")


@pytest.fixture(scope="module")
def real_ids(shared_data: Path) -> tuple[list[str], dict[str, bool], dict[str, str]]:
    """The 12,047 real ImageIds and labels, with synthetic patients of 1-5 images each."""
    labels: Labels = read_labels(shared_data / "siim" / "siim-train-rle.csv.gz")
    ids = labels.image_ids
    rng = random.Random(7)
    shuffled = rng.sample(ids, len(ids))
    groups, start = {}, 0
    while start < len(shuffled):
        size = rng.randint(1, 5)
        groups.update(dict.fromkeys(shuffled[start : start + size], f"patient{start}"))
        start += size
    return ids, {i: labels.is_positive(i) for i in ids}, groups


@pytest.mark.parametrize("k", [2, 5])
def test_folds_on_real_labels_are_grouped_stratified_and_balanced(real_ids, k: int) -> None:
    ids, positive, groups = real_ids
    folds = make_folds(ids, positive, groups, k=k, seed=0)
    assert set(folds) == set(ids) and set(folds.values()) == set(range(k))
    fold_of_group: dict[str, int] = {}
    for image_id, fold in folds.items():
        assert fold_of_group.setdefault(groups[image_id], fold) == fold, "a patient crosses folds"
    sizes = np.bincount(list(folds.values()), minlength=k)
    positives = np.bincount([folds[i] for i in ids if positive[i]], minlength=k)
    overall = sum(positive.values()) / len(ids)
    assert overall == pytest.approx(0.2215, abs=1e-4)
    assert sizes.max() - sizes.min() <= 5  # at most one group apart
    assert np.abs(positives / sizes - overall).max() < 0.002


def test_folds_are_deterministic_for_a_seed_and_change_with_it(real_ids) -> None:
    ids, positive, groups = real_ids
    folds = make_folds(ids, positive, groups, k=5, seed=3)
    assert make_folds(list(reversed(ids)), positive, groups, k=5, seed=3) == folds  # input order does not matter
    other = make_folds(ids, positive, groups, k=5, seed=4)
    assert other != folds
    assert split_fingerprint(folds) == split_fingerprint(dict(reversed(list(folds.items()))))
    assert split_fingerprint(other) != split_fingerprint(folds)


def test_without_groups_every_image_is_its_own_group() -> None:
    ids = [f"img{i}" for i in range(30)]
    positive = {i: n % 3 == 0 for n, i in enumerate(ids)}
    folds = make_folds(ids, positive, None, k=3, seed=0)
    assert np.bincount(list(folds.values())).tolist() == [10, 10, 10]
    assert sorted(sum(positive[i] for i in ids if folds[i] == f) for f in range(3)) == [3, 3, 4]
    mixed = make_folds(ids, positive, {ids[0]: "p", ids[1]: "p", ids[2]: None}, k=3, seed=0)
    assert mixed[ids[0]] == mixed[ids[1]]


@pytest.mark.parametrize(
    ("ids", "groups", "k", "message"),
    [
        (["a", "b", "c"], None, 1, "at least 2"),
        (["a", "b", "c"], {"a": "p", "b": "p", "c": "p"}, 2, "only 1 patient groups"),
        (["a", "b", "c"], None, 4, "only 3 patient groups"),
        (["a", "b", "a"], None, 2, "listed twice"),
        (["a", "b", "zz"], None, 2, "no positive/negative label for ImageId zz"),
    ],
)
def test_bad_fold_requests_raise_config_error(ids, groups, k: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_folds(ids, {"a": True, "b": False, "c": False}, groups, k=k, seed=0)


def test_split_csv_round_trip(tmp_path: Path) -> None:
    folds = {"b": 1, "a": 0, "c": 1}
    positive = {"a": True, "b": False, "c": True}
    path = tmp_path / "run" / "split.csv"
    write_split_csv(path, folds, positive)
    assert path.read_text(encoding="utf-8") == "ImageId,fold,positive\na,0,1\nb,1,0\nc,1,1\n"
    split = read_split_csv(path)
    assert split == Split(folds={"a": 0, "b": 1, "c": 1}, positive=positive)
    assert split_fingerprint(split.folds) == split_fingerprint(folds)
    assert [p.name for p in path.parent.iterdir()] == ["split.csv"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "row 1: header must be"),
        ("ImageId,fold\na,0\n", "row 1: header must be"),
        ("ImageId,fold,positive\na,0,1\nb,x,0\n", "row 3: expected"),
        ("ImageId,fold,positive\na,0,2\n", "row 2: expected"),
        ("ImageId,fold,positive\na,0\n", "row 2: expected"),
        ("ImageId,fold,positive\na,0,1\na,1,1\n", "row 3: ImageId a appears twice"),
        ("ImageId,fold,positive\n", "no rows after the header"),
    ],
)
def test_bad_split_files_name_the_row(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "split.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LabelError, match=message) as info:
        read_split_csv(path)
    assert str(info.value).startswith(str(path))


def test_read_groups_from_real_headers_keeps_one_patient_in_one_fold(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = scan_dicoms(shared_data / "siim" / "sample-images", shared_data / "dicom")
    junk = _touch(tmp_path / "junk.dcm")
    with caplog.at_level(logging.WARNING, logger="cascade.data.splits"):
        groups = read_groups({**index.paths, "junk": junk})
    assert groups["junk"] is None and "junk.dcm" in caplog.text
    keys = {image_id: key for image_id, key in groups.items() if image_id != "junk"}
    assert all(isinstance(key, str) and len(key) == 16 for key in keys.values())
    # The same patient appears under two files twice: the 6904 image with a rewritten header, and the J2K pair.
    assert keys[ID_6904] == keys["siim-6904-header-monochrome1"]
    assert keys["cr-chest-monochrome1-j2k-lossless"] == keys["cr-chest-monochrome1-j2k-lossy"]
    assert len(set(keys.values())) == len(keys) - 2
    for seed in range(5):
        folds = make_folds(list(groups), dict.fromkeys(groups, False), groups, k=3, seed=seed)
        assert folds[ID_6904] == folds["siim-6904-header-monochrome1"]
        assert folds["cr-chest-monochrome1-j2k-lossless"] == folds["cr-chest-monochrome1-j2k-lossy"]
