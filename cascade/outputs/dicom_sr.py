"""DICOM Structured Report of a prediction: the one SR encoding, written for every analysed image, positive or
negative (``cascade predict --dicom-sr``; the web service and the DICOM node are to send its bytes too).

A Comprehensive SR (highdicom) whose content follows TID 1500 "Measurement Report" as far as a projection radiograph
allows: title "Imaging Measurement Report", English, the observer a device (``cascade``, its UID derived from the
version and the model digest), procedure "Imaging procedure", and one measurement group for the pneumothorax:

- finding "Pneumothorax" (SCT 36118008), category "Morphologically abnormal structure" (SCT 49755003);
- the qualitative evaluation "Pneumothorax" = "Present" (SCT 52101004) or "Absent" (SCT 272519000) — the cascade's
  final decision (its mask is not empty);
- the classifier probability ("Probability", DCM 122157, no units) and the predicted area ("Area", SCT 42798000, in
  ``{pixels}`` of the source image, 0 for a negative);
- the algorithm (TID 4019): name ``cascade``, version, family "Artificial Intelligence", and as parameters the model
  folder's name and digest, the thresholds in use and what they were tuned for
  (:func:`cascade.outputs.dicom_common.model_description`);
- the references: a positive whose DICOM SEG was made with it is a TID 1410 planar ROI group whose region is the
  SEG's segment 1 ("Referenced Segmentation Frame", naming the segment number, not the frame: the macro takes one
  of the two), with the source image as the segmentation's source; otherwise (a negative, or no SEG) a
  TID 1501 group whose source of measurement is the radiograph.

The report is complete, unverified and preliminary (no person has read it). It joins the source's study in a series
of its own and copies only the required patient and study attributes (:func:`cascade.outputs.dicom_common
.study_header`); its evidence lists the source and the SEG. An image that could not be analysed gets no SR.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from cascade.errors import CascadeError
from cascade.outputs.dicom_common import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    REFERENCE,
    check_source,
    identity,
    model_description,
    save,
    study_header,
    to_bytes,
)
from cascade.outputs.dicom_seg import SEGMENT_NUMBER

if TYPE_CHECKING:
    from cascade.inference.pipeline import Prediction

SERIES_NUMBER = 9902
"""Series number of every SR series cascade writes (the SEG's is 9901, the Secondary Capture's 9903)."""
SERIES_DESCRIPTION = "cascade pneumothorax report (AI, unverified)"
PIXELS = ("{pixels}", "UCUM", "pixels")
"""The unit of the predicted area: pixels of the source image (a UCUM annotation; a projection radiograph's pixel
spacing lies at the detector, so no area in mm² is claimed)."""
TRACKING_IDENTIFIER = "pneumothorax"
"""The human-readable tracking identifier of the measurement group (its UID is new in every report)."""


def report(prediction: Prediction, segmentation: Dataset | None = None) -> Dataset:
    """The SR of an analysed image; ``segmentation`` is the DICOM SEG made for it
    (:func:`cascade.outputs.dicom_seg.segmentation`), which the SR then references — pass it only when that SEG is
    stored or sent too. ``CascadeError`` for a failed image, an array source, or a SEG of another image."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = check_source(prediction, "DICOM SR")
    if prediction.mask is None:
        raise CascadeError(f"{prediction.source}: no DICOM SR for a prediction without its mask")
    if segmentation is not None:
        _check_segmentation(prediction, source, segmentation)
    model = identity(prediction)
    finding = codes.SCT.Pneumothorax
    algorithm = hd.sr.AlgorithmIdentification(
        name="cascade", version=model.version, parameters=model_description(model) or None,
        family=codes.cid7162.ArtificialIntelligence,
    )
    group_items = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=TRACKING_IDENTIFIER),
        finding_type=finding,
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(finding, codes.SCT.Present if prediction.positive else codes.SCT.Absent)
        ],
        measurements=[
            hd.sr.Measurement(name=codes.DCM.Probability, value=float(prediction.probability),
                              unit=codes.UCUM.NoUnits),
            hd.sr.Measurement(name=codes.SCT.Area, value=int(prediction.mask.sum()), unit=hd.sr.CodedConcept(*PIXELS)),
        ],
    )
    evidence = [study_header(source)]
    if segmentation is not None:
        evidence.append(_reference(segmentation))
        region = hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            frame_number=1,
            segment_number=SEGMENT_NUMBER,
            source_image=hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID),
        )
        # the Image SOP Instance Reference macro names a frame or a segment, not both (dciodvfy refuses both): the
        # segment is named — the SEG's one frame is that segment's
        del region[0].ReferencedSOPSequence[0].ReferencedFrameNumber
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_segment=region, **group_items)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
            **group_items,
        )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(model.version, model.weights_sha256), name="cascade", manufacturer_name=MANUFACTURER,
        model_name=model.name or None,
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=None,
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            ),
        ),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[group],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    # highdicom warns about odd header values by quoting them (patient names among them): never shown
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return hd.sr.ComprehensiveSR(
                evidence=evidence,
                content=content,
                series_instance_uid=hd.UID(),
                series_number=SERIES_NUMBER,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=MANUFACTURER,
                is_complete=True,
                is_final=False,
                is_verified=False,
                series_description=SERIES_DESCRIPTION,
                manufacturer_model_name=MANUFACTURER_MODEL_NAME,
                software_versions=model.version,
            )
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            # its messages name attributes, and may quote values: the type alone is reported
            raise CascadeError(
                f"{prediction.source}: cannot build a DICOM SR from this source ({type(err).__name__})"
            ) from None


def write_report(
    prediction: Prediction, path: str | os.PathLike[str], segmentation: Dataset | None = None
) -> Path:
    """Write the SR of an analysed image to ``path`` atomically (see :func:`report`); return the path."""
    return save(report(prediction, segmentation), path)


def report_bytes(prediction: Prediction, segmentation: Dataset | None = None) -> bytes:
    """The SR of an analysed image as a Part 10 byte stream (for HTTP answers and C-STORE; see :func:`report`)."""
    return to_bytes(report(prediction, segmentation))


def device_uid(version: str, digest: str) -> str:
    """The Device Observer UID: derived (a ``2.25`` UID) from the cascade version and the model digest, so that
    every report of one model names one device."""
    from pydicom.uid import generate_uid

    return generate_uid(prefix=None, entropy_srcs=["cascade device observer", version, digest])


def _check_segmentation(prediction: Prediction, source: Dataset, segmentation: Dataset) -> None:
    """A SEG is referenced only by the SR of the positive image it segments, in its study."""
    try:
        segmented = segmentation.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        study = segmentation.StudyInstanceUID
    except (AttributeError, IndexError):
        raise CascadeError(f"{prediction.source}: the SEG given to the SR references no source image") from None
    if not prediction.positive or segmented != source.SOPInstanceUID or study != source.StudyInstanceUID:
        raise CascadeError(f"{prediction.source}: the SEG given to the SR is not this positive image's segmentation")


def _reference(dataset: Dataset) -> Dataset:
    """What the SR's evidence needs of a referenced object: its SOP, series and study UIDs."""
    reference = Dataset()
    for keyword in REFERENCE:
        setattr(reference, keyword, dataset.get(keyword))
    return reference
