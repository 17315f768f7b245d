"""DICOMweb (PS3.18) wire formats: multipart/related bodies and DICOM JSON responses.

Bodies are parsed with python-multipart's streaming parser and every part is spooled to a temporary
file, so a STOW-RS request of a whole study never sits in memory; WADO-RS responses are generated
chunk by chunk from object storage for the same reason.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from shared.http import RequestBodyTimeoutError, RequestTooLargeError

SPOOL_IN_MEMORY_BYTES = 8 * 1024**2


class MultipartError(ValueError):
    """The body is not a well-formed multipart/related message."""


class UnsupportedMediaTypeError(ValueError):
    pass


@dataclass
class Part:
    content_type: str
    file: IO[bytes]
    size: int = 0
    headers: dict[str, str] = field(default_factory=dict)


def stow_boundary(content_type_header: str | None) -> bytes:
    """Check a STOW-RS Content-Type and return the multipart boundary; raise UnsupportedMediaTypeError."""
    if not content_type_header:
        raise UnsupportedMediaTypeError('missing Content-Type; expected multipart/related; type="application/dicom"')
    media_type, params = parse_options_header(content_type_header)
    if media_type != b"multipart/related":
        raise UnsupportedMediaTypeError(
            f"Content-Type {media_type.decode()!r} is not supported; "
            'expected multipart/related; type="application/dicom"'
        )
    part_type = params.get(b"type", b"application/dicom").decode().strip('"').lower()
    if part_type != "application/dicom":
        raise UnsupportedMediaTypeError(
            f"multipart/related type {part_type!r} is not supported (only application/dicom instances; "
            "the JSON/XML metadata + bulk data form is not accepted)"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise MultipartError("multipart/related Content-Type without a boundary parameter")
    return boundary


async def read_parts(body: AsyncIterator[bytes], boundary: bytes) -> list[Part]:
    """Stream a multipart body into spooled parts. The caller closes the parts' files."""
    parts: list[Part] = []
    header_field = bytearray()
    header_value = bytearray()
    current: dict[str, Any] = {}

    def on_part_begin() -> None:
        current.clear()
        current["headers"] = {}
        current["file"] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)  # noqa: SIM115 (closed by caller)
        current["size"] = 0

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["file"].write(data[start:end])
        current["size"] += end - start

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        current["headers"][header_field.decode("latin-1").lower()] = header_value.decode("latin-1").strip()
        header_field.clear()
        header_value.clear()

    def on_part_end() -> None:
        current["file"].seek(0)
        headers = current["headers"]
        parts.append(
            Part(
                headers.get("content-type", "application/dicom"),
                current["file"],
                current["size"],
                dict(headers),
            )
        )

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
        },
    )
    try:
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
        if parser.state != MultipartState.END:
            # python-multipart's finalize() does not check this itself: a body cut short, or whose last
            # delimiter is not this boundary, would otherwise lose its last part without a word.
            raise MultipartError(
                f"the body ends without the closing delimiter --{boundary.decode('latin-1')}--: "
                "it was truncated or its last boundary is wrong, so no part of it was stored"
            )
    except Exception as exc:
        for part in parts:
            part.file.close()
        if isinstance(exc, (RequestTooLargeError, RequestBodyTimeoutError, MultipartError)):
            raise
        raise MultipartError(f"malformed multipart body: {exc}") from exc
    return parts


# --- DICOM JSON helpers -------------------------------------------------------------------------


def element(vr: str, *values: Any) -> dict[str, Any]:
    clean = [v for v in values if v is not None and v != ""]
    return {"vr": vr, "Value": clean} if clean else {"vr": vr}


def stow_response(
    retrieve_url: str | None, referenced: list[dict[str, Any]], failed: list[dict[str, Any]]
) -> dict[str, Any]:
    """PS3.18 10.5.3 store-instances response (ReferencedSOPSequence / FailedSOPSequence)."""
    body: dict[str, Any] = {}
    if retrieve_url:
        body["00081190"] = element("UR", retrieve_url)
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    return body


def referenced_sop_item(sop_class_uid: str, sop_instance_uid: str, retrieve_url: str) -> dict[str, Any]:
    return {
        "00081150": element("UI", sop_class_uid),
        "00081155": element("UI", sop_instance_uid),
        "00081190": element("UR", retrieve_url),
    }


def failed_sop_item(sop_class_uid: str, sop_instance_uid: str, failure_status: int, comment: str) -> dict[str, Any]:
    """FailureReason is the DICOM status; ErrorComment (0000,0902) says the reason in words."""
    return {
        "00081150": element("UI", sop_class_uid),
        "00081155": element("UI", sop_instance_uid),
        "00081197": element("US", failure_status),
        "00000902": element("LO", comment),
    }


def multipart_related(parts: Iterable[tuple[str, Iterable[bytes]]], root_type: str) -> tuple[str, Iterator[bytes]]:
    """A multipart/related body whose parts each carry their own Content-Type (WADO-RS names every part's
    transfer syntax). ``parts`` is consumed lazily: a part is produced only when the body reaches it."""
    boundary = uuid.uuid4().hex

    def generate() -> Iterator[bytes]:
        for content_type, chunks in parts:
            yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
            yield from chunks
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return f'multipart/related; type="{root_type}"; boundary={boundary}', generate()
