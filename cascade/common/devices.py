"""The one reading of a device setting (``--device``, ``runtime.device``): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``;
and what this CPU computes natively (:func:`cpu_supports_bf16`, read by training and by the torch engine's ``auto``).

Inference (:mod:`cascade.inference.pipeline`), tuning and training all resolve through :func:`resolve_device`, so a
value one command takes every other takes too. Under ``torchrun`` a plain ``cuda`` (or ``auto`` with CUDA present) means
this process's own GPU, ``cuda:LOCAL_RANK``. torch is imported inside the functions: :func:`is_device_name` serves
configuration checks and ``--help``, which stay light.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade.errors import ConfigError

if TYPE_CHECKING:
    import torch

CHOICES = "auto, cpu, cuda or cuda:N"
_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def is_device_name(value: Any) -> bool:
    """Whether ``value`` is a device setting cascade reads (the syntax only; availability is checked on use)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device for a setting: ``auto`` → CUDA when available, else the CPU; ``cuda:N`` must exist here.

    ``local_rank`` (a ``torchrun`` process's ``LOCAL_RANK``) turns a plain ``cuda``/``auto`` into that process's
    GPU, ``cuda:local_rank`` (modulo the GPUs present); without it a plain ``cuda`` is torch's current device.
    A ``ConfigError`` names the bad value: not a device, or CUDA asked for where there is none.
    """
    import torch

    if isinstance(device, str) and not is_device_name(device):
        raise ConfigError(f"unknown device {device!r}: use {CHOICES}")
    wanted = torch.device(device if str(device) != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if wanted.type == "cpu":
        return wanted
    if wanted.type != "cuda":
        raise ConfigError(f"unknown device {str(device)!r}: use {CHOICES}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but CUDA is not available here; use --device cpu")
    count = torch.cuda.device_count()
    if wanted.index is None:
        return torch.device("cuda", local_rank % count) if local_rank is not None else wanted
    if wanted.index >= count:
        raise ConfigError(f"device {str(device)!r} requested but this machine has {count} CUDA device(s)")
    return wanted


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX flags); elsewhere bf16 is slower than fp32.

    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when None); where that file does not exist (macOS,
    Windows) PyTorch's own CPU feature probe answers.
    """
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
        if cpuinfo is None:
            import torch

            probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
            return bool(probe()) if probe is not None else False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo))


CPUINFO_ENV = "CASCADE_CPUINFO"
"""Environment variable naming a file read instead of ``/proc/cpuinfo``: runs the decisions ``auto`` makes on
another kind of CPU (``.ci/run`` runs the suite once as if on an AVX2-only CPU this way); the arithmetic stays
this CPU's."""


def _cpuinfo() -> str | None:
    """The text of ``/proc/cpuinfo`` (or of the file ``$CASCADE_CPUINFO`` names), or None where there is none."""
    try:
        return Path(os.environ.get(CPUINFO_ENV) or "/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
