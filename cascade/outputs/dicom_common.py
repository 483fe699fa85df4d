"""What the DICOM results (SEG, SR, Secondary Capture) share: the few source header values they copy, how they name
the model that made them, and how they are written.

A result joins its source's study in a series of its own. It copies from the source only what the standard requires
there: the Patient module's type 2 attributes, the General Study module's type 1 and 2 attributes (empty when the
source has none, or a value that breaks its VR: a type 2 attribute is present, possibly empty, never invented) and the
Specific Character Set those values are encoded in. Nothing else of the source's patient, study or equipment
travels — no comments, no institution, station or device of the acquisition. (The SEG also takes the image attributes
its geometry derives from: :data:`cascade.outputs.dicom_seg.IMAGE`.)

The model is named by :class:`cascade.storage.modeldir.ModelIdentity`
(:attr:`cascade.inference.pipeline.Prediction.model`, from :func:`cascade.storage.modeldir.model_identity`): the cascade
version, the model folder's name and its weights digest (:func:`cascade.storage.modeldir.weights_digest` of the sha256
of every member file, the web service's ``weights_sha256``). Every result carries version and digest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from cascade.errors import CascadeError
from cascade.storage.fileio import atomic_path

if TYPE_CHECKING:
    from cascade.inference.pipeline import Prediction
    from cascade.storage.modeldir import ModelIdentity

MANUFACTURER = "cascade"
"""General Equipment Manufacturer of every result: the software that made it (the acquisition's is not copied)."""
MANUFACTURER_MODEL_NAME = "cascade pneumothorax cascade"

PATIENT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
"""Patient module, type 2: present in every result, copied (empty when the source lacks them)."""
STUDY = ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
"""General Study module, type 2 (StudyInstanceUID, type 1, is copied too)."""
REFERENCE = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
"""What a reference to the source names."""


def check_source(prediction: Prediction, what: str) -> Dataset:
    """The source header of an analysed DICOM image; ``CascadeError`` (naming ``what``) for a failed image or one
    that came from an array."""
    if not prediction.ok:
        raise CascadeError(f"{prediction.source}: no {what} for an image that failed ({prediction.error})")
    source = prediction.header
    if source is None:
        raise CascadeError(f"{prediction.source}: a {what} needs a DICOM source (this image came from an array)")
    missing = [key for key in REFERENCE if not source.get(key)]
    if missing:
        raise CascadeError(f"{prediction.source}: no {what}: the source lacks {', '.join(missing)}")
    return source


def study_header(source: Dataset) -> Dataset:
    """The source's identity for a result: its SOP, series and study UIDs, the required Patient and General Study
    attributes (empty where it has none) and its Specific Character Set. Nothing else is read from it."""
    header = Dataset()
    if "SpecificCharacterSet" in source:
        header.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in REFERENCE:
        setattr(header, keyword, source.get(keyword))
    for keyword in PATIENT + STUDY:
        setattr(header, keyword, _valid(keyword, source.get(keyword)))
    return header


def _valid(keyword: str, value: object) -> object:
    """``value``, or empty (unknown, as a type 2 attribute allows) when it breaks its VR — a result carrying it would
    be refused, and a result is better than none: a PatientSex ``"Male"``, a StudyDate ``"2019-01-01"``."""
    from pydicom.valuerep import DA, TM

    if value is None or value == "":
        return ""
    if keyword == "PatientSex":
        return value if value in ("M", "F", "O") else ""
    if keyword in ("PatientBirthDate", "StudyDate", "StudyTime"):
        try:
            (TM if keyword == "StudyTime" else DA)(value)
        except ValueError:
            return ""
    return value


def identity(prediction: Prediction) -> ModelIdentity:
    """The model that made ``prediction`` (an unnamed one of this cascade version for a prediction built by hand)."""
    from cascade.storage.modeldir import ModelIdentity

    return prediction.model if prediction.model is not None else ModelIdentity()


def model_parameters(model: ModelIdentity) -> dict[str, str]:
    """The model folder and its digest, as ``name: value`` pairs (empty for networks not loaded from a folder)."""
    parameters = {}
    if model.name:
        parameters["model"] = model.name
    if model.weights_sha256:
        parameters["weights_sha256"] = model.weights_sha256
    return parameters


def model_description(model: ModelIdentity) -> list[str]:
    """The model in lines of text — folder and digest, the thresholds in use and what they were tuned for — what the
    SR's algorithm parameters and the Secondary Capture's derivation description say beside the version."""
    lines = [f"{key}: {value}" for key, value in model_parameters(model).items()]
    if model.thresholds is not None:
        lines.append(f"thresholds: {model.thresholds.describe()}")
    if model.tuned_for:
        lines.append(f"tuned for: {model.tuned_for}")
    # plain ASCII: the text is encoded in the source's character set, which may be the default repertoire
    return [line.replace("\u00b2", "^2").encode("ascii", "replace").decode("ascii") for line in lines]


def save(dataset: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``dataset`` as a DICOM Part 10 file, atomically; return the path."""
    target = Path(path)
    with atomic_path(target) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return target


def to_bytes(dataset: Dataset) -> bytes:
    """``dataset`` as a DICOM Part 10 byte stream (an HTTP answer, a C-STORE)."""
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
