"""One batch-size check: `argtypes.positive_int` on every command line, `pipeline.check_batch_size` in the library."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.apps.listen.node import Node
from cascade.cli.main import main
from cascade.errors import ConfigError
from cascade.inference.pipeline import check_batch_size
from cascade.training.tuning import tune_runs


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "8", None])
def test_the_library_refuses_anything_but_a_positive_integer(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^batch size must be an integer of at least 1, got "):
        check_batch_size(bad)  # type: ignore[arg-type]


def test_library_entry_points_check_before_any_work(tmp_path: Path) -> None:
    assert check_batch_size(1) == 1 and check_batch_size(64) == 64
    with pytest.raises(ConfigError, match="batch size must be"):  # before the (missing) runs are read
        tune_runs(tmp_path / "no-cls", tmp_path / "no-seg", tmp_path / "model", batch_size=0)
    with pytest.raises(ConfigError, match="batch size must be"):
        Node(None, tmp_path / "node", batch_size=0)  # type: ignore[arg-type]
    assert not (tmp_path / "model").exists() and not (tmp_path / "node").exists()


@pytest.mark.parametrize("command", ["predict", "tune", "train", "listen"])
def test_every_command_line_refuses_batch_size_0_as_a_usage_error(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as usage:
        main([command, "--batch-size", "0"])
    assert usage.value.code == 2
    assert "argument --batch-size: must be at least 1, got 0" in capsys.readouterr().err
