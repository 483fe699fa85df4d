"""The challenge RLE codec: real annotations, an independent orientation oracle, property tests, malformed input."""

from __future__ import annotations

import csv
import gzip
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from cascade.data.rle import check_rle, parse_rle, rle_decode, rle_encode
from cascade.errors import LabelError


def _real_annotations(shared_data: Path) -> dict[str, list[str]]:
    """ImageId -> RLE strings of the full label file, read with the csv module only (independent of labels.py)."""
    annotations: dict[str, list[str]] = defaultdict(list)
    with gzip.open(shared_data / "siim" / "siim-train-rle.csv.gz", "rt", newline="") as f:
        rows = csv.reader(f)
        assert [c.strip() for c in next(rows)] == ["ImageId", "EncodedPixels"]
        for image_id, rle in rows:
            annotations[image_id]
            if rle.strip() != "-1":
                annotations[image_id].append(rle)
    return annotations


def _reference_encode(mask: np.ndarray) -> str:
    """A per-pixel encoder written straight from the definition, to check the vectorised one against."""
    height, width = mask.shape
    values, previous_end, run_start = [], 0, None
    for flat in range(height * width + 1):
        on = flat < height * width and bool(mask[flat % height, flat // height])
        if on and run_start is None:
            run_start = flat
        elif not on and run_start is not None:
            values += [run_start - previous_end, flat - run_start]
            previous_end, run_start = flat, None
    return " ".join(map(str, values)) if values else "-1"


def test_every_real_annotation_decodes_in_bounds_and_reencodes_identically(shared_data: Path) -> None:
    annotations = _real_annotations(shared_data)
    rles = [rle for image_rles in annotations.values() for rle in image_rles]
    assert len(annotations) == 12047 and len(rles) == 3576
    for rle in rles:
        mask = rle_decode(rle, 1024, 1024)
        assert mask.shape == (1024, 1024) and mask.dtype == bool and mask.any()
        assert rle_encode(mask) == " ".join(rle.split())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_decoded_masks_match_independently_drawn_jpeg_masks(shared_data: Path) -> None:
    annotations = _real_annotations(shared_data)
    jpgs = sorted((shared_data / "siim" / "sample-masks-jpg").glob("*.jpg"))
    assert len(jpgs) == 13
    positives = 0
    for jpg in jpgs:
        image_id = jpg.stem  # the JPEG's stem is the ImageId of the label file
        assert image_id in annotations, f"{jpg.name} has no labels"
        drawn = np.asarray(Image.open(jpg).convert("L")) > 127
        decoded = np.zeros((1024, 1024), dtype=bool)
        for rle in annotations[image_id]:
            decoded |= rle_decode(rle)
        assert _iou(decoded, drawn) >= 0.99, jpg.name
        if drawn.any():
            positives += 1
            # The oracle can tell orientation apart: the transposed decoding must fail it.
            assert _iou(decoded.T, drawn) < 0.99, jpg.name
    assert positives == 8


def test_hand_computed_column_major_relative_cases() -> None:
    # Column-major: column 0 is pixels 0..2, column 1 is pixels 3..5. Runs [0, 2) and [4, 6): the second start
    # counts the 2 pixels skipped after the first run ends; the second run ends on the very last pixel.
    mask = np.array([[1, 0], [1, 1], [0, 1]], dtype=bool)
    assert rle_encode(mask) == "0 2 2 2"
    np.testing.assert_array_equal(rle_decode("0 2 2 2", 3, 2), mask)
    # A run that wraps from the bottom of one column to the top of the next.
    wrapped = np.array([[0, 1, 0], [1, 0, 1]], dtype=bool)
    assert rle_encode(wrapped) == "1 2 2 1"
    np.testing.assert_array_equal(rle_decode("1 2 2 1", 2, 3), wrapped)
    assert rle_encode(np.ones((2, 2), dtype=bool)) == "0 4"
    assert rle_encode(np.zeros((4, 5), dtype=bool)) == "-1"
    last_only = np.zeros((3, 4), dtype=bool)
    last_only[-1, -1] = True
    assert rle_encode(last_only) == "11 1"
    np.testing.assert_array_equal(rle_decode("11 1", 3, 4), last_only)
    assert not rle_decode(" -1 \n", 5, 6).any() and rle_decode("-1", 5, 6).shape == (5, 6)


def test_non_square_decoding_uses_height_for_the_column_length() -> None:
    mask = rle_decode("3 2", height=3, width=5)
    expected = np.zeros((3, 5), dtype=bool)
    expected[0, 1] = expected[1, 1] = True
    np.testing.assert_array_equal(mask, expected)


def test_adjacent_runs_decode_to_their_union() -> None:
    np.testing.assert_array_equal(rle_decode("0 2 0 3", 5, 1), np.ones((5, 1), dtype=bool))


_masks = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(lambda shape: arrays(bool, shape))


@settings(max_examples=300, deadline=None)
@given(_masks, st.booleans())
def test_round_trip_and_reference_on_random_masks(mask: np.ndarray, set_last: bool) -> None:
    if set_last:
        mask[-1, -1] = True
    rle = rle_encode(mask)
    assert rle == _reference_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, *mask.shape), mask)
    for as_numbers in (mask.astype(np.uint8), mask.astype(np.uint8) * 255, mask.astype(np.int64)):
        assert rle_encode(as_numbers) == rle


@settings(max_examples=300, deadline=None)
@given(_masks, st.booleans())
def test_every_memory_layout_encodes_to_the_c_ordered_string(mask: np.ndarray, as_255: bool) -> None:
    """rle_encode reads a column-major mask in its own memory order and a row-major one row by row: a Fortran-ordered
    copy, a transposed view, strided and cropped views of a larger array must all give the C-ordered mask's string."""
    mask = mask.astype(np.uint8) * 255 if as_255 else mask
    expected = rle_encode(np.ascontiguousarray(mask))
    assert expected == _reference_encode(mask)
    fortran = np.asfortranarray(mask)
    transposed = np.ascontiguousarray(mask.T).T  # a view whose memory is column-major
    assert fortran.flags.f_contiguous and transposed.flags.f_contiguous and not transposed.flags.owndata
    height, width = mask.shape
    spaced = np.zeros((2 * height, 3 * width), dtype=mask.dtype)
    spaced[::2, ::3] = mask
    framed = np.zeros((height + 3, width + 2), dtype=mask.dtype, order="F")
    framed[1 : 1 + height, 2:] = mask
    for layout in (fortran, transposed, spaced[::2, ::3], framed[1 : 1 + height, 2:]):
        assert rle_encode(layout) == expected
    assert rle_encode(framed) == rle_encode(np.ascontiguousarray(framed)) == _reference_encode(framed)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 2000))
def test_a_single_run_ending_on_the_last_pixel_of_a_large_image(height: int, width: int) -> None:
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 2 :, -1] = True
    rle = rle_encode(mask)
    assert rle == f"{height * width - (height - height // 2)} {height - height // 2}"
    np.testing.assert_array_equal(rle_decode(rle, height, width), mask)


@pytest.mark.parametrize(
    ("rle", "reason"),
    [
        ("1 2 3", "odd number"),
        ("5 -3", "not positive"),
        ("5 0", "not positive"),
        ("-4 3", "negative start"),
        ("1 2 x 3", "'x' is not an integer"),
        ("1.5 2", "not an integer"),
        ("1 2 9 10", "past the end"),
        ("", "empty RLE"),
        ("   ", "empty RLE"),
        ("9223372036854775807 1 9223372036854775807 1", "too large"),
    ],
)
def test_malformed_strings_raise_label_error_naming_where(rle: str, reason: str) -> None:
    where = "labels.csv:row 7 (ImageId 1.2.3)"
    with pytest.raises(LabelError, match=reason) as info:
        rle_decode(rle, 4, 4, where=where)
    assert str(info.value).startswith(f"{where}: ")
    assert "\n" not in str(info.value)
    if reason == "past the end":  # bounds need the image size: the syntax check alone cannot know them
        check_rle(rle, where=where)
    else:
        with pytest.raises(LabelError, match=reason):
            check_rle(rle, where=where)


def test_parse_rle_gives_absolute_starts() -> None:
    starts, lengths = parse_rle("2 3 4 1 0 2")
    assert starts.tolist() == [2, 9, 10] and lengths.tolist() == [3, 1, 2]
    assert [a.size for a in parse_rle("-1")] == [0, 0]


def test_encoding_rejects_arrays_that_are_not_two_dimensional() -> None:
    with pytest.raises(LabelError, match="2-D"):
        rle_encode(np.zeros((2, 3, 4), dtype=bool))
