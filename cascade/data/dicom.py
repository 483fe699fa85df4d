"""Read one DICOM radiograph as float32 pixels in [0,1], MONOCHROME2 sense, or fail with one clear line.

Pixels: stored values go through the modality LUT (rescale slope/intercept or a Modality LUT Sequence, by pydicom's
``apply_modality_lut``), are scaled linearly so that the whole range the header allows (from BitsStored and
PixelRepresentation, through the modality LUT) maps onto [0,1], and are inverted once for MONOCHROME1. The scale
depends on the header only, never on the image's own minimum and maximum, so one grey value means the same on every
image of a device.

No VOI LUT (window centre/width) is applied, and none is offered: the networks learn their own contrast from the
full range, and a second intensity path would have to be recorded in the model folder and repeated exactly at
inference to give the same input. The SIIM images are 8-bit and already windowed, so it would change nothing there.

Errors are ``DicomError`` with ``"<file>: <reason>"``; the reason is written here, never copied from pydicom, whose
messages may quote header values (patient name, dates). Messages name the attribute, never a header's text; only
integers cascade itself parsed (sizes, bit depths) appear. pydicom's own warnings (which quote invalid values
verbatim) and numpy's overflow warnings are silenced inside these reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from cascade.data.limits import MAX_PIXELS, MAX_SIDE
from cascade.errors import ConfigError, DicomError, PixelBudgetError
from cascade.storage.fileio import path_kind

_SOF_MARKERS = frozenset([*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7])
"""JPEG start-of-frame markers (baseline, extended, progressive, lossless; 0xF7 is JPEG-LS): their segment holds
the frame's height and width."""

_UNDEFINED_LENGTH = 0xFFFFFFFF
_HEAD = 8192
"""Bytes read ahead of parsing, to find the file meta's transfer syntax."""
_DEFLATED = b"1.2.840.10008.1.2.1.99"
"""Deflated Explicit VR Little Endian: pydicom inflates the whole dataset at once, so a small file could expand
without bound before any check; no radiograph needs it."""
_FIRST_GROUPS = (0x0002, 0x0008)
"""Group of the first element of a DICOM stream without preamble: file meta, or a bare dataset's identification."""

DicomSource = str | os.PathLike[str] | BinaryIO | Dataset


@dataclass(frozen=True, eq=False)
class DicomImage:
    """One decoded radiograph; ``pixels`` is float32 height x width in [0,1], bright = dense (MONOCHROME2)."""

    pixels: np.ndarray
    image_id: str
    height: int
    width: int
    pixel_spacing: tuple[float, float] | None
    patient_key: str | None
    source: str
    header: Dataset | None = field(default=None, repr=False)
    """The file's header without its pixel data: the identifiers a DICOM SEG of this image must reference and
    copy (patient, study, series, SOP instance). Carried, never logged; None for an array input."""


class _Hush:
    """Python's warnings and the whole ``pydicom`` logger tree silenced while at least one read is in progress.

    Both are process-wide, so concurrent reads (the services decode in threads) share one count: the first read in
    silences, the last one out restores, and no read's end can let another's messages through. The level is set on
    ``pydicom`` itself so that its children (``pydicom.pixels.decoders.base`` logs each failing decoder plugin's
    traceback at ERROR) fall silent too; ``Logger.disabled`` would stop the parent's own records only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._level = logging.NOTSET
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                logger = logging.getLogger("pydicom")
                self._level = logger.level
                logger.setLevel(logging.CRITICAL + 1)
                self._warnings = warnings.catch_warnings()
                self._warnings.__enter__()
                warnings.simplefilter("ignore")
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._warnings.__exit__(None, None, None)
                logging.getLogger("pydicom").setLevel(self._level)


_HUSH = _Hush()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence pydicom's warnings and log lines (they quote invalid header values verbatim: a patient name in a UI
    element would reach the terminal; a failing decoder logs a traceback) and numpy's floating-point warnings, for
    the duration of one read; safe in concurrent threads (:class:`_Hush`)."""
    with _HUSH, np.errstate(all="ignore"):
        yield


def hold_dicom_loggers() -> None:
    """What a long-running service (``serve``, ``listen``) calls once at start: hold pynetdicom at WARNING, pydicom
    and highdicom at ERROR: below that they print header values (whole datasets, invalid values, the UIDs of the
    images a SEG copies from)."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.ERROR)


def read_dicom(source: DicomSource, *, max_pixels: int = MAX_PIXELS) -> DicomImage:
    """Read a path, a binary file object or a pydicom ``Dataset``; raise ``DicomError`` for anything unusable.

    ``image_id`` is the SOPInstanceUID, else the file stem (``"unknown"`` for a file object or Dataset without one).
    An image over ``max_pixels`` (:data:`MAX_PIXELS`) is refused before its pixel data is decoded.
    """
    check_max_pixels(max_pixels)
    with quiet():
        return _read_dicom(source, max_pixels)


def check_max_pixels(max_pixels: int) -> int:
    """The one check of a pixel budget (``--max-pixels``, ``max_pixels=``): a positive whole number."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"max_pixels must be a positive whole number of pixels, got {max_pixels!r}")
    return max_pixels


def _read_dicom(source: DicomSource, max_pixels: int) -> DicomImage:
    if isinstance(source, Dataset):
        name, ds, fallback_id = "<dataset>", source, "unknown"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name, ds, fallback_id = str(path), _read_path(path, header_only=False), path.stem
    elif hasattr(source, "read"):
        name, fallback_id = "<file object>", "unknown"
        fp = source if source.seekable() else io.BytesIO(source.read())
        ds = _parse(fp, name, header_only=False)
    else:
        raise TypeError(f"read_dicom takes a path, a binary file object or a pydicom Dataset, not {type(source)}")
    pixels = _pixels(ds, name, max_pixels)
    return DicomImage(
        pixels=pixels,
        image_id=str(_element(ds, "SOPInstanceUID", name) or "").strip() or fallback_id,
        height=pixels.shape[0],
        width=pixels.shape[1],
        pixel_spacing=_pixel_spacing(ds, name),
        patient_key=_patient_key(ds, name),
        source=name,
        header=_without_pixels(ds),
    )


def _without_pixels(ds: Dataset) -> Dataset:
    """A shallow copy of ``ds`` without the pixel data, so results can carry the header cheaply."""
    header = Dataset({tag: ds.get_item(tag) for tag in ds.keys() if tag.group != 0x7FE0})
    header.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    header.file_meta = getattr(ds, "file_meta", Dataset())
    return header


def read_patient_key(path: str | os.PathLike[str]) -> str | None:
    """The patient key of a DICOM file, reading its header only (fast enough for whole training sets)."""
    return read_header_facts(path)[0]


def read_header_facts(path: str | os.PathLike[str]) -> tuple[str | None, int, int]:
    """``(patient key, rows, columns)`` of a DICOM file from its header alone: what training checks before it
    decodes anything (the folds group by patient; every label must fit its image's native size)."""
    name = str(path)
    with quiet():
        ds = _read_path(Path(path), header_only=True)
        rows, cols = _header_int(ds, "Rows", name), _header_int(ds, "Columns", name)
        if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
            raise DicomError(f"{name}: absurd image size {rows} x {cols} (each side must be 1..{MAX_SIDE})")
        return _patient_key(ds, name), rows, cols


def _patient_key(ds: Dataset, name: str) -> str | None:
    """First 16 hex digits of sha256(PatientID), or None when absent or empty.

    Only for keeping one patient's images in one fold. The hash is unsalted, so it is not anonymisation: never
    write it out.
    """
    patient_id = str(_element(ds, "PatientID", name) or "").strip()
    return hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:16] if patient_id else None


def _pixel_spacing(ds: Dataset, name: str) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing; None when neither is two positives.

    Informational only, so a corrupt value counts as absent rather than failing the image.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = [float(v) for v in _element(ds, keyword, name) or ()]
        except (DicomError, TypeError, ValueError):
            continue
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
            return values[0], values[1]
    return None


def _read_path(path: Path, *, header_only: bool) -> Dataset:
    """Open and parse ``path``, turning file-system failures into one-line ``DicomError``s.

    The path is checked with ``stat`` first: opening a FIFO would block until something writes to it."""
    kind = path_kind(path)
    if kind not in ("file", "missing", "folder"):
        raise DicomError(f"{path}: is {kind}, not a DICOM file")
    try:
        with path.open("rb") as fp:
            return _parse(fp, str(path), header_only=header_only)
    except FileNotFoundError:
        raise DicomError(f"{path}: file does not exist") from None
    except IsADirectoryError:
        raise DicomError(f"{path}: is a directory, not a DICOM file") from None
    except OSError as err:
        raise DicomError(f"{path}: cannot read the file ({err.strerror or type(err).__name__})") from None


def _parse(fp: BinaryIO, name: str, *, header_only: bool) -> Dataset:
    """Parse a seekable stream: a standard file, or one without preamble if it starts like a DICOM stream."""
    start = fp.tell()
    head = fp.read(_HEAD)
    if not head:
        raise DicomError(f"{name}: empty file")
    if _DEFLATED in head:
        raise DicomError(f"{name}: the Deflated transfer syntax is not supported (pydicom inflates it whole, unbounded)")
    fp.seek(start)
    try:
        try:
            ds = dcmread(fp, stop_before_pixels=header_only)
        except InvalidDicomError:
            fp.seek(start)
            ds = dcmread(fp, stop_before_pixels=header_only, force=True)
            if not len(ds) or next(iter(ds.keys())).group not in _FIRST_GROUPS:
                raise DicomError(f"{name}: not a DICOM file") from None
    except DicomError:
        raise
    except Exception:  # pydicom fails on garbage in many ways; its messages may quote header values
        raise DicomError(f"{name}: not a readable DICOM file (corrupt header)") from None
    _check_complete(ds, name)
    if not header_only:
        _set_native_syntax(ds)
        _prefer_pillow(ds)
    return ds


def _prefer_pillow(ds: Dataset) -> None:
    """Decode JPEG Baseline with Pillow when installed: the same pixels as gdcm, measured 4 ms vs 11 ms at 1024²."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax == JPEGBaseline8Bit and "pillow" in get_decoder(syntax).available_plugins:
        ds.pixel_array_options(decoding_plugin="pillow")


def _set_native_syntax(ds: Dataset) -> None:
    """Give a dataset without a transfer syntax the native one it was read with, so its pixels decode.

    Only for native pixel data: compressed (undefined-length) pixel data does not say how it was compressed.
    """
    if "TransferSyntaxUID" in ds.file_meta or "PixelData" not in ds or ds["PixelData"].is_undefined_length:
        return
    implicit, little = ds.original_encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_complete(ds: Dataset, name: str) -> None:
    """Refuse a file cut short: pydicom keeps what it read and drops an unfinished undefined-length element."""
    if not len(ds):
        raise DicomError(f"{name}: truncated file (no data elements after the file meta header)")
    last = ds.get_item(max(ds.keys()))
    if (
        isinstance(last, RawDataElement)
        and last.length != _UNDEFINED_LENGTH
        and last.value is not None
        and len(last.value) < last.length
    ):
        raise DicomError(
            f"{name}: truncated file (the last element declares {last.length} bytes, {len(last.value)} are present)"
        )


def _element(ds: Dataset, keyword: str, name: str) -> object:
    """The value of a header element (None when absent); a value pydicom cannot convert is a ``DicomError``."""
    try:
        return ds.get(keyword)
    except Exception:  # conversion of a corrupt raw value fails in many ways; its message may quote the value
        raise DicomError(f"{name}: header element {keyword} is corrupt") from None


def _header_int(ds: Dataset, keyword: str, name: str, default: int | None = None) -> int:
    """An integer header element, required unless it has a default."""
    value = _element(ds, keyword, name)
    if value is None:
        if default is None:
            raise DicomError(f"{name}: header lacks {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomError(f"{name}: header element {keyword} is not a single integer") from None


def _pixels(ds: Dataset, name: str, max_pixels: int) -> np.ndarray:
    """Validate the image header, decode, apply the modality LUT, scale to [0,1] and undo MONOCHROME1."""
    if "PixelData" not in ds:
        raise DicomError(f"{name}: no pixel data (the file holds a header only, or was cut short)")
    samples = _header_int(ds, "SamplesPerPixel", name, default=1)
    photometric = str(_element(ds, "PhotometricInterpretation", name) or "").strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"{name}: colour image or unknown photometric interpretation ({samples} samples per pixel, "
            f"PhotometricInterpretation {'missing' if not photometric else 'not MONOCHROME1/MONOCHROME2'}) is not "
            "supported; expected a greyscale radiograph"
        )
    frames = _header_int(ds, "NumberOfFrames", name, default=1)
    if frames > 1:
        raise DicomError(f"{name}: multi-frame image ({frames} frames) is not supported; expected one radiograph")
    rows, cols = check_pixel_budget(ds, name, max_pixels)
    allocated = _header_int(ds, "BitsAllocated", name)
    stored = _header_int(ds, "BitsStored", name, default=allocated)
    signed = _header_int(ds, "PixelRepresentation", name, default=0)
    if allocated not in (8, 16, 32) or not (1 <= stored <= allocated) or signed not in (0, 1):
        raise DicomError(
            f"{name}: unsupported pixel format (BitsAllocated {allocated}, BitsStored {stored}, "
            f"PixelRepresentation {signed})"
        )
    syntax = _check_decoder(ds, name)
    if not syntax.is_encapsulated:
        expected = rows * cols * allocated // 8
        if len(ds.PixelData) < expected:
            raise DicomError(
                f"{name}: pixel data shorter than the header says ({len(ds.PixelData)} of {expected} bytes)"
            )
    try:
        stored_values = ds.pixel_array
    except Exception:  # decoders fail in many ways on corrupt streams; their messages are not ours to pass on
        raise DicomError(
            f"{name}: cannot decode the {syntax.name} pixel data (corrupt, truncated, or unlike the header says)"
        ) from None
    if stored_values.shape != (rows, cols):
        raise DicomError(f"{name}: decoded pixels are {stored_values.shape}, the header says {rows} x {cols}")
    lo, hi = (-(2 ** (stored - 1)), 2 ** (stored - 1) - 1) if signed else (0, 2**stored - 1)
    try:
        low, high = _modality_range(ds, lo, hi)
        pixels = apply_modality_lut(stored_values, ds).astype(np.float32)
    except Exception:  # a corrupt rescale or LUT fails inside pydicom in many ways
        raise DicomError(f"{name}: the modality LUT (rescale or LUT sequence) is corrupt") from None
    if not (math.isfinite(low) and math.isfinite(high) and math.isfinite(high - low) and np.isfinite(pixels).all()):
        # RescaleSlope 1e308 or NaN: scaled, such pixels would be a black image the networks may call positive
        raise DicomError(f"{name}: the modality LUT (RescaleSlope/RescaleIntercept or LUT) gives non-finite values")
    if not high > low:
        raise DicomError(f"{name}: the modality LUT maps every stored value to {low:g} (no contrast)")
    pixels -= low
    pixels /= high - low
    np.clip(pixels, 0.0, 1.0, out=pixels)
    if photometric == "MONOCHROME1":
        np.subtract(1.0, pixels, out=pixels)
    return pixels


def check_pixel_budget(ds: Dataset, name: str, max_pixels: int) -> tuple[int, int]:
    """``ds``'s (Rows, Columns), checked: ``DicomError`` for an absurd side, ``PixelBudgetError`` when it would decode
    to more than ``max_pixels`` pixels, from its header (Rows x Columns x SamplesPerPixel x NumberOfFrames) and, for
    compressed pixel data, from the stream's own size fields; nothing is decoded. What every reader calls first
    (``read_dicom``; the DICOM node before it stores an image)."""
    rows, cols = _header_int(ds, "Rows", name), _header_int(ds, "Columns", name)
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
        raise DicomError(f"{name}: absurd image size {rows} x {cols} (each side must be 1..{MAX_SIDE})")
    samples = _header_int(ds, "SamplesPerPixel", name, default=1)
    frames = _header_int(ds, "NumberOfFrames", name, default=1)
    if rows * cols * samples * frames > max_pixels:
        raise PixelBudgetError(
            f"{name}: image of {rows} x {cols} pixels is over the pixel budget of {max_pixels:,} pixels "
            "(--max-pixels); refused before decoding"
        )
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        _check_stream_size(ds, name, rows, cols)
    return rows, cols


def _check_stream_size(ds: Dataset, name: str, rows: int, cols: int) -> None:
    """Refuse compressed pixel data whose own size fields (JPEG/JPEG-LS SOF, JPEG 2000 SIZ or JP2 ihdr) disagree
    with the header, or that hides them: decoders allocate what the stream declares, so a small header must not let
    a huge stream through."""
    head = b""
    size: tuple[int, int] | None | object = None
    try:
        fragments = generate_fragments(ds.PixelData)
        next(fragments, b"")  # the Basic Offset Table
        for fragment in fragments:
            head += fragment
            size = _stream_size(head)
            if size is not _UNSAID or len(head) >= _STREAM_HEAD:
                break
    except Exception:  # a corrupt item structure; the decoder's own check reports it
        return
    if size is _UNSAID:  # not over a budget as far as anyone can tell, but not to be trusted to a decoder
        raise DicomError(
            f"{name}: the compressed stream does not declare its size in its first {len(head):,} bytes; "
            "refused before decoding"
        )
    if size is not None and size != (rows, cols):
        raise PixelBudgetError(
            f"{name}: the compressed stream declares {size[0]} x {size[1]} pixels, the header says {rows} x {cols}; "
            "refused before decoding"
        )


_STREAM_HEAD = 4 << 20
"""Bytes of a compressed frame searched for its size fields (JPEG application segments are at most 64 KiB each)."""
_UNSAID = object()
"""A JPEG-family or JPEG 2000 stream whose size fields are not in the bytes looked at (yet)."""


def _stream_size(data: bytes) -> tuple[int, int] | None | object:
    """(height, width) a JPEG-family or JPEG 2000 stream declares; None when ``data`` is not such a stream (RLE);
    ``_UNSAID`` when it is one but its size fields are not within ``data``."""
    if data[:2] == b"\xff\x4f":  # J2K codestream: SOC, then SIZ at once (Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz)
        if data[2:4] != b"\xff\x51" or len(data) < 24:
            return _UNSAID
        x, y, x0, y0 = (int.from_bytes(data[i:i + 4], "big") for i in (8, 12, 16, 20))
        return y - y0, x - x0
    if data[4:8] == b"jP  ":  # JP2 file format: the image header box holds height then width
        at = data.find(b"ihdr", 0, 4096)
        if at < 0 or len(data) < at + 12:
            return _UNSAID
        return int.from_bytes(data[at + 4:at + 8], "big"), int.from_bytes(data[at + 8:at + 12], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF_MARKERS:
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return _UNSAID


def _check_decoder(ds: Dataset, name: str) -> UID:
    """The file's transfer syntax, if an installed decoder handles it; else say which package would."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not syntax:
        raise DicomError(f"{name}: header lacks the transfer syntax (0002,0010), so the pixels cannot be decoded")
    syntax = UID(str(syntax))
    label = syntax.name if syntax.is_transfer_syntax else "(an unknown UID)"  # never echo a header's text
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(f"{name}: transfer syntax {label} is not supported by any pixel decoder") from None
    if not decoder.is_available:
        needs = "; or ".join(dep.split(" - requires ", 1)[-1] for dep in decoder.missing_dependencies)
        raise DicomError(f"{name}: no installed decoder handles {label}; install {needs}")
    return syntax


def _modality_range(ds: Dataset, lo: int, hi: int) -> tuple[float, float]:
    """Smallest and largest value the modality LUT yields for stored values lo..hi (the scale of [0,1])."""
    probes = np.array([lo, hi], dtype=np.int64)
    if ds.get("ModalityLUTSequence"):
        entries, first = ds.ModalityLUTSequence[0].LUTDescriptor[:2]
        probes = np.clip(np.arange(first, first + (entries or 2**16), dtype=np.int64), lo, hi)
    out = apply_modality_lut(probes, ds)
    return float(np.min(out)), float(np.max(out))
