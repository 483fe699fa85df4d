"""``cascade listen``: a DICOM node (Storage SCP) that triages the radiographs a PACS sends it and sends the
findings back as DICOM SR (every analysed image), SEG (positives) and Secondary Capture (when asked), by DIMSE and/or
STOW-RS. See :mod:`cascade.apps.listen.node` for the order of work that makes it lose nothing."""

from __future__ import annotations

from cascade.apps.listen.findings import COLUMNS, COLUMNS_V1, Finding, FindingsLog
from cascade.apps.listen.forward import Destination, Forwarder, Outbox, classify, parse_stow_url, uid_hash
from cascade.apps.listen.node import IMAGE_STORAGE, Node
from cascade.apps.listen.worklist import Worklist

__all__ = ["COLUMNS", "COLUMNS_V1", "IMAGE_STORAGE", "Destination", "Finding", "FindingsLog", "Forwarder", "Node",
           "Outbox", "Worklist", "classify", "parse_stow_url", "uid_hash"]
