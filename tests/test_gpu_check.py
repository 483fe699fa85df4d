"""benchmarks/gpu_check.py runs its whole sequence (train variants, tune, predict + parity, 2-rank DDP) on the CPU
at a tiny size, as it would on a GPU at full size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARITY = re.compile(r"parity (\S+) (\S+) vs cpu fp32: max \|dprob\| (\S+) \(limit (\S+)\), identical decisions (\S+)%")


@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One run of benchmarks/gpu_check.py with CUDA hidden, and its output folder."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full check takes minutes; run benchmarks/gpu_check.py directly")
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def test_gpu_check_runs_every_step_on_the_cpu(check: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out_dir = check
    out = proc.stdout
    for stage in ("seg", "cls"):
        for variant in ("bf16 channels_last", "fp32 contiguous"):
            assert f"train {stage} 64² {variant}" in out
    assert "tune: mean Dice" in out
    assert "parity cpu fp32 vs cpu fp32:" in out  # the step ran; what its figure is worth: the test below
    assert "ddp 2 ranks on cpu (gloo): ok" in out and "all checks passed" in out
    assert (out_dir / "model" / "cascade.json").is_file() and (out_dir / "ddp" / "best").is_dir()


def test_gpu_check_parity_compares_another_engine_with_cpu_fp32(
    check: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """Parity means something only where the predictions come from another device or precision than the CPU fp32
    reference: each such line must be within its limit. Without a GPU the fp32 line compares CPU fp32 eager with
    itself (0 by construction); that is no check, and the test says so by skipping rather than passing."""
    proc, _ = check
    lines = PARITY.findall(proc.stdout)
    assert lines, proc.stdout[-3000:]
    compared = [(device, precision, float(diff), float(limit), float(same))
                for device, precision, diff, limit, same in lines if (device, precision) != ("cpu", "fp32")]
    for device, precision, diff, limit, same in compared:
        assert diff <= limit and same >= 90.0, (device, precision, diff, limit, same)
    if not compared:
        self_diff = next(float(diff) for device, precision, diff, *_ in lines if (device, precision) == ("cpu", "fp32"))
        pytest.skip(f"no GPU, and auto precision is fp32 here: parity compared CPU fp32 eager with itself (max "
                    f"|dprob| {self_diff:.1e}), which checks nothing; run benchmarks/gpu_check.py on a GPU")
