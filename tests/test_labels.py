"""Label CSVs: the real files, every published variant, row-precise errors, and the submission writer."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.data.labels import Labels, LabelSummary, read_labels, write_labels
from cascade.data.rle import parse_rle, rle_decode, rle_encode
from cascade.errors import LabelError

SAMPLE_POSITIVE = "1.2.276.0.7230010.3.1.4.8323329.12743.1517875241.599591"


@pytest.fixture(scope="module")
def full_labels(shared_data: Path) -> Labels:
    return read_labels(shared_data / "siim" / "siim-train-rle.csv.gz")


def test_full_label_file_counts(full_labels: Labels) -> None:
    assert full_labels.summary == LabelSummary(images=12047, positives=2669, annotations=3576)
    assert str(full_labels.summary) == "12047 images, 2669 positive (22.15%), 3576 annotations"
    assert len(full_labels.image_ids) == 12047 == len(set(full_labels.image_ids))
    assert len(full_labels.positives) == 2669
    assert full_labels.image_ids[0] == "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"  # file order
    assert not full_labels.is_positive(full_labels.image_ids[0])


def _pixels(rle: str) -> np.ndarray:
    """Column-major pixel numbers of one annotation, from its runs (no image-sized array)."""
    starts, lengths = parse_rle(rle)
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())


def test_union_of_overlapping_real_annotations(full_labels: Labels) -> None:
    overlapping = checked = 0
    union = np.zeros(1024 * 1024, dtype=bool)  # column-major scratch, reused
    for image_id, rles in full_labels.annotations.items():
        if len(rles) > 1:
            union[:] = False
            parts = [_pixels(rle) for rle in rles]
            for part in parts:
                union[part] = True
            overlapping += sum(p.size for p in parts) > np.count_nonzero(union)
            if checked < 40:
                np.testing.assert_array_equal(full_labels.mask(image_id), union.reshape(1024, 1024).T)
                checked += 1
    assert overlapping == 183  # measured by the data's publishers (../shared/data/README.md)


def test_official_sample_file_agrees_with_the_full_file(shared_data: Path, full_labels: Labels) -> None:
    """The sample has a BOM, no header, leading spaces and no trailing newline; its masks must match the full file."""
    sample = read_labels(shared_data / "siim" / "train-rle-sample.csv")
    assert sample.summary == LabelSummary(images=10, positives=5, annotations=5)
    assert all(not image_id.startswith("\ufeff") for image_id in sample.image_ids)
    for image_id in sample.image_ids:
        assert sample.is_positive(image_id) == full_labels.is_positive(image_id)
        np.testing.assert_array_equal(sample.mask(image_id), full_labels.mask(image_id))
    assert sample.mask(SAMPLE_POSITIVE).sum() == 2071


ROWS = [("a", "-1"), ("b", "1 2 5 1"), ("c", "0 3"), ("b", "3 2"), ("c", "-1"), ("d", "-1")]


def _variant(kind: str) -> str:
    if kind == "stage1":
        return "ImageId, EncodedPixels\n" + "".join(f"{i}, {r}\n" for i, r in ROWS)
    if kind == "plain":
        return "ImageId,EncodedPixels\n" + "".join(f"{i},{r}\n" for i, r in ROWS)
    if kind == "bom-no-header-no-newline":
        return "\ufeff" + "\n".join(f"{i},{' ' if r != '-1' else ''}{r}" for i, r in ROWS)
    if kind == "crlf":
        return "ImageId,EncodedPixels\r\n" + "".join(f"{i},{r}\r\n" for i, r in ROWS)
    if kind == "reordered-extra-column-blank-lines":
        return "EncodedPixels,Notes,ImageId\n\n" + "".join(f"{r},x,{i}\n\n" for i, r in ROWS)
    raise AssertionError(kind)


KINDS = ["stage1", "plain", "bom-no-header-no-newline", "crlf", "reordered-extra-column-blank-lines"]


def _check_rows_example(labels: Labels) -> None:
    assert labels.annotations == {"a": [], "b": ["1 2 5 1", "3 2"], "c": ["0 3"], "d": []}
    assert labels.image_ids == ["a", "b", "c", "d"] and labels.positives == ["b", "c"]
    assert labels.summary == LabelSummary(images=4, positives=2, annotations=3)
    expected_b = np.zeros((3, 3), dtype=bool)
    expected_b.T.flat[[1, 2, 3, 4, 8]] = True  # column-major pixels 1-2 and 8 from row 1, 3-4 from row 2
    np.testing.assert_array_equal(labels.mask("b", 3, 3), expected_b)
    np.testing.assert_array_equal(labels.mask("c", 3, 3), rle_decode("0 3", 3, 3))  # the -1 row adds nothing
    assert not labels.mask("a", 3, 3).any() and labels.is_positive("c") and not labels.is_positive("d")


@pytest.mark.parametrize("kind", KINDS)
def test_every_variant_loads_from_a_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(_variant(kind).encode("utf-8"))
    labels = read_labels(path)
    _check_rows_example(labels)
    assert labels.source == str(path)


def test_gzip_and_text_file_objects(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        f.write(_variant("crlf"))
    _check_rows_example(read_labels(path))
    _check_rows_example(read_labels(io.StringIO(_variant("bom-no-header-no-newline"))))
    with open(tmp_path / "x.csv", "w", encoding="utf-8", newline="") as f:
        f.write(_variant("stage1"))
    with open(tmp_path / "x.csv", encoding="utf-8", newline="") as f:
        assert read_labels(f).source == str(tmp_path / "x.csv")


def test_quoted_values_after_a_space(tmp_path: Path) -> None:
    path = tmp_path / "quoted.csv"
    path.write_text('ImageId, EncodedPixels\n"1.2", "3 4"\n', encoding="utf-8")
    assert read_labels(path).annotations == {"1.2": ["3 4"]}


_rles = st.one_of(
    st.just("-1"),
    st.lists(st.tuples(st.integers(0, 99), st.integers(1, 99)), min_size=1, max_size=5).map(
        lambda pairs: " ".join(f"{a} {b}" for a, b in pairs)
    ),
)
_rows = st.lists(st.tuples(st.sampled_from(["1.2.3", "1.2.4", "ID_x", "9"]), _rles), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    _rows,
    st.sampled_from(["\ufeff", "ImageId, EncodedPixels", "ImageId,EncodedPixels"]),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_any_variant_of_random_rows_reads_back(
    rows: list[tuple[str, str]], header: str, crlf: bool, space: bool, final_newline: bool
) -> None:
    end = "\r\n" if crlf else "\n"
    lines = [f"{image_id},{' ' if space else ''}{rle}" for image_id, rle in rows]
    text = (header if header == "\ufeff" else header + end) + end.join(lines) + (end if final_newline else "")
    expected: dict[str, list[str]] = {}
    for image_id, rle in rows:
        expected.setdefault(image_id, []).extend([] if rle == "-1" else [rle])
    labels = read_labels(io.StringIO(text, newline=""))
    assert labels.annotations == expected and list(labels.annotations) == list(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "labels.csv: empty label file"),
        ("\n\n  \n", "labels.csv: empty label file"),
        ("ImageId,EncodedPixels\n", "labels.csv: no label rows after the header"),
        ("ImageId,Pixels\na,-1\n", "labels.csv:row 1: header column EncodedPixels is missing"),
        ("ImageId,EncodedPixels,ImageId\na,-1,a\n", "labels.csv:row 1: header column ImageId is repeated 2 times"),
        ("ImageId,EncodedPixels\na,-1\n,1 2\n", "labels.csv:row 3: empty ImageId"),
        ("ImageId,EncodedPixels\na,-1\nb\n", "labels.csv:row 3: 1 value(s)"),
        ("a,-1\nb,1 2,3\n", "labels.csv:row 2: 3 value(s)"),
        ("ImageId,EncodedPixels\na,-1\nb,1 2 3\n", "labels.csv:row 3 (ImageId b): RLE has an odd number"),
        ("ImageId,EncodedPixels\r\na,-1\r\nb,4 0\r\n", "labels.csv:row 3 (ImageId b): RLE run 1 has a length"),
        ("ImageId,EncodedPixels\na,-1\nb,\n", "labels.csv:row 3 (ImageId b): empty RLE"),
        ("a,-1\nb,1 x\n", "labels.csv:row 2 (ImageId b): RLE value 'x' is not an integer"),
        ('ImageId,EncodedPixels\na,"1 2\n', "labels.csv:row 2: not a valid CSV row"),
    ],
)
def test_bad_files_name_the_file_row_and_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8", newline="")
    with pytest.raises(LabelError) as info:
        read_labels(path)
    assert str(info.value).startswith(str(tmp_path / message)), str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_or_missing_files(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match="no such label file"):
        read_labels(tmp_path / "absent.csv")
    (tmp_path / "latin1.csv").write_bytes("ImageId,EncodedPixels\n\xe9,-1\n".encode("latin-1"))
    with pytest.raises(LabelError, match="latin1.csv: cannot read"):
        read_labels(tmp_path / "latin1.csv")
    (tmp_path / "bad.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(LabelError, match="bad.csv.gz: cannot read"):
        read_labels(tmp_path / "bad.csv.gz")


def test_out_of_bounds_annotation_is_reported_with_file_row_and_id(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("ImageId,EncodedPixels\na,0 4\na,6 5\n", encoding="utf-8")
    labels = read_labels(path)  # syntax is fine; bounds depend on the size asked for
    assert labels.mask("a", 4, 4).sum() == 4 + 5
    with pytest.raises(LabelError, match=r"labels\.csv:row 3 \(ImageId a\): RLE runs past the end of a 3x3"):
        labels.mask("a", 3, 3)
    with pytest.raises(LabelError, match=r"labels\.csv: no labels for ImageId zz"):
        labels.is_positive("zz")


def test_a_very_long_rle_field_loads(tmp_path: Path) -> None:
    mask = np.zeros((1024, 1024), dtype=bool)
    mask[::2, :300] = True  # 150k one-pixel runs: far beyond csv's default field limit
    rle = rle_encode(mask)
    assert len(rle) > 131072
    write_labels(tmp_path / "big.csv", {"big": rle})
    np.testing.assert_array_equal(read_labels(tmp_path / "big.csv").mask("big"), mask)


def test_write_labels_round_trips_a_submission(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "submission.csv"
    write_labels(path, {"x": "-1", "y": " 3  2\t1 1 ", "z": "0 1"})
    assert path.read_bytes() == b"ImageId,EncodedPixels\nx,-1\ny,3 2 1 1\nz,0 1\n"
    labels = read_labels(path)
    assert labels.annotations == {"x": [], "y": ["3 2 1 1"], "z": ["0 1"]}
    write_labels(path, [("w", "-1")])
    assert read_labels(path).image_ids == ["w"]
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("a", "-1"), ("a", "1 2")], "'a' appears twice"),
        ([("a,b", "-1")], "holds a comma or a quote"),
        ([(" a", "-1")], "has leading or trailing spaces"),
        ([("", "-1")], "is empty"),
        ([("a", "1 2 3")], "ImageId 'a': RLE has an odd number"),
        ([], "no rows to write"),
    ],
)
def test_write_labels_refuses_bad_rows_and_keeps_the_old_file(
    tmp_path: Path, rows: list[tuple[str, str]], message: str
) -> None:
    path = tmp_path / "submission.csv"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(LabelError, match=message):
        write_labels(path, rows)
    assert path.read_text(encoding="utf-8") == "old\n"
