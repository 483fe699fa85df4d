"""`cascade evaluate`: the challenge metric from CSV files, streaming, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascade.cli.evaluate import LABEL_WIDTH
from cascade.cli.main import main
from cascade.data.rle import rle_encode


def _square(r: int, c: int, side: int, size: int = 8) -> str:
    m = np.zeros((size, size), bool)
    m[r : r + side, c : c + side] = True
    return rle_encode(m)


def _write(path: Path, rows: list[tuple[str, str]], header: str = "ImageId,EncodedPixels") -> Path:
    path.write_text("\n".join([header] + [f"{i},{r}" for i, r in rows]) + "\n", encoding="utf-8")
    return path


def _lines(out: str) -> dict[str, str]:
    return {line[:LABEL_WIDTH].strip(): line[LABEL_WIDTH:].strip() for line in out.splitlines()}


def test_submission_equal_to_the_real_labels_scores_one(shared_data: Path, capsys) -> None:
    labels = shared_data / "siim" / "train-rle-sample.csv"
    assert main(["evaluate", str(labels), "--labels", str(labels), "--quiet"]) == 0
    out = _lines(capsys.readouterr().out)
    assert out["mean Dice"].startswith("1.0000 (all-empty baseline 0.5000, difference 0.5000)")
    assert out["images"].startswith("10 (5 positive")
    assert out["confusion"] == "tp 5  fp 0  fn 0  tn 5"


def test_real_labels_against_an_empty_submission(shared_data: Path, tmp_path: Path, capsys) -> None:
    labels = shared_data / "siim" / "train-rle-sample.csv"
    ids = [line.split(",")[0].lstrip("\ufeff") for line in labels.read_text(encoding="utf-8").splitlines()]
    sub = _write(tmp_path / "sub.csv", [(i, "-1") for i in dict.fromkeys(ids)])
    assert main(["evaluate", str(sub), "--labels", str(labels), "--quiet"]) == 0
    out = _lines(capsys.readouterr().out)
    # the 5 negatives score 1, the 5 positives 0: exactly the all-empty baseline
    assert out["mean Dice"].startswith("0.5000 (all-empty baseline 0.5000, difference 0.0000)")
    assert out["sensitivity"] == "0.0000" and out["Dice on true positives"].startswith("n/a")
    assert out["Dice on all positives"].startswith("0.0000 (mean over the 5 labelled positives")


def test_hand_computed_scores_missing_ids_and_union(tmp_path: Path, capsys) -> None:
    labels = _write(
        tmp_path / "labels.csv",
        [("a", _square(0, 0, 2)), ("b", "-1"), ("c", "-1"), ("d", _square(4, 4, 2)), ("e", "-1")],
        header="ImageId, EncodedPixels",
    )
    sub = _write(
        tmp_path / "sub.csv",
        [
            ("a", _square(0, 0, 1)),  # 1 of 4 pixels: Dice 2*1/5
            ("a", _square(1, 1, 1)),  # a second row is united: 2 of 4 pixels, Dice 2*2/6
            ("b", _square(7, 7, 1)),  # any pixel on an empty truth: 0
            ("c", "-1"),  # empty on empty: 1
            ("d", "-1"),  # missed positive: 0
        ],  # "e" is missing: counted as empty, scores 1
    )
    report = tmp_path / "report"
    args = ["evaluate", str(sub), "--labels", str(labels), "--size", "8", "8", "--report", str(report), "--quiet"]
    assert main(args) == 0
    out = _lines(capsys.readouterr().out)
    expected = (2 * 2 / 6 + 0 + 1 + 0 + 1) / 5
    assert out["mean Dice"].startswith(f"{expected:.4f} (all-empty baseline {3 / 5:.4f}")
    assert out["confusion"] == "tp 1  fp 1  fn 1  tn 2"
    assert out["missing"].startswith("1 labelled image(s)") and out["missing"].endswith(": e")
    data = json.loads((report / "evaluate.json").read_text())
    assert data["mean_dice"] == pytest.approx(expected)
    assert data["dice_positive"] == pytest.approx(2 / 3)
    assert data["dice_all_positives"] == pytest.approx((2 / 3 + 0) / 2)  # "d" was missed: it counts as 0
    assert data["baseline_empty"] == pytest.approx(3 / 5)
    assert data["missing_from_submission"] == {"count": 1, "first": ["e"]}
    assert (report / "confusion.png").stat().st_size > 1000 and (report / "dice_positive.png").exists()


def test_errors_exit_2_with_one_clear_line(tmp_path: Path, capsys) -> None:
    labels = _write(tmp_path / "labels.csv", [("a", "-1"), ("b", _square(0, 0, 2))])
    unknown = _write(tmp_path / "unknown.csv", [("a", "-1"), ("zz", "-1")])
    assert main(["evaluate", str(unknown), "--labels", str(labels), "--size", "8", "8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown.csv: 1 ImageId(s) not in the labels" in err and "zz" in err
    assert "--ignore-unknown" in err
    malformed = _write(tmp_path / "malformed.csv", [("a", "3 x")])
    assert main(["evaluate", str(malformed), "--labels", str(labels), "--quiet"]) == 2
    assert "malformed.csv:row 2" in capsys.readouterr().err
    too_big = _write(tmp_path / "big.csv", [("b", "60 10")])
    assert main(["evaluate", str(too_big), "--labels", str(labels), "--size", "8", "8", "--quiet"]) == 2
    assert "big.csv:row 2" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "absent.csv"), "--labels", str(labels)]) == 2
    assert "absent.csv" in capsys.readouterr().err


def test_only_submitted_and_ignore_unknown_choose_what_is_scored(tmp_path: Path, capsys) -> None:
    labels = _write(tmp_path / "labels.csv", [("a", _square(0, 0, 2)), ("b", "-1"), ("c", _square(4, 4, 2))])
    sub = _write(tmp_path / "sub.csv", [("a", _square(0, 0, 2)), ("b", "-1"), ("zz", "-1")])
    base = ["evaluate", str(sub), "--labels", str(labels), "--size", "8", "8", "--quiet"]
    assert main(base) == 2  # zz has no label
    capsys.readouterr()
    assert main([*base, "--ignore-unknown"]) == 0
    out = _lines(capsys.readouterr().out)
    assert out["ignored"] == "1 submitted ImageId(s) without a label: zz"
    assert out["mean Dice"].startswith(f"{2 / 3:.4f}")  # c is missing and scores 0 as an empty prediction
    assert out["missing"].endswith(": c")
    report = tmp_path / "report"
    assert main([*base, "--ignore-unknown", "--only-submitted", "--report", str(report)]) == 0
    out = _lines(capsys.readouterr().out)
    assert out["images"].startswith("2 (1 positive")
    assert out["mean Dice"].startswith("1.0000 (all-empty baseline 0.5000")
    assert "missing" not in out
    data = json.loads((report / "evaluate.json").read_text())
    assert data["images"] == 2 and data["only_submitted"] is True
    assert data["unknown_ignored"] == {"count": 1, "first": ["zz"]}
    assert data["missing_from_submission"]["count"] == 0
