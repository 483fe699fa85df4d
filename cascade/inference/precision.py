"""Numeric precision of inference: the autocast a precision runs under and the tuned check.

Which precision ``auto`` means is resolved with the engine, once, by :class:`cascade.inference.runtime.Runtime`: for
torch bf16 where the hardware computes it natively — any CUDA device, and CPUs with AVX512-BF16 or AMX
(detected from the CPU flags by :func:`cascade.common.devices.cpu_supports_bf16`, never assumed) — and fp32
elsewhere: on a CPU without those units bf16 is emulated and slower than fp32. ``fp16`` is meant for CUDA (it also runs on CPU, slowly). The thresholds of a model folder
were tuned on probabilities computed at one precision (``cascade.json`` records it; folders written before the field
existed were tuned in fp32), so running at another one warns: decisions near a threshold can move. ``int8`` is not
an autocast: it runs the calibrated int8 graphs a model folder tuned at int8 carries
(:mod:`cascade.inference.quantize`), on ONNX Runtime on the CPU; ``auto`` never picks it for a folder without them.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from cascade.errors import CascadeWarning
from cascade.storage.modeldir import TUNED_PRECISIONS

PRECISIONS = ("auto", *TUNED_PRECISIONS)
"""What ``--precision`` / ``precision=`` accept; ``auto`` resolves to one of the others, which a model folder records."""
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionWarning(CascadeWarning):
    """Inference runs at another precision than the thresholds were tuned at."""


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

