"""Numeric precision of inference: the CPU's native bf16, the autocast a precision runs under, and the tuned check.

Which precision ``auto`` means is resolved with the engine, once, by :class:`cascade.runtime.Runtime`: for torch
bf16 where the hardware computes it natively — any CUDA device, and CPUs with AVX512-BF16 or AMX
(detected from the CPU flags, never assumed) — and fp32 elsewhere: on a CPU without those units bf16 is emulated
and slower than fp32. ``fp16`` is meant for CUDA (it also runs on CPU, slowly). The thresholds of a model folder
were tuned on probabilities computed at one precision (``cascade.json`` records it; folders written before the field
existed were tuned in fp32), so running at another one warns: decisions near a threshold can move. ``int8`` is not
an autocast: it runs the calibrated int8 graphs a model folder tuned at int8 carries (:mod:`cascade.quantize`), on
ONNX Runtime on the CPU; ``auto`` never picks it for a folder without them.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path

import torch

from cascade.errors import CascadeWarning
from cascade.modeldir import TUNED_PRECISIONS

PRECISIONS = ("auto", *TUNED_PRECISIONS)
"""What ``--precision`` / ``precision=`` accept; ``auto`` resolves to one of the others, which a model folder records."""
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionWarning(CascadeWarning):
    """Inference runs at another precision than the thresholds were tuned at."""


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX flags); elsewhere bf16 is slower than fp32.

    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when None); where that file does not exist (macOS,
    Windows) PyTorch's own CPU feature probe answers.
    """
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
        if cpuinfo is None:
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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context that runs a network at ``precision`` (a resolved one) on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def check_tuned(tuned: str, used: str, where: str) -> None:
    """Warn (once per call, i.e. once per loaded model) when ``used`` differs from the ``tuned`` precision."""
    if tuned != used:
        warnings.warn(
            f"{where}: thresholds were tuned at {tuned} but inference runs at {used}; decisions near a threshold "
            f"can differ (use precision {tuned} to reproduce the tuned operating point, or re-tune at {used})",
            PrecisionWarning,
            stacklevel=3,
        )

