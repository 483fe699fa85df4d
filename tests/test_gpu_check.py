"""benchmarks/gpu_check.py runs its whole sequence (train variants, tune, predict + parity, 2-rank DDP) on the CPU
at a tiny size, as it would on a GPU at full size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full check takes minutes; run benchmarks/gpu_check.py directly")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("seg", "cls"):
        for variant in ("bf16 channels_last", "fp32 contiguous"):
            assert f"train {stage} 64² {variant}" in out
    assert "tune: mean Dice" in out and "parity cpu fp32 vs cpu fp32: max |dprob| 0.0e+00" in out
    assert "ddp 2 ranks on cpu (gloo): ok" in out and "all checks passed" in out
    assert (tmp_path / "model" / "cascade.json").is_file() and (tmp_path / "ddp" / "best").is_dir()
