"""Proto messages (``proto/voxelflow/v1``) to and from JSON dicts, with one set of options for every side.

Why one set: a dict written with ``json_name`` camelCase and read expecting the .proto's snake_case names
parses as an empty message. Every message that crosses a queue or lands in object storage is written with
the field names of the .proto and with every field present (a reader sees ``0``/``""`` instead of a missing
key); readers refuse unknown fields (a message from a newer writer fails loudly, it is not half-read).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

#: what a malformed message raises on reading
MessageError = json_format.ParseError


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def to_json_bytes(message: Message) -> bytes:
    return json.dumps(to_dict(message)).encode()


def from_dict(data: Any, message_type: type[M]) -> M:
    """The message in ``data``; :data:`MessageError` when ``data`` is not one (also for non-dicts)."""
    if not isinstance(data, dict):
        raise MessageError(f"expected a JSON object for {message_type.DESCRIPTOR.name}, got {type(data).__name__}")
    try:
        return json_format.ParseDict(data, message_type())
    except (TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, MessageError):
            raise
        raise MessageError(str(exc)) from exc


def from_json_bytes(data: bytes, message_type: type[M]) -> M:
    try:
        return from_dict(json.loads(data), message_type)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"not JSON: {exc}") from exc
