"""STOW-RS (DICOM PS3.18 §10.5) without storing: the ``multipart/related; type="application/dicom"`` body split
into its parts, and the store response built from what happened to each instance.

The parser works on the body in memory (its size already limited by the caller) and is strict and bounded: a
boundary of 1 to 70 characters of RFC 2046's alphabet, at most :data:`MAX_PARTS` parts, part headers of at most
:data:`MAX_HEADER_BYTES` each, a closing delimiter; anything else is one ``HTTPProblem`` 400, never an exception of
another kind.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cascade.apps.serve.uploads import DICOM, MAX_BOUNDARY, HTTPProblem

RELATED = "multipart/related"
DICOM_JSON = "application/dicom+json"
MAX_PARTS = 256
"""Most instances in one request."""
MAX_HEADER_BYTES = 8192
"""Longest header block of one part."""
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

OUT_OF_RESOURCES = 0xA700
"""Failure reason: the results could not be written (disk full, permissions)."""
DOES_NOT_MATCH = 0xA900
"""Failure reason: the instance is not of the study named in the request's path, or its UIDs are invalid."""
CANNOT_UNDERSTAND = 0xC000
"""Failure reason: the part is not a DICOM file cascade reads (not DICOM, not a greyscale radiograph, over the
pixel budget, another media type)."""
PROCESSING_FAILURE = 0x0110
"""Failure reason: the instance was read but its prediction or results could not be made."""


@dataclass(frozen=True)
class Part:
    """One body part: its media type (lower case; ``""`` when it names none) and its bytes."""

    media_type: str
    data: bytes


@dataclass(frozen=True)
class Outcome:
    """What became of one instance: its SOP Class and Instance UIDs (None when unreadable) and the failure reason
    (None: accepted)."""

    sop_class: str | None
    sop_instance: str | None
    failure: int | None = None


def is_uid(value: object) -> bool:
    """Whether ``value`` is a valid DICOM UID (digits and dots, no leading zeros, at most 64 characters)."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def boundary_of(media_type: str, options: Mapping[bytes, bytes]) -> bytes:
    """The boundary of a STOW-RS request's content type; ``HTTPProblem`` 415 for another media type (or parts of
    another type than ``application/dicom``), 400 for a missing or invalid boundary."""
    kind = options.get(b"type", DICOM.encode()).decode("latin-1").lower()
    if media_type != RELATED or kind != DICOM:
        raise HTTPProblem(415, f"STOW-RS accepts {RELATED}; type=\"{DICOM}\" bodies (DICOM files, one per part)")
    boundary = options.get(b"boundary", b"")
    if len(boundary) > MAX_BOUNDARY or not _BOUNDARY.fullmatch(boundary):
        raise HTTPProblem(400, f"{RELATED} needs a boundary of 1 to {MAX_BOUNDARY} characters (RFC 2046)")
    return boundary


def related_parts(body: bytes, boundary: bytes) -> list[Part]:
    """The parts of a ``multipart/related`` body (preamble and epilogue ignored); ``HTTPProblem`` 400 when it is
    malformed, holds no part or more than :data:`MAX_PARTS`."""
    delimiter = b"\r\n--" + boundary
    if body.startswith(delimiter[2:]):
        at = len(delimiter) - 2
    else:
        at = body.find(delimiter)
        if at < 0:
            raise _malformed("no opening boundary")
        at += len(delimiter)
    parts: list[Part] = []
    while not body.startswith(b"--", at):
        line_end = body.find(b"\r\n", at)
        if line_end < 0 or body[at:line_end].strip(b" \t"):
            raise _malformed("a boundary line holds more than the boundary")
        end = body.find(delimiter, line_end)
        if end < 0:
            raise _malformed("no closing boundary")
        if len(parts) == MAX_PARTS:
            raise HTTPProblem(400, f"more than {MAX_PARTS} parts in one request: send fewer instances at a time")
        parts.append(_part(body[line_end + 2:end]))
        at = end + len(delimiter)
    if not parts:
        raise HTTPProblem(400, f"the {RELATED} body holds no part")
    return parts


def _part(raw: bytes) -> Part:
    """A body part: its header block (up to the first empty line), then its content."""
    if raw.startswith(b"\r\n"):
        return Part("", raw[2:])
    split = raw.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
    if split < 0:
        raise _malformed(f"a part's headers are not ended by an empty line within {MAX_HEADER_BYTES} bytes")
    media_type = ""
    for line in raw[:split].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            raise _malformed("a part header line has no ':'")
        if name.strip().lower() == b"content-type":
            media_type = value.split(b";", 1)[0].strip().decode("latin-1").lower()
    return Part(media_type, raw[split + 4:])


def _malformed(why: str) -> HTTPProblem:
    return HTTPProblem(400, f"malformed {RELATED} body: {why}")


def store_response(outcomes: list[Outcome]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and ``application/dicom+json`` body of a STOW-RS answer (PS3.18 §10.5.3): 200 when every
    instance was accepted, 202 when some failed, 409 when all did; ReferencedSOPSequence (0008,1199) lists the
    accepted, FailedSOPSequence (0008,1198) the failed with their FailureReason (0008,1197)."""
    accepted = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    body: dict[str, Any] = {}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {**_reference(o), "00081197": {"vr": "US", "Value": [o.failure]}} for o in failed]}
    if accepted:
        body["00081199"] = {"vr": "SQ", "Value": [_reference(o) for o in accepted]}
    return (200 if not failed else 409 if not accepted else 202), body


def _reference(outcome: Outcome) -> dict[str, Any]:
    """ReferencedSOPClassUID (0008,1150) and ReferencedSOPInstanceUID (0008,1155); empty when unknown."""
    return {
        tag: {"vr": "UI", "Value": [uid]} if uid else {"vr": "UI"}
        for tag, uid in (("00081150", outcome.sop_class), ("00081155", outcome.sop_instance))
    }
