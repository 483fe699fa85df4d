"""The one family of errors the library raises for bad input.

Every error is a ``ValueError`` so callers that already catch that keep working; the message always names the
file (and row, where there is one) and the reason, in one line, and never a patient identifier.
"""

from __future__ import annotations


class CascadeError(ValueError):
    """Base of every error caused by bad input, bad configuration or a bad model folder."""


class DicomError(CascadeError):
    """A DICOM file that cannot be read as a single-frame greyscale radiograph."""


class PixelBudgetError(DicomError):
    """An image that would decode to more pixels than the budget (``--max-pixels``), refused before decoding."""


class LabelError(CascadeError):
    """A label CSV or RLE string that does not follow the challenge's format."""


class ImageError(CascadeError):
    """An image given as an array (to ``Cascade.predict``) that is not a usable radiograph: shape, type, values."""


class ConfigError(CascadeError):
    """A configuration key or value that is unknown or out of range."""


class ModelError(CascadeError):
    """A model or run folder that is incomplete, changed, or of an unknown version."""


class CascadeWarning(UserWarning):
    """Something a user should know that does not stop the work (the command line prints it as a warning line)."""


def from_worker(err: CascadeError) -> CascadeError:
    """``err`` with its own one-line message when a DataLoader worker raised it.

    PyTorch re-raises a worker's exception in the parent as the same class, but with the worker's whole traceback
    as its message (``Caught LabelError in DataLoader worker process 0. Original Traceback ...``); the original
    message is the traceback's last line. Any other error is returned unchanged.
    """
    lines = str(err).strip().splitlines()
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    if len(lines) > 1 and lines[0].startswith("Caught ") and lines[-1].startswith(prefix):
        return type(err)(lines[-1][len(prefix):])
    return err
