"""Reading an upload: ``application/dicom`` or one multipart file, size-limited while it streams, kept in memory.

The limit is checked against the declared ``Content-Length`` before anything is read, and again on every chunk
(a chunked or lying client), so an oversized body is refused with 413 long before it is all received. Nothing is
written to disk: the body is parsed from memory by python-multipart.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

DICOM = "application/dicom"
MULTIPART = "multipart/form-data"
FILE_FIELD = "file"
MAX_BOUNDARY = 70
"""Longest multipart boundary RFC 2046 §5.1.1 allows."""


class HTTPProblem(Exception):
    """A request that cannot be answered: the status and the one-line reason sent as ``{"error": reason}``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def read_upload(request: Request, limit: int) -> bytes:
    """The DICOM bytes of the request; ``HTTPProblem`` 415 (content type), 413 (over ``limit`` bytes) or 400."""
    media_type, options = content_type(request)
    if media_type not in (DICOM, MULTIPART):
        raise HTTPProblem(
            415,
            f"content type {media_type or '(none)'} is not accepted: send the file as {DICOM} "
            f"or as the '{FILE_FIELD}' field of {MULTIPART}",
        )
    body = await read_body(request, limit)
    data = _multipart_file(body, options.get(b"boundary", b"")) if media_type == MULTIPART else body
    if not data:
        raise HTTPProblem(400, "empty upload: the body holds no DICOM file")
    return data


def content_type(request: Request) -> tuple[str, dict[bytes, bytes]]:
    """The request's media type (lower case, ``""`` when absent) and its parameters."""
    from python_multipart.multipart import parse_options_header

    media, options = parse_options_header(request.headers.get("content-type", ""))
    return media.decode("latin-1").lower(), options


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 from its declared length or as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPProblem(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise HTTPProblem(413, f"upload of {int(declared)} bytes is over the limit of {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPProblem(413, f"upload is over the limit of {limit} bytes")
    except ClientDisconnect:
        raise HTTPProblem(400, "the client disconnected before the upload was complete") from None
    request.state.bytes_in = len(body)
    return bytes(body)


def _multipart_file(body: bytes, boundary: bytes) -> bytes:
    """The content of the ``file`` field (or of the only part that carries a filename) of a multipart body."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser

    if not boundary:
        raise HTTPProblem(400, f"{MULTIPART} without a boundary parameter")
    if len(boundary) > MAX_BOUNDARY:
        raise HTTPProblem(400, f"{MULTIPART} boundary of {len(boundary)} characters (at most {MAX_BOUNDARY})")
    parts = _Parts()
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        parser.write(body)
        parser.finalize()
    except FormParserError:  # every error python-multipart raises on a malformed body
        raise HTTPProblem(400, f"malformed {MULTIPART} body") from None
    named = [data for name, has_filename, data in parts.done if name == FILE_FIELD]
    with_filename = [data for name, has_filename, data in parts.done if has_filename]
    if len(named) == 1:
        return named[0]
    if not named and len(with_filename) == 1:
        return with_filename[0]
    raise HTTPProblem(400, f"{MULTIPART} body must hold exactly one file, as the '{FILE_FIELD}' field")


class _Parts:
    """Collects the parts python-multipart reports: (field name, whether it has a filename, content)."""

    def __init__(self) -> None:
        self.done: list[tuple[str, bool, bytes]] = []
        self._field = bytearray()
        self._value = bytearray()
        self._disposition = b""
        self._data = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_part_data": lambda data, start, end: self._data.extend(data[start:end]),
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._disposition, self._data = b"", bytearray()

    def _header_end(self) -> None:
        if bytes(self._field).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._field, self._value = bytearray(), bytearray()

    def _end(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self.done.append((name, b"filename" in options, bytes(self._data)))
