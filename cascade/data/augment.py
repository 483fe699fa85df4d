"""Training augmentations, applied jointly to a cached uint8 image and its mask, and per-worker seeding.

Seeding: albumentations 2.0.8 gives every transform of ``Compose(seed=s)`` (and of ``set_random_seed(s)``) its
own generator seeded with the same ``s``, so the transforms' coin flips are identical (two p=0.5 transforms
always fire together). ``seed_augment`` instead hands the whole pipeline one shared pair of generators.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402  (the variable above must be set before this import)
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from cascade.errors import ConfigError  # noqa: E402

LEVELS = ("none", "light", "default")


def build_augment(level: str = "default", seed: int | None = None) -> A.Compose | None:
    """The augmentation pipeline for ``level`` (``None`` for ``"none"``), seeded with ``seed`` when given.

    ``light``: horizontal flip and brightness/contrast. ``default``: also a mild affine (shift ±6%, scale ±10%,
    rotate ±10°; the mask follows with nearest-neighbour sampling, borders filled with 0) and gamma.
    """
    if level not in LEVELS:
        raise ConfigError(f"unknown augmentation level {level!r} (choose from {', '.join(LEVELS)})")
    if level == "none":
        return None
    transforms: list[A.BasicTransform] = [A.HorizontalFlip(p=0.5)]
    if level == "default":
        transforms.append(
            A.Affine(
                translate_percent=(-0.0625, 0.0625),
                scale=(0.9, 1.1),
                rotate=(-10, 10),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=0.5,
            )
        )
    transforms.append(A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5))
    if level == "default":
        transforms.append(A.RandomGamma(gamma_limit=(90, 110), p=0.5))
    pipeline = A.Compose(transforms)
    if seed is not None:
        seed_augment(pipeline, seed)
    return pipeline


def seed_augment(pipeline: A.Compose, seed: int) -> None:
    """Make ``pipeline`` draw from one numpy and one Python generator seeded with ``seed``."""
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy, random and the dataset's ``augment`` from torch's worker seed.

    Torch gives each worker ``base_seed + worker_id`` with ``base_seed`` drawn from the main process's generator
    at every new iterator, so workers differ, epochs differ, and ``torch.manual_seed`` makes a run repeatable.
    """
    import torch

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset if info is not None else None
    while dataset is not None and not hasattr(dataset, "augment"):
        dataset = getattr(dataset, "dataset", None)
    pipeline = getattr(dataset, "augment", None)
    if pipeline is not None:
        seed_augment(pipeline, seed)
