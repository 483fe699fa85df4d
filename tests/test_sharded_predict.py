"""`torchrun --nproc_per_node 2 -m cascade predict`: two gloo CPU processes write the CSV one process writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_model_dir

from cascade.data.synth import generate
from cascade.inference.sharding import Shard, gather_in_order

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def test_shards_take_every_nth_input_and_merge_back_in_order() -> None:
    items = list(range(7))
    shares = [Shard(rank, 3).take(items) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert gather_in_order(items, Shard()) == items  # one process: nothing to gather


def _predict(command: list[str], out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_processes_write_the_same_csv_as_one(tmp_path: Path) -> None:
    synth = generate(tmp_path / "synth", images=7, positive_fraction=0.5, size=96, seed=5, progress=False)
    images = synth.labels.parent / "dicom-images-train"
    (images / "broken.dcm").write_bytes(b"DICM" * 50)  # a failure on one rank must reach rank 0's report
    model = make_model_dir(tmp_path / "model")
    args = ["-m", "cascade", "predict", str(model), str(images), "--device", "cpu", "--workers", "0",
            "--batch-size", "2", "--backend", "torch"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    single = _predict([sys.executable, *args], tmp_path / "one.csv", env)
    sharded = _predict([TORCHRUN, "--standalone", "--nproc_per_node", "2", *args], tmp_path / "two.csv", env)
    assert single.returncode == 2 and sharded.returncode != 0, (single.stderr[-2000:], sharded.stderr[-2000:])
    one, two = (tmp_path / "one.csv").read_bytes(), (tmp_path / "two.csv").read_bytes()
    assert one == two and one.count(b"\n") == 8  # header + the 7 readable images, same order, same masks
    assert sharded.stderr.count("broken.dcm") == 1, "rank 0 reports every rank's failures, once"
    assert "x 2 processes" in sharded.stdout and "7 images predicted" in sharded.stdout
