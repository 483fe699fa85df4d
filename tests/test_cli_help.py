"""`cascade --help` and every subcommand's `--help` answer without importing the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cascade.cli.main import SUBCOMMANDS

HEAVY = ("torch", "cv2", "pydicom", "albumentations", "segmentation_models_pytorch", "timm", "matplotlib",
         "highdicom", "fastapi", "pynetdicom")
PROBE = """
import contextlib, io, sys
from cascade.cli.main import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print(",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in SUBCOMMANDS)], ids=lambda a: a[0])
def test_help_imports_no_heavy_module(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"cascade {' '.join(argv)} imported {done.stdout.strip()}"
