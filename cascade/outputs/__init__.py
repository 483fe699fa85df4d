"""Prediction outputs: the one :class:`~cascade.outputs.writers.Writer` interface and its registry (``writers``: the
submission CSV, overlays, DICOM SEG), and one module per drawn or encoded format (``overlay``, ``dicom_seg``)."""
