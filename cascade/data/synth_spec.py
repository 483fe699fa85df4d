"""What identifies and parameterises ``cascade synth``'s films, without the generator's heavy imports: the CLI's
``--help`` and the pipeline's synthetic-data check read this, the generator (``cascade.data.synth``) uses it."""

from __future__ import annotations

DEFAULT_SIZE = 256
"""Default image side of ``cascade synth`` in pixels."""
LESION_STYLES: dict[str, tuple[float, float]] = {"easy": (1.0, 1.0), "realistic": (0.3, 0.55)}
"""Difficulty name → (contrast, size) of the lesions (see ``cascade.data.synth.LesionStyle``)."""
SYNTH_MANUFACTURER = "cascade synth"
"""The Manufacturer every synthetic film carries, so a model can record that it learned from synthetic data."""


def is_synthetic(header: object) -> bool:
    """Whether a DICOM header (pydicom Dataset) is one of ``cascade synth``'s films."""
    return str(getattr(header, "Manufacturer", "") or "") == SYNTH_MANUFACTURER
