"""Synthetic chest radiographs with known pneumothorax masks, written in the SIIM-ACR layout.

The real images cannot be shipped, so tests, the demo and first-time users train on these: each image is drawn from
a parametric chest (body, lung fields with vessel-like markings, ribs, clavicles, mediastinum, heart, spine,
diaphragm domes) with per-image anatomy, exposure and noise. A pneumothorax is a peripheral region inside a lung
field (apex or lateral wall) where the markings are absent and the film is darker, bounded on its lung side by a
thin bright pleural line; its label is exactly the region painted. ``difficulty`` scales the lesion's contrast and
size: ``easy`` is learnable by tiny CPU models in a few epochs, ``realistic`` is subtle as on real films.

Output: ``OUT/dicom-images-train/<study>/<series>/<SOPInstanceUID>.dcm`` (Secondary Capture, CR, 8-bit
MONOCHROME2, JPEG Baseline, like the challenge's files) and ``OUT/train-rle.csv`` in the stage-1 style (header
``ImageId, EncodedPixels``, values after ``, ``, one row per annotation). Everything is a function of the seed.
"""

from __future__ import annotations

import io
import itertools
import math
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import FileDataset, FileMetaDataset, validate_file_meta
from pydicom.encaps import encapsulate
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

from cascade.data.preprocess import resize_mask, to_uint8
from cascade.data.rle import rle_decode, rle_encode
from cascade.data.synth_spec import DEFAULT_SIZE, LESION_STYLES, SYNTH_MANUFACTURER
from cascade.errors import ConfigError
from cascade.storage.fileio import atomic_path, atomic_write_text

IMAGES_DIR = "dicom-images-train"
LABELS_NAME = "train-rle.csv"
SIZE_RANGE = (32, 2048)
BANK_SIZE = 1024
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
"""pydicom's UID root; the UID suffixes are hashes of the seed, so a seed always gives the same UIDs."""
MAX_ANNOTATIONS = 3
MAX_SHAPE_TRIES = 100


@dataclass(frozen=True)
class LesionStyle:
    """How visible a pneumothorax is: ``contrast`` scales darkening, loss of markings and the pleural line;
    ``size`` scales its depth and extent."""

    contrast: float
    size: float


DIFFICULTIES: dict[str, LesionStyle] = {name: LesionStyle(*style) for name, style in LESION_STYLES.items()}


@dataclass
class Rendered:
    """One drawn radiograph: ``pixels`` uint8 HxW, the lung fields (bool HxW) and each annotation's mask."""

    pixels: np.ndarray
    lungs: np.ndarray
    annotations: list[np.ndarray]

    @property
    def mask(self) -> np.ndarray:
        """The union of the annotations (the image's pneumothorax mask)."""
        out = np.zeros(self.lungs.shape, dtype=bool)
        for a in self.annotations:
            out |= a
        return out


@dataclass
class SynthSummary:
    """What :func:`generate` wrote: counts, the label file and each image's DICOM path (ImageId → path)."""

    images: int
    positives: int
    annotations: int
    patients: int
    labels: Path
    paths: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------- anatomy


@dataclass
class _Anatomy:
    """Per-image geometry in normalised coordinates (x, y in [0,1], y down); side -1 is image left."""

    cx: float
    top: float
    width: float
    dome: dict[int, float]
    heart: tuple[float, float, float, float]
    rib_tilt: float
    rib_gap: float


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    dome_right = rng.uniform(0.66, 0.74)
    return _Anatomy(
        cx=0.5 + rng.normal(0, 0.012),
        top=rng.uniform(0.07, 0.12),
        width=rng.uniform(0.36, 0.41),
        dome={-1: dome_right, 1: dome_right + rng.uniform(0.01, 0.05)},
        heart=(rng.uniform(0.02, 0.05), rng.uniform(0.58, 0.63), rng.uniform(0.12, 0.16), rng.uniform(0.11, 0.14)),
        rib_tilt=rng.uniform(0.06, 0.11),
        rib_gap=rng.uniform(0.052, 0.062),
    )


def _smooth(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Soft version of a 0/1 map (Gaussian blur), float32."""
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(sigma_px, 0.3))


def _lowfreq_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise with about ``cells`` blobs across, unit standard deviation."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    big = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return big / max(float(big.std()), 1e-6)


def _fields(a: _Anatomy, size: int) -> dict[str, np.ndarray]:
    """Hard masks and profiles of the anatomy at ``size`` px."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = coords[None, :], coords[:, None]
    dx = x - a.cx
    side = np.where(dx < 0, -1, 1)
    d = np.abs(dx)
    # body outline: neck, sloping shoulders, chest wall
    shoulder = np.clip((y - 0.03) / 0.13, 0, 1)
    chest = a.width + 0.085 + 0.04 * np.clip(y - 0.3, 0, 1)
    half_width = 0.11 + (chest - 0.11) * (3 * shoulder**2 - 2 * shoulder**3)
    body = d < half_width
    thickness = np.sqrt(np.clip(1 - (d / half_width) ** 2, 0, 1))
    # diaphragm: one dome per side, lowest at the lateral costophrenic angle
    dome_top = np.where(side < 0, a.dome[-1], a.dome[1])
    dome = dome_top + 0.10 * ((d - 0.19) / 0.2) ** 2
    abdomen = body & (y > dome)
    # mediastinum: a column widening downwards, the heart (bulging to image right), the aortic knob
    hx, hy, hrx, hry = a.heart
    column = d < 0.058 + 0.022 * np.clip((y - 0.25) / 0.3, 0, 1)
    heart = (((dx - hx) / hrx) ** 2 + ((y - hy) / hry) ** 2 < 1) | (
        ((dx + 0.02) / 0.095) ** 2 + ((y - hy + 0.01) / (hry * 0.9)) ** 2 < 1
    )
    knob = ((dx - 0.055) / 0.035) ** 2 + ((y - 0.32) / 0.03) ** 2 < 1
    mediastinum = body & (column | heart | knob) & (y < dome) & (y > a.top - 0.02)
    # lung fields: a boxy superellipse per side, cut by the mediastinum and the dome
    lateral_centre, half_w = 0.06 + a.width / 2, a.width / 2 - 0.015
    centre_y = (a.top + 0.92) / 2
    upper = np.clip((centre_y - y) / (centre_y - a.top), 0, 1)  # apices sit over the medial half of each lung
    centre_x = lateral_centre - 0.07 * upper**2
    shape = np.abs((d - centre_x) / half_w) ** 2.6 + np.abs((y - centre_y) / (centre_y - a.top)) ** 2.0
    lungs = (shape < 1) & (y < dome) & ~mediastinum & body
    return {
        "x": np.broadcast_to(x, (size, size)),
        "y": np.broadcast_to(y, (size, size)),
        "side": np.broadcast_to(side, (size, size)),
        "body": body,
        "thickness": thickness,
        "abdomen": abdomen,
        "mediastinum": mediastinum,
        "lungs": lungs,
    }


def _polyline(canvas: np.ndarray, pts: np.ndarray, size: int, thickness: float) -> None:
    """Draw an open polyline given in normalised coordinates onto a uint8 canvas (anti-aliased)."""
    px = np.round(pts * size * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [px], False, 255, max(1, round(thickness * size)), cv2.LINE_AA, shift=4)


def _bones(rng: np.random.Generator, a: _Anatomy, size: int) -> np.ndarray:
    """Ribs (posterior arches, fainter anterior ribs) and clavicles, as an intensity map with bright cortices."""
    posterior = np.zeros((size, size), np.uint8)
    anterior = np.zeros((size, size), np.uint8)
    t = np.linspace(0, 1, 24)
    for s in (-1, 1):
        for k in range(10):
            y0 = a.top - 0.03 + k * a.rib_gap * (1 + 0.04 * k) + rng.normal(0, 0.004)
            reach = a.width + 0.05
            xs = a.cx + s * (0.03 + reach * t)
            ys = y0 - 0.045 * np.sin(0.75 * math.pi * t) + (a.rib_tilt + 0.03) * t**3
            _polyline(posterior, np.stack([xs, ys], 1), size, 0.019)
            ya = y0 + 0.09
            xs_a = a.cx + s * (0.1 + 0.3 * t[8:])
            ys_a = ya + 0.09 * (1 - t[8:]) ** 1.5 - 0.02 * t[8:]
            _polyline(anterior, np.stack([xs_a, ys_a], 1), size, 0.026)
        clavicle_t = np.linspace(0, 1, 16)
        xs_c = a.cx + s * (0.04 + 0.32 * clavicle_t)
        ys_c = a.top + 0.045 - 0.07 * clavicle_t + 0.02 * np.sin(math.pi * clavicle_t)
        _polyline(posterior, np.stack([xs_c, ys_c], 1), size, 0.028)
    kernel = np.ones((3, 3), np.uint8)
    maps = []
    for canvas in (posterior, anterior):
        fill = canvas.astype(np.float32) / 255
        cortex = cv2.morphologyEx(canvas, cv2.MORPH_GRADIENT, kernel).astype(np.float32) / 255
        maps.append(0.55 * fill + 0.45 * cortex)
    return _smooth(maps[0] + 0.35 * maps[1], 0.4 * size / 256)


def _branches(
    rng: np.random.Generator, starts: np.ndarray, angles: np.ndarray, widths: np.ndarray, side: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random-walk vessels from ``starts``: points [n, steps+1, 2], heading [n, steps], width [n, steps]."""
    n, steps = len(starts), 10
    heading = angles[:, None] + np.cumsum(rng.normal(0, 0.22, (n, steps)), axis=1)
    length = rng.uniform(0.02, 0.035, (n, steps))
    delta = np.stack([side * np.cos(heading), np.sin(heading)], -1) * length[..., None]
    points = starts[:, None, :] + np.concatenate([np.zeros((n, 1, 2)), np.cumsum(delta, axis=1)], axis=1)
    return points, heading, widths[:, None] * VESSEL_TAPER ** np.arange(steps)


VESSEL_TAPER = 0.86
RETICULAR_CELLS = 28
"""Blobs across the image in the fine lung texture: fixed, so the texture scales with the image."""
MIN_VESSEL = 0.0025


def _markings(rng: np.random.Generator, a: _Anatomy, lungs: np.ndarray, size: int) -> np.ndarray:
    """Lung markings: vessel trees branching from each hilum plus a fine reticular texture, in [0, ~1]."""
    segments, seg_widths = [], []
    for s in (-1, 1):
        starts = np.tile([a.cx + s * 0.1, 0.45 + rng.normal(0, 0.01)], (14, 1))
        angles = np.linspace(-2.6, 2.6, 14) + rng.normal(0, 0.15, 14)
        widths = np.full(14, 0.011)
        for _ in range(3):  # trunks, branches, twigs
            points, heading, width = _branches(rng, starts, angles, widths, s)
            keep = width >= MIN_VESSEL
            segments.append(np.stack([points[:, :-1][keep], points[:, 1:][keep]], 1))
            seg_widths.append(width[keep])
            spawn = keep & (rng.random(keep.shape) < 0.3) & (width * VESSEL_TAPER > 0.003)
            starts = points[:, 1:][spawn]
            angles = heading[spawn] + rng.choice([-1, 1], spawn.sum()) * rng.uniform(0.3, 0.7, spawn.sum())
            widths = width[spawn] * VESSEL_TAPER * 0.8
    lines = np.round(np.concatenate(segments) * size * 16).astype(np.int32)
    w = np.concatenate(seg_widths)
    thickness = np.maximum(1, np.round(w * size)).astype(int)
    level = (255 * np.minimum(1.0, 0.45 + 40 * w) / 32).astype(int) * 32
    canvas = np.zeros((size, size), np.uint8)
    for value in np.unique(level):
        for px in np.unique(thickness[level == value]):
            chosen = lines[(level == value) & (thickness == px)]
            cv2.polylines(canvas, list(chosen[:, :, None, :]), False, int(value), int(px), cv2.LINE_AA, shift=4)
    trees = _smooth(canvas.astype(np.float32) / 255, 0.5 * size / 256)
    cells = min(RETICULAR_CELLS, size // 3)
    texture = _lowfreq_noise(rng, size, cells) - _lowfreq_noise(rng, size, cells // 2) * 0.5
    reticular = np.exp(-((texture / 0.45) ** 2))
    return (0.8 * trees + 0.35 * reticular) * lungs


# ----------------------------------------------------------------------------------------------------- lesions


def _lesion(rng: np.random.Generator, lung: np.ndarray, size: int, style: LesionStyle) -> np.ndarray:
    """A peripheral crescent inside one lung field (apex to lateral wall), never empty when the lung is not."""
    dist = cv2.distanceTransform(lung.astype(np.uint8), cv2.DIST_L2, 5)
    rows, cols = np.nonzero(lung)
    cy, cx = rows.mean(), cols.mean()
    side = -1 if cx < size / 2 else 1
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phi = np.arctan2(yy - cy, side * (xx - cx))
    best = np.zeros_like(lung)
    for _ in range(8):
        centre = rng.uniform(-1.9, 0.5)
        half = rng.uniform(0.35, 0.85) * (0.6 + 0.4 * style.size)
        depth_px = max(2.0, rng.uniform(0.03, 0.11) * style.size * size)
        delta = np.angle(np.exp(1j * (phi - centre))) / half
        wobble = 1 + 0.25 * np.sin(rng.uniform(2, 5) * delta + rng.uniform(0, 2 * math.pi))
        profile = np.cos(np.clip(np.abs(delta), 0, 1) * math.pi / 2) ** 0.6 * wobble
        region = lung & (np.abs(delta) < 1) & (dist <= depth_px * profile)
        if region.sum() > best.sum():
            best = region
        if best.sum() >= max(6, 0.002 * size * size * style.size):
            break
    return best


def _split_lungs(lungs: np.ndarray) -> list[np.ndarray]:
    """The two lung fields (image left, image right), each as its own mask."""
    half = lungs.shape[1] // 2
    left, right = lungs.copy(), lungs.copy()
    left[:, half:] = False
    right[:, :half] = False
    return [m for m in (left, right) if m.any()]


def _pleural_line(lesion: np.ndarray, lungs: np.ndarray, size: int) -> np.ndarray:
    """Pixels just outside the lesion on its lung side: where the visceral pleura of the collapsed lung shows."""
    width = max(1, round(size / 256))
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    grown = cv2.dilate(lesion.astype(np.uint8), kernel) > 0
    inner_lung = cv2.erode(lungs.astype(np.uint8), kernel) > 0
    return grown & ~lesion & inner_lung


# ----------------------------------------------------------------------------------------------------- render


def render(
    rng: np.random.Generator,
    size: int,
    n_lesions: int = 0,
    difficulty: str = "easy",
    shapes: Iterable[list[np.ndarray]] | None = None,
) -> Rendered:
    """Draw one radiograph at ``size`` px with ``n_lesions`` procedural annotations, or with given shapes.

    ``shapes`` yields candidate annotation sets (bool ``size`` x ``size`` masks, one per annotation); the first
    that overlaps this image's lung fields is used, clipped to them (a pneumothorax lies inside the pleura), and
    ``n_lesions`` is ignored. The returned annotations are exactly the regions painted.
    """
    style = _style(difficulty)
    a = _draw_anatomy(rng)
    f = _fields(a, size)
    scale = size / 256
    lungs = f["lungs"]
    if shapes is not None:
        annotations = _fit_shapes(shapes, lungs)
    elif n_lesions > 0:
        fields = _split_lungs(lungs)
        first = int(rng.integers(len(fields)))
        annotations = []
        for i in range(n_lesions):
            # later annotations of one image mostly extend the same lung; a few are on the other side
            other = i > 0 and rng.random() < 0.2
            annotations.append(_lesion(rng, fields[(first + other) % len(fields)], size, style))
    else:
        annotations = []
    lesion = np.zeros((size, size), dtype=bool)
    for m in annotations:
        lesion |= m

    y = f["y"]
    lung_soft = _smooth(lungs, 2.0 * scale)
    img = np.where(f["body"], 0.30 + 0.22 * np.sqrt(f["thickness"]), 0.03).astype(np.float32)
    img = _smooth(img, 2.5 * scale)
    img += 0.12 * _smooth(f["abdomen"], 0.8 * scale)
    img += 0.19 * _smooth(f["mediastinum"], 2.0 * scale)
    air = 0.36 * (1 - 0.45 * np.clip((y - a.top) / 0.6, 0, 1) ** 2) * (1 + 0.06 * _lowfreq_noise(rng, size, 4))
    img -= air * lung_soft
    spine = np.abs(f["x"] - a.cx) < 0.032
    vertebrae = 0.8 + 0.2 * np.cos(2 * math.pi * (y - rng.uniform(0, 0.05)) / 0.048)
    img += 0.05 * _smooth(spine & f["body"], 1.0 * scale) * vertebrae
    trachea = (np.abs(f["x"] - a.cx - 0.004) < 0.013) & (y < 0.34)
    img -= 0.10 * _smooth(trachea, 1.5 * scale)
    img += 0.10 * _bones(rng, a, size) * f["body"] * (1 - 0.7 * (f["abdomen"] | f["mediastinum"]))

    markings = _markings(rng, a, lungs, size)
    keep = 1.0 - min(1.0, style.contrast)
    markings = np.where(lesion, keep * markings, markings)
    img += 0.13 * markings * lung_soft
    img -= 0.09 * style.contrast * lesion
    img += 0.13 * style.contrast * _smooth(_pleural_line(lesion, lungs, size), 0.4 * scale)

    gain, offset, gamma = rng.uniform(0.85, 1.2), rng.uniform(-0.05, 0.06), rng.uniform(0.8, 1.25)
    img = img * gain + offset
    img *= 1 + rng.uniform(-0.08, 0.08) * (y - 0.5) * 2
    img = np.clip(img, 0, 1) ** gamma
    img += rng.uniform(0.006, 0.02) * rng.standard_normal((size, size)).astype(np.float32)
    img = _smooth(img, 0.5 * scale)
    return Rendered(pixels=to_uint8(np.clip(img, 0, 1)), lungs=lungs, annotations=annotations)


def _fit_shapes(shapes: Iterable[list[np.ndarray]], lungs: np.ndarray) -> list[np.ndarray]:
    """The first candidate annotation set that overlaps the lungs, each annotation clipped to them."""
    for candidate in itertools.islice(shapes, MAX_SHAPE_TRIES):
        clipped = [np.asarray(m, dtype=bool) & lungs for m in candidate]
        if any(m.any() for m in clipped):
            return [m for m in clipped if m.any()]
    raise ConfigError(f"none of {MAX_SHAPE_TRIES} mask shapes overlaps the synthetic lung fields")


def _style(difficulty: str) -> LesionStyle:
    try:
        return DIFFICULTIES[difficulty]
    except KeyError:
        raise ConfigError(f"unknown difficulty {difficulty!r} (choose {' or '.join(DIFFICULTIES)})") from None


# ----------------------------------------------------------------------------------------------------- writing


def _check_arguments(images: int, positive_fraction: float, size: int, seed: int) -> None:
    if int(images) < 1:
        raise ConfigError(f"--images must be at least 1, got {images}")
    if not 0.0 <= float(positive_fraction) <= 1.0:
        raise ConfigError(f"--positive-fraction must be within 0..1, got {positive_fraction}")
    if not SIZE_RANGE[0] <= int(size) <= SIZE_RANGE[1]:
        raise ConfigError(f"--size {size} is out of range ({SIZE_RANGE[0]}..{SIZE_RANGE[1]})")
    if int(seed) < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")


def _check_out(out: Path) -> None:
    """Refuse to mix a new data set into an existing one (the label file would no longer match the images)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    images_dir = out / IMAGES_DIR
    if (out / LABELS_NAME).exists() or (images_dir.is_dir() and any(images_dir.iterdir())):
        raise ConfigError(f"{out}: already holds a data set ({IMAGES_DIR}/ or {LABELS_NAME}); choose a new folder")


def _bank_masks(labels_csv: str | Path) -> list[list[tuple[str, str]]]:
    """(where, RLE) of each annotation of every positive with 1..3 annotations in a 1024² label file."""
    from cascade.data.labels import read_labels

    labels = read_labels(labels_csv)
    bank = [
        [(f"{labels.source}:row {row} (ImageId {image_id})", rle) for rle, row in zip(rles, labels.rows[image_id])]
        for image_id in labels.positives
        if len(rles := labels.annotations[image_id]) <= MAX_ANNOTATIONS
    ]
    if not bank:
        raise ConfigError(f"{labels_csv}: has no positive image with 1..{MAX_ANNOTATIONS} annotations to copy")
    return bank


def _bank_shapes(
    rng: np.random.Generator, bank: list[list[tuple[str, str]]], size: int
) -> Iterator[list[np.ndarray]]:
    """Endless random draws from the bank: the annotation masks of one positive, resized to ``size``."""
    while True:
        entry = bank[int(rng.integers(len(bank)))]
        yield [resize_mask(rle_decode(rle, BANK_SIZE, BANK_SIZE, where=where), size) for where, rle in entry]


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=["cascade-synth", str(seed), *map(str, parts)]))


def _write_dicom(path: Path, pixels: np.ndarray, uids: dict[str, str], patient: str, extra: dict[str, str]) -> None:
    """One challenge-like DICOM: Secondary Capture, CR, 8-bit MONOCHROME2, JPEG Baseline encapsulated pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uids["sop"]
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    validate_file_meta(meta, enforce_standard=True)
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uids["sop"]
    ds.StudyDate, ds.StudyTime = "19010101", "000000.00"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.Modality, ds.ConversionType = "CR", "WSD"
    ds.Manufacturer = SYNTH_MANUFACTURER
    ds.SeriesDescription = f"view: {extra['view']}"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient, patient, ""  # anonymous: a fake UUID per patient
    ds.PatientSex, ds.PatientAge = extra["sex"], extra["age"]
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", extra["view"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation = "", 1, 1, ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [extra["spacing"], extra["spacing"]]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.add_new(0x7FE00010, "OB", encapsulate([buffer.getvalue()]))
    ds["PixelData"].is_undefined_length = True
    with atomic_path(path) as tmp:
        dcmwrite(tmp, ds)


def _patient_sizes(rng: np.random.Generator, images: int) -> list[int]:
    """Images per patient (1..4, mostly 1–2), summing to ``images``."""
    sizes: list[int] = []
    while sum(sizes) < images:
        sizes.append(int(rng.choice([1, 2, 3, 4], p=[0.45, 0.3, 0.15, 0.1])))
    sizes[-1] -= sum(sizes) - images
    return sizes


def generate(
    out: str | Path,
    images: int = 200,
    positive_fraction: float = 0.22,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    difficulty: str = "easy",
    mask_bank: str | Path | None = None,
    progress: bool = True,
) -> SynthSummary:
    """Write ``images`` synthetic radiographs and their labels to ``out`` in the SIIM-ACR layout.

    Exactly ``round(images * positive_fraction)`` images are positive, with 1–3 annotations each (one CSV row
    per annotation). ``mask_bank`` (a 1024² label CSV such as the challenge's) supplies real mask shapes instead
    of procedural ones. The same arguments always give the same files, byte for byte.
    """
    from cascade.common.progress import progress_bar

    _check_arguments(images, positive_fraction, size, seed)
    _style(difficulty)
    out = Path(out)
    _check_out(out)
    bank = _bank_masks(mask_bank) if mask_bank is not None else None

    plan = np.random.default_rng([seed, 1])
    n_pos = round(images * positive_fraction)
    positive = np.zeros(images, dtype=bool)
    positive[plan.permutation(images)[:n_pos]] = True
    n_annotations = np.where(positive, plan.choice([1, 2, 3], size=images, p=[0.75, 0.18, 0.07]), 0)
    sizes = _patient_sizes(plan, images)
    patient_of = np.repeat(np.arange(len(sizes)), sizes)
    patients = [str(uuid.UUID(bytes=plan.bytes(16), version=4)) for _ in sizes]
    spacing = f"{0.168 * BANK_SIZE / size:.6g}"

    rows = ["ImageId, EncodedPixels"]
    paths: dict[str, Path] = {}
    total_annotations = 0
    for i in progress_bar(range(images), desc="synth", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, 2, i])
        uids = {kind: _uid(seed, kind, i) for kind in ("sop", "study", "series")}
        shapes = _bank_shapes(rng, bank, size) if bank is not None and positive[i] else None
        picture = render(rng, size, int(n_annotations[i]), difficulty, shapes)
        path = out / IMAGES_DIR / uids["study"] / uids["series"] / f"{uids['sop']}.dcm"
        extra = {
            "view": "PA" if rng.random() < 0.6 else "AP",
            "sex": "M" if rng.random() < 0.55 else "F",
            "age": f"{int(rng.integers(18, 86)):03d}Y",
            "spacing": spacing,
        }
        _write_dicom(path, picture.pixels, uids, patients[patient_of[i]], extra)
        paths[uids["sop"]] = path
        encoded = [rle_encode(m) for m in picture.annotations] or ["-1"]
        rows += [f"{uids['sop']}, {rle}" for rle in encoded]
        total_annotations += len(picture.annotations)
    labels = out / LABELS_NAME
    atomic_write_text(labels, "\n".join(rows) + "\n")
    return SynthSummary(
        images=images,
        positives=int(positive.sum()),
        annotations=total_annotations,
        patients=len(sizes),
        labels=labels,
        paths=paths,
    )
