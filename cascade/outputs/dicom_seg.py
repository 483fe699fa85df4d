"""DICOM SEG of a positive prediction: the one writer used by ``cascade predict --dicom-seg``, the web service and
the DICOM node.

A binary Segmentation (highdicom) with one segment, "Pneumothorax" (SNOMED CT 36118008, category 49755003
"Morphologically abnormal structure"), at the source image's native Rows x Columns, referencing the source's
study, series and SOP instance, and copying its patient and study modules (so a PACS files it with the image).
The algorithm is identified as ``cascade`` with the package version (family: artificial intelligence).

Only positive predictions get a SEG: a negative has nothing to segment, and an empty SEG would look like a finding
in a PACS list. The source header travels with the :class:`~cascade.pipeline.Prediction` (read once with the
pixels), so writing a SEG never re-reads the source file.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from cascade import __version__
from cascade.errors import CascadeError
from cascade.fileio import atomic_path

if TYPE_CHECKING:
    from cascade.pipeline import Prediction

SEGMENT_LABEL = "Pneumothorax"
SERIES_NUMBER = 9901
"""Series number of every SEG series cascade writes (a PACS shows it beside the source series)."""
SERIES_DESCRIPTION = "cascade pneumothorax segmentation"


def segmentation(prediction: Prediction) -> Dataset:
    """The DICOM SEG dataset of a positive prediction; ``CascadeError`` when there is nothing to write."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = prediction.header
    if not prediction.ok or prediction.mask is None:
        raise CascadeError(f"{prediction.source}: no DICOM SEG for an image that failed ({prediction.error})")
    if not prediction.positive:
        raise CascadeError(f"{prediction.source}: no DICOM SEG for a negative image (nothing to segment)")
    if source is None:
        raise CascadeError(f"{prediction.source}: a DICOM SEG needs a DICOM source (this image came from an array)")
    rows, cols = int(source.Rows), int(source.Columns)
    if prediction.mask.shape != (rows, cols):
        raise CascadeError(
            f"{prediction.source}: mask is {prediction.mask.shape}, the source header says {rows} x {cols}"
        )
    algorithm = hd.AlgorithmIdentificationSequence(
        name="cascade", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure"),
        segmented_property_type=hd.sr.CodedConcept("36118008", "SCT", "Pneumothorax"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    # highdicom warns about odd header values by quoting them (patient names among them): never shown
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            seg = hd.seg.Segmentation(
                source_images=[_valid_copy(source)],
                pixel_array=prediction.mask.astype(np.uint8)[np.newaxis],
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[segment],
                series_instance_uid=hd.UID(),
                series_number=SERIES_NUMBER,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="cascade",
                manufacturer_model_name="cascade pneumothorax cascade",
                software_versions=__version__,
                device_serial_number="none",
                series_description=SERIES_DESCRIPTION,
            )
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            # highdicom refuses sources that lack a required module; its message names attributes, not values
            raise CascadeError(
                f"{prediction.source}: cannot build a DICOM SEG from this source ({type(err).__name__})"
            ) from None
    # General Image, type 2C for an image without a patient position: copy the source's (empty when unknown)
    seg.PatientOrientation = source.get("PatientOrientation", "")
    return seg


def _valid_copy(source: Dataset) -> Dataset:
    """The source header less optional patient attributes whose values break their VR (they would be copied into
    the SEG and make it invalid): SIIM's PatientAge ``"38"`` instead of ``"038Y"`` is the case seen."""
    header = copy.deepcopy(source)
    age = str(header.get("PatientAge", ""))
    if age and not _AGE.fullmatch(age):
        del header.PatientAge
    return header


_AGE = re.compile(r"\d{3}[DWMY]")


def write_segmentation(prediction: Prediction, path: str | os.PathLike[str]) -> Path:
    """Write the DICOM SEG of a positive prediction to ``path`` atomically; return the path."""
    dataset = segmentation(prediction)
    target = Path(path)
    with atomic_path(target) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return target


def segmentation_bytes(prediction: Prediction) -> bytes:
    """The DICOM SEG of a positive prediction as a Part 10 byte stream (for HTTP answers and C-STORE)."""
    from io import BytesIO

    buffer = BytesIO()
    segmentation(prediction).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
