"""cascade: a classifier-gated segmenter for pneumothorax on chest radiographs.

``Cascade`` and ``Prediction`` are imported lazily so that ``import cascade`` (and ``cascade --help``) stays fast
and does not import torch until a model is actually used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Cascade", "Prediction", "__version__"]

if TYPE_CHECKING:
    from cascade.inference.pipeline import Cascade, Prediction


def __getattr__(name: str) -> Any:
    if name in ("Cascade", "Prediction"):
        from cascade.inference import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'cascade' has no attribute {name!r}")
