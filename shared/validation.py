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

from typing import Annotated

from annotated_types import Interval
from pydantic import StringConstraints

# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 characters.
DICOM_UID_PATTERN = r"^(0|[1-9][0-9]{0,38})(\.(0|[1-9][0-9]{0,38}))*$"
DICOM_UID_MAX_LENGTH = 64

# PostgreSQL INTEGER (the primary keys of the services' tables) and BIGINT.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# No C0 control characters (NUL above all: PostgreSQL text cannot hold it) and no DEL.
SAFE_TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
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

SafeText = Annotated[str, StringConstraints(pattern=SAFE_TEXT_PATTERN, max_length=256)]
"""Free text (a search value, a collection name) of at most 256 characters, no control characters."""

__all__ = [
    "DICOM_UID_MAX_LENGTH",
    "DICOM_UID_PATTERN",
    "INT32_MAX",
    "INT64_MAX",
    "DatabaseId",
    "DicomUID",
    "PageOffset",
    "ResourceId",
    "SafeText",
]
