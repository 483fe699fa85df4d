"""Progress bars: drawn on a terminal only, so a saved log holds lines, not carriage-return redraws."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _synth(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cascade", "synth", str(out), "--images", "3", "--size", "64"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_no_bar_when_stderr_is_not_a_terminal_unless_forced(tmp_path: Path) -> None:
    plain = _synth(tmp_path / "a", CASCADE_PROGRESS="")
    assert plain.returncode == 0, plain.stderr
    assert "\r" not in plain.stderr and "synth:" not in plain.stderr
    forced = _synth(tmp_path / "b", CASCADE_PROGRESS="1")
    assert forced.returncode == 0, forced.stderr
    assert "synth: 100%" in forced.stderr
