"""DICOM SEG of a positive prediction: the one writer used by ``cascade predict --dicom-seg``, the web service and
the DICOM node.

A binary Segmentation (highdicom) with one segment, "Pneumothorax" (SNOMED CT 36118008, category 49755003
"Morphologically abnormal structure"), at the source image's native Rows x Columns, referencing the source's
study, series and SOP instance, and copying its required patient and study attributes (so a PACS files it with the
image; :func:`cascade.outputs.dicom_common.study_header`) and nothing else of the patient, study or equipment.
The algorithm is identified as ``cascade`` with the package version (family: artificial intelligence) and, as its
parameters, the model folder's name and digest (:func:`cascade.outputs.dicom_common.model_parameters`), the same that
the SR and the Secondary Capture carry. The SR of the same image references this SEG by its SOP Instance UID
(:func:`cascade.outputs.dicom_sr.report` takes the SEG dataset).

Only positive predictions get a SEG: a negative has nothing to segment, and an empty SEG would look like a finding
in a PACS list. The source header travels with the :class:`~cascade.inference.pipeline.Prediction` (read once with the
pixels), so writing a SEG never re-reads the source file.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from cascade.errors import CascadeError
from cascade.outputs.dicom_common import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    identity,
    model_parameters,
    save,
    study_header,
    to_bytes,
)

if TYPE_CHECKING:
    from cascade.inference.pipeline import Prediction

SEGMENT_LABEL = "Pneumothorax"
SEGMENT_NUMBER = 1
"""The one segment of every SEG (what the SR's reference names)."""
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
    model = identity(prediction)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="cascade", version=model.version, family=codes.cid7162.ArtificialIntelligence,
        parameters=model_parameters(model) or None,
    )
    segment = hd.seg.SegmentDescription(
        segment_number=SEGMENT_NUMBER,
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
                source_images=[_source_for_seg(source)],
                pixel_array=prediction.mask.astype(np.uint8)[np.newaxis],
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[segment],
                series_instance_uid=hd.UID(),
                series_number=SERIES_NUMBER,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=MANUFACTURER,
                manufacturer_model_name=MANUFACTURER_MODEL_NAME,
                software_versions=model.version,
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


def _source_for_seg(source: Dataset) -> Dataset:
    """What highdicom is given of the source: its identity and required patient and study attributes
    (:func:`~cascade.outputs.dicom_common.study_header`) and the image attributes a SEG derives from it
    (:data:`IMAGE`). Nothing else reaches the SEG — no patient comments, no acquisition equipment or institution."""
    header = study_header(source)
    for keyword in IMAGE:
        if keyword in source:
            header[keyword] = copy.deepcopy(source[keyword])
    return header


IMAGE = (
    "Rows", "Columns", "Modality", "PixelSpacing", "ImagerPixelSpacing", "PatientOrientation", "NumberOfFrames",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "ImageOrientationPatient", "ImagePositionPatient",
    "SliceThickness", "SpacingBetweenSlices", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "LossyImageCompression", "LossyImageCompressionMethod", "LossyImageCompressionRatio",
)
"""Source image attributes highdicom derives a SEG's geometry, frame of reference and lossy-compression history
from (checked on CR/CT/MR/US/SC samples: with only these, the SEG differs from one built from the whole header in
the optional patient and study attributes and the acquisition equipment only)."""


def write_segmentation(prediction: Prediction, path: str | os.PathLike[str]) -> Path:
    """Write the DICOM SEG of a positive prediction to ``path`` atomically; return the path."""
    return save(segmentation(prediction), path)


def segmentation_bytes(prediction: Prediction) -> bytes:
    """The DICOM SEG of a positive prediction as a Part 10 byte stream (for HTTP answers and C-STORE)."""
    return to_bytes(segmentation(prediction))
