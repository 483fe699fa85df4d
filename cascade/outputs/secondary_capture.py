"""DICOM Secondary Capture of a positive prediction: the overlay as a picture a PACS viewer shows like any image,
for viewers that cannot display a DICOM SEG (``cascade predict --secondary-capture``, off unless asked).

The pixels are the radiograph (:attr:`~cascade.inference.pipeline.Prediction.image`, its grey levels at the native size)
with the overlay of :func:`cascade.outputs.overlay.draw_overlay` burned in — the predicted outline in red, the
classifier probability in the corner — under a black banner added above the image that says, burned into the pixels too,
:data:`BANNER` (``AI RESULT - cascade <version> - NOT FOR DIAGNOSIS``): the banner is added, not drawn over the film,
so it hides nothing of it. RGB, 8 bits, uncompressed; BurnedInAnnotation ``YES``; image type
DERIVED\\SECONDARY\\OTHER with the source in the Source Image Sequence and the model (version, folder, digest,
thresholds) in the Derivation Description.

Like the SEG and the SR it joins the source's study in a series of its own and copies only the required patient and
study attributes (:func:`cascade.outputs.dicom_common.study_header`), the source's Patient Orientation (type 2C)
and, when the source was lossy compressed, that fact (Lossy Image Compression ``01`` is never reset). A negative
has no outline and gets no Secondary Capture (its SR says so).
"""

from __future__ import annotations

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
    check_source,
    identity,
    model_description,
    save,
    study_header,
    to_bytes,
)

if TYPE_CHECKING:
    from cascade.inference.pipeline import Prediction
    from cascade.storage.modeldir import ModelIdentity

SERIES_NUMBER = 9903
"""Series number of every Secondary Capture series cascade writes (SEG 9901, SR 9902)."""
SERIES_DESCRIPTION = "cascade pneumothorax overlay (AI, not for diagnosis)"
BANNER = "AI RESULT - cascade {version} - NOT FOR DIAGNOSIS"
"""The text burned into the banner above every Secondary Capture (``{version}``: the cascade version)."""
_ORIENTATION = set("APRLHF")


def secondary_capture(prediction: Prediction) -> Dataset:
    """The Secondary Capture of a positive prediction that kept its image (``predict_many(keep_image=True)``);
    ``CascadeError`` for a negative, a failed image, an array source or a prediction without its image."""
    source = check_source(prediction, "DICOM Secondary Capture")
    if not prediction.positive:
        raise CascadeError(f"{prediction.source}: no DICOM Secondary Capture for a negative image (no outline)")
    if prediction.image is None:
        raise CascadeError(f"{prediction.source}: no decoded image kept with this prediction to draw on "
                           "(predict with keep_image=True)")
    model = identity(prediction)
    pixels = render(prediction.image, prediction, BANNER.format(version=model.version))
    orientation = source.get("PatientOrientation", "")
    sc = _sc_image(prediction, pixels, study_header(source), orientation, model.version)
    _complete(sc, source, orientation, model)
    return sc


def _sc_image(prediction: Prediction, pixels: np.ndarray, header: Dataset, orientation: object,
              version: str) -> Dataset:
    """The highdicom SC image of ``pixels`` in the source's study (``header``), new series; any refusal by highdicom
    becomes one ``CascadeError`` naming the source, since only an odd source header can cause it."""
    import highdicom as hd

    with warnings.catch_warnings():  # highdicom quotes odd header values in its warnings: never shown
        warnings.simplefilter("ignore")
        try:
            return hd.sc.SCImage(
                pixel_array=pixels,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                study_instance_uid=header.StudyInstanceUID,
                series_instance_uid=hd.UID(),
                series_number=SERIES_NUMBER,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=MANUFACTURER,
                patient_id=header.PatientID,
                patient_name=header.PatientName,
                patient_birth_date=header.PatientBirthDate or None,
                patient_sex=header.PatientSex or None,
                accession_number=header.AccessionNumber,
                study_id=header.StudyID,
                study_date=header.StudyDate or None,
                study_time=header.StudyTime or None,
                referring_physician_name=header.ReferringPhysicianName,
                # highdicom wants a two-letter orientation here; the source's own value (type 2C, empty when
                # unknown) replaces it below
                patient_orientation=_orientation(orientation) or ("L", "F"),
                specific_character_set=header.get("SpecificCharacterSet"),
                series_description=SERIES_DESCRIPTION,
                manufacturer_model_name=MANUFACTURER_MODEL_NAME,
                software_versions=version,
            )
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            raise CascadeError(
                f"{prediction.source}: cannot build a DICOM Secondary Capture from this source ({type(err).__name__})"
            ) from None


def _complete(sc: Dataset, source: Dataset, orientation: object, model: ModelIdentity) -> None:
    """Set what highdicom leaves out or fills otherwise: the source's orientation, the type 2 attributes present
    (maybe empty), the burned-in flag, the source image, the model's derivation and a lossy source's mark."""
    from pydicom.sequence import Sequence

    sc.PatientOrientation = orientation
    sc.Laterality = ""  # General Series, type 2C (a chest is not a paired structure): present and empty
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime"):  # type 2: present, maybe empty
        if keyword not in sc or sc[keyword].value is None:
            setattr(sc, keyword, "")
    sc.BurnedInAnnotation = "YES"
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = source.SOPClassUID
    referenced.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = Sequence([referenced])
    sc.DerivationDescription = "; ".join(
        [f"cascade {model.version} pneumothorax outline and banner burned in", *model_description(model)]
    )[:1024]
    if source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"


def render(grey: np.ndarray, prediction: Prediction, banner: str) -> np.ndarray:
    """The Secondary Capture's pixels, uint8 RGB: a black band holding ``banner`` in white, above the overlay
    drawing (:func:`cascade.outputs.overlay.draw_overlay`) of the radiograph ``grey``."""
    import cv2

    from cascade.outputs.overlay import draw_overlay

    drawn = draw_overlay(grey, prediction)
    width = drawn.shape[1]
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, max(1, round(width / 512))
    (text_w, text_h), base = cv2.getTextSize(banner, font, 1.0, thickness)
    scale = min(0.96 * width / text_w, max(width, 256) / 1024 * 1.2)  # fits the width; 1.2 on a 1024 film
    band = int(np.ceil((text_h + base) * scale * 1.8)) + 2
    canvas = np.zeros((band + drawn.shape[0], width, 3), dtype=np.uint8)
    canvas[band:] = drawn
    origin = (max(1, (width - round(text_w * scale)) // 2), (band + round(text_h * scale)) // 2)
    cv2.putText(canvas, banner, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)


def write_secondary_capture(prediction: Prediction, path: str | os.PathLike[str]) -> Path:
    """Write the Secondary Capture of a positive prediction to ``path`` atomically; return the path."""
    return save(secondary_capture(prediction), path)


def secondary_capture_bytes(prediction: Prediction) -> bytes:
    """The Secondary Capture of a positive prediction as a Part 10 byte stream (for HTTP answers and C-STORE)."""
    return to_bytes(secondary_capture(prediction))


def _orientation(value: object) -> tuple[str, str] | None:
    """The source's Patient Orientation as highdicom takes it (two single letters, e.g. ``P\\F``), else None."""
    from pydicom.multival import MultiValue

    values = [str(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else []
    if len(values) == 2 and all(v in _ORIENTATION for v in values):
        return values[0], values[1]
    return None
