"""Training datasets for both stages, on top of the preprocessing cache.

An image goes file → ``PreprocessCache`` (``prepare_image``, the same as inference) → optional joint augmentation
in uint8 → ``normalize``. Datasets hold only paths, labels and the cache object, so they pickle into DataLoader
workers; a missing or unreadable file raises the ``DicomError`` naming it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cascade.data.cache import PreprocessCache
from cascade.data.preprocess import Preprocessing, normalize, resize_mask
from cascade.errors import ConfigError

if TYPE_CHECKING:
    import albumentations as A

    from cascade.data.labels import Labels


@dataclass(frozen=True)
class Item:
    """One labelled training image."""

    image_id: str
    path: Path
    positive: bool


def make_items(paths: Mapping[str, Path], labels: Labels) -> list[Item]:
    """Items for the images that have labels, in the order of ``paths`` (``index.match`` reports the others)."""
    return [
        Item(image_id, Path(path), bool(labels.is_positive(image_id)))
        for image_id, path in paths.items()
        if image_id in labels.annotations
    ]


class _CachedImages(Dataset):
    """Shared part of both datasets: items, preprocessing, cache, augmentation and the labels masks come from."""

    def __init__(
        self,
        items: Sequence[Item],
        prep: Preprocessing,
        cache: PreprocessCache,
        augment: A.Compose | None = None,
        labels: Labels | None = None,
    ) -> None:
        if cache.size != prep.size:
            raise ConfigError(f"the cache holds {cache.size}px images but preprocessing asks for {prep.size}px")
        self.items = list(items)
        self.labels = labels
        self.prep = prep
        self.cache = cache
        self.augment = augment
        self.positive = np.array([item.positive for item in self.items], dtype=np.bool_)

    def __len__(self) -> int:
        return len(self.items)

    def image_id(self, i: int) -> str:
        """The ImageId of item ``i``."""
        return self.items[i].image_id

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(normalize(image, self.prep)[None])


    def _image_and_mask(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented image and its mask from ``labels`` (float32 [1,S,S] in {0,1}), transformed together."""
        labels = self.labels
        assert labels is not None, "a dataset that yields masks is built with the labels"
        item = self.items[i]
        cached = self.cache.get(item.image_id, item.path)
        size = self.prep.size
        if item.positive:
            mask = resize_mask(labels.mask(item.image_id, cached.height, cached.width), size).view(np.uint8)
        else:
            mask = np.zeros((size, size), dtype=np.uint8)
        image = cached.image
        if self.augment is not None:
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return self._tensor(image), torch.from_numpy(mask.astype(np.float32)[None])


class ClassifierDataset(_CachedImages):
    """``(image float32 [1,S,S], label float32 scalar: 1 for a positive image)``; with ``labels`` (training with
    the auxiliary mask loss) the target is ``(label, mask float32 [1,S,S])``, the mask transformed with the image."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        item = self.items[i]
        label = torch.tensor(float(item.positive), dtype=torch.float32)
        if self.labels is not None:
            image, mask = self._image_and_mask(i)
            return image, (label, mask)
        image = self.cache.get(item.image_id, item.path).image
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        return self._tensor(image), label


class SegmenterDataset(_CachedImages):
    """``(image float32 [1,S,S], mask float32 [1,S,S] in {0,1})``; the mask is transformed with the image."""

    def __init__(
        self,
        items: Sequence[Item],
        prep: Preprocessing,
        cache: PreprocessCache,
        labels: Labels,
        augment: A.Compose | None = None,
    ) -> None:
        super().__init__(items, prep, cache, augment, labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._image_and_mask(i)
