"""Edge types: every ID and free-text value a route takes is checked here, by type and range, before any
database, object store or registry sees it.

Why: PostgreSQL refuses what Python accepts (integers past the column's 32/64 bits, NUL in text) and
answers with a driver error that turns into a 500. Declaring the range in the parameter's type makes
FastAPI answer 422 with the reason, and puts the constraint in the OpenAPI document, so generated
clients and the fuzz stage know it too. Use these in every ``api/routes/*.py`` signature::

    def get_case(id: DatabaseId, ...)
    def series_status(series_uid: DicomUID, ...)
"""

from __future__ import annotations

from typing import Annotated, Any

from annotated_types import Interval, Len
from pydantic import StringConstraints, WithJsonSchema

# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 characters.
DICOM_UID_PATTERN = r"^(0|[1-9][0-9]{0,38})(\.(0|[1-9][0-9]{0,38}))*$"
DICOM_UID_MAX_LENGTH = 64

# PostgreSQL INTEGER (the primary keys of the services' tables) and BIGINT.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# No C0 control characters (NUL above all: PostgreSQL text cannot hold it) and no DEL.
SAFE_TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
# A dataset version's content-hash ID (shared.datasets).
DATASET_VERSION_PATTERN = r"^ds-[0-9a-f]{16}$"
# IDs the services mint themselves: UUIDs, ``ds-<hex>``, run IDs, model names.
RESOURCE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"

DicomUID = Annotated[str, StringConstraints(pattern=DICOM_UID_PATTERN, min_length=1, max_length=DICOM_UID_MAX_LENGTH)]
"""A DICOM UID (Study/Series/SOP Instance UID), original or pseudonymised."""

DatabaseId = Annotated[int, Interval(ge=1, le=INT32_MAX)]
"""A row ID of an ``INTEGER`` primary key."""

PageOffset = Annotated[int, Interval(ge=0, le=INT32_MAX)]
"""How many rows a listing skips."""


ResourceId = Annotated[str, StringConstraints(pattern=RESOURCE_ID_PATTERN, min_length=1, max_length=64)]
"""An ID a service minted (UUID, ``ds-<hex>``, run ID, request ID) or a configured name: at most 64 characters."""

DatasetVersionId = Annotated[str, StringConstraints(pattern=DATASET_VERSION_PATTERN)]
"""A dataset version ID: ``ds-`` and 16 hex digits of its content hash."""

SafeText = Annotated[str, StringConstraints(pattern=SAFE_TEXT_PATTERN, max_length=256)]
"""Free text (a search value, a collection name) of at most 256 characters, no control characters."""

_SAFE_TEXT_SCHEMA = {"type": "string", "maxLength": 256, "pattern": SAFE_TEXT_PATTERN}
SafeTextMap = Annotated[
    dict[SafeText, SafeText],
    Len(min_length=1),
    # Pydantic writes the key constraint as patternProperties, which leaves keys that miss the pattern
    # unconstrained in the document; propertyNames says what the validator enforces.
    WithJsonSchema(
        {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"maxLength": 256, "pattern": SAFE_TEXT_PATTERN},
            "additionalProperties": _SAFE_TEXT_SCHEMA,
        }
    ),
]
"""A non-empty mapping of free-text keys to free-text values (QIDO matching keys), each :data:`SafeText`."""


def exactly_one_of(fields: dict[str, str]) -> dict[str, Any]:
    """JSON Schema for "exactly one of these optional fields is given (not null)", for a model's
    ``json_schema_extra``; ``fields`` maps each field to its JSON type when given.

    Why not just ``oneOf [{required: [a]}, {required: [b]}]``: ``{"a": null}`` satisfies that, and a client
    (or the fuzz stage) that sends it is refused by the model's own check. The model still needs that check
    (a validator); this is what the OpenAPI document says about it.
    """
    return {
        "oneOf": [
            {
                "required": [name],
                "properties": {other: ({"type": json_type} if other == name else {"type": "null"}) for other in fields},
            }
            for name, json_type in fields.items()
        ]
    }


__all__ = [
    "DATASET_VERSION_PATTERN",
    "DICOM_UID_MAX_LENGTH",
    "DICOM_UID_PATTERN",
    "INT32_MAX",
    "INT64_MAX",
    "DatabaseId",
    "DatasetVersionId",
    "DicomUID",
    "PageOffset",
    "ResourceId",
    "SafeText",
    "SafeTextMap",
    "exactly_one_of",
]
