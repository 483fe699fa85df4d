"""The one preprocessing path from decoded pixels to network input, shared by training, tuning and inference.

Two steps, split so the first can be cached: ``prepare_image`` turns a float [0,1] radiograph of any size into a
square uint8 image at the model's input size (the preprocessing cache stores exactly this), and ``normalize``
turns uint8 images into the float tensor the networks see.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from cascade.errors import ConfigError


@dataclass(frozen=True)
class Preprocessing:
    """Input size and intensity normalisation; written to ``cascade.json`` so inference repeats training exactly."""

    size: int = 512
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        if type(self.size) is not int or not 16 <= self.size <= 4096:
            raise ConfigError("image size must be an integer in 16..4096")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"normalisation {name} must be a finite number")
        if self.std <= 0:
            raise ConfigError(f"normalisation std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        unknown = set(data) - {"size", "mean", "std"}
        if unknown:
            raise ConfigError(f"unknown preprocessing keys: {', '.join(sorted(unknown))}")
        return cls(**data)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Quantise float pixels in [0,1] to uint8 (rounded, clipped)."""
    return np.clip(np.rint(np.asarray(pixels, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image to ``size`` x ``size``: area averaging when shrinking, bilinear when enlarging."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    shrinking = size < min(h, w)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool mask to ``size`` x ``size`` (area fraction ≥ 0.5 when shrinking, nearest when enlarging)."""
    m = np.asarray(mask, dtype=np.uint8) * 255
    return resize(m, size) >= 128


def prepare_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """Float [0,1] radiograph of any shape → uint8 ``size`` x ``size`` (what the preprocessing cache holds)."""
    return resize(to_uint8(pixels), size)


def normalize(images: Any, prep: Preprocessing) -> Any:
    """uint8 images (numpy or torch, any leading shape) → float32 ``(x / 255 - mean) / std``."""
    scale = 1.0 / (255.0 * prep.std)
    offset = prep.mean / prep.std
    if isinstance(images, np.ndarray):
        return images.astype(np.float32) * scale - offset
    return images.float() * scale - offset
