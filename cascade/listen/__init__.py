"""``cascade listen``: a DICOM node (Storage SCP) that triages the radiographs a PACS sends it and sends the
findings back as DICOM SEG. See :mod:`cascade.listen.node` for the order of work that makes it lose nothing."""

from __future__ import annotations

from cascade.listen.findings import COLUMNS, Finding, FindingsLog
from cascade.listen.forward import Destination, Forwarder, uid_hash
from cascade.listen.node import IMAGE_STORAGE, Node

__all__ = ["COLUMNS", "IMAGE_STORAGE", "Destination", "Finding", "FindingsLog", "Forwarder", "Node", "uid_hash"]
