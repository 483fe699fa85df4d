"""One device resolver for inference, tuning and training: `auto`, `cpu`, `cuda`, `cuda:N`; clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

from cascade.common.devices import resolve_device
from cascade.errors import ConfigError
from cascade.inference.sharding import Shard
from cascade.stages.config import resolve
from cascade.stages.training import setup_runtime

CUDA = torch.cuda.is_available()


def test_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu"), local_rank=1) == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda") if CUDA else torch.device("cpu"))
    assert resolve_device("auto", local_rank=0) == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))


@pytest.mark.parametrize("value", ["gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "cuda0", "mps", "", " cpu"])
def test_garbage_is_refused_naming_the_value_and_the_choices(value: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown device '{value}': use auto, cpu, cuda or cuda:N"):
        resolve_device(value)


def test_a_torch_device_of_another_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown device 'meta'"):
        resolve_device(torch.device("meta"))


@pytest.mark.skipif(CUDA, reason="checks the message given where there is no CUDA")
@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_says_so(value: str) -> None:
    with pytest.raises(ConfigError, match=rf"device '{value}' requested but CUDA is not available here"):
        resolve_device(value)


def test_torchrun_ranks_get_their_own_gpu_and_an_index_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mapping itself (no GPU needed to build a device): plain cuda/auto → cuda:LOCAL_RANK (mod the GPUs), an
    explicit index wins, an index past the GPUs present is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda")  # one process: torch's current device, as before
    assert Shard(rank=1, world=2, local_rank=1).device("auto") == torch.device("cuda", 1)
    assert Shard().device("cuda") == torch.device("cuda")  # not under torchrun: no rank to pick by
    with pytest.raises(ConfigError, match="'cuda:2' requested but this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_training_reads_runtime_device_through_the_same_resolver() -> None:
    config = resolve("cls", overrides={"runtime": {"device": "cpu", "amp": "none"}})
    assert setup_runtime(config).device == torch.device("cpu")
    assert resolve("cls", overrides={"runtime": {"device": "cuda:1"}})["runtime"]["device"] == "cuda:1"
    with pytest.raises(ConfigError, match=r"runtime.device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve("cls", overrides={"runtime": {"device": "gpu"}})
    if not CUDA:
        config["runtime"]["device"] = "cuda:0"
        with pytest.raises(ConfigError, match=r"^runtime.device: device 'cuda:0' requested but CUDA is not"):
            setup_runtime(config)
