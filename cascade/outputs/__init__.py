"""Prediction outputs: the one :class:`~cascade.outputs.writers.Writer` interface and its registry (``writers``: the
submission CSV, overlays, DICOM SEG, DICOM SR, DICOM Secondary Capture), and one module per drawn or encoded format
(``overlay``, ``dicom_seg``, ``dicom_sr``, ``secondary_capture``; ``dicom_common`` holds what the DICOM ones share)."""
