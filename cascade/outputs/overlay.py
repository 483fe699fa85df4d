"""PNG overlay of a prediction: the radiograph in grey, the mask outlined in red, the classifier probability written
in the corner. The one drawing used by ``cascade predict --overlays``, the web service's ``?format=png`` and the DICOM
Secondary Capture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cascade.errors import CascadeError
from cascade.storage.fileio import atomic_path

if TYPE_CHECKING:
    from cascade.inference.pipeline import Prediction


def overlay_png(grey: np.ndarray, pred: Prediction) -> bytes:
    """The overlay as PNG bytes; ``grey`` is the radiograph as uint8 grey levels at its native size
    (:attr:`~cascade.inference.pipeline.Prediction.image`, or ``to_uint8(read_dicom(...).pixels)``)."""
    import cv2

    ok, encoded = cv2.imencode(".png", draw_overlay(grey, pred))
    if not ok:
        raise OSError(f"{pred.source}: PNG encoding failed")
    return encoded.tobytes()


def draw_overlay(grey: np.ndarray, pred: Prediction) -> np.ndarray:
    """The overlay drawing itself, uint8 BGR (OpenCV's order) at the radiograph's size: what the PNG and the DICOM
    Secondary Capture (:mod:`cascade.outputs.secondary_capture`) hold."""
    import cv2

    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise TypeError(f"an overlay is drawn on a 2-D uint8 image, got {grey.dtype} {grey.shape}")
    image = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    scale = max(image.shape[:2]) / 1024
    if pred.mask is not None and pred.mask.any():
        contours, _ = cv2.findContours(pred.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, (0, 0, 255), max(1, round(3 * scale)))
    cv2.putText(
        image,
        f"p={pred.probability:.3f}",
        (round(16 * scale), round(48 * scale)),
        cv2.FONT_HERSHEY_SIMPLEX,
        1.2 * scale,
        (0, 255, 255),
        max(1, round(2 * scale)),
        cv2.LINE_AA,
    )
    return image


def write_overlay(path: str | os.PathLike[str], pred: Prediction) -> Path:
    """Write the overlay of a prediction atomically, drawn on the image it carries (``keep_image=True``)."""
    if pred.image is None:
        raise CascadeError(f"{pred.source}: no decoded image kept with this prediction to draw an overlay on "
                           "(predict with keep_image=True)")
    data = overlay_png(pred.image, pred)
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target
