"""Keyed pseudonyms: the one definition every service uses to turn an identifier into a pseudonym.

Why keyed: an unkeyed hash of a medical record number (a few million possible values) is reversed by
hashing every candidate; an HMAC under the deployment secret (``VOXELFLOW_DEID_KEY``) is not, unless the key
leaks. The ingest de-identifier (``services.ingest.deidentify``) derives its UIDs, PatientID pseudonyms and
date offsets from :func:`keyed_digest`; the inference service keeps :func:`patient_ref` of the PatientID it
was given, which is the same ``VF-…`` pseudonym ingest gives that patient in the same project, so an
inference request and the catalogue name the same patient the same way and neither stores the original.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from pathlib import Path
from typing import Final

#: domain separation: a MAC computed here can never equal one computed for another purpose or scheme
DOMAIN: Final = b"voxelflow-deid/v1"
MIN_KEY_BYTES: Final = 16
PSEUDONYM_PREFIX: Final = "VF-"
#: ``VF-`` + 26 base32 characters (130 bits of the HMAC)
PSEUDONYM_PATTERN: Final = re.compile(r"^VF-[A-Z2-7]{26}$")


def keyed_digest(key: bytes, purpose: bytes, namespace: str, value: str) -> bytes:
    """HMAC-SHA256 over length-prefixed fields (domain, purpose, namespace, value), so no two inputs can
    collide by concatenation and a change of purpose or project yields an unrelated digest."""
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"key must be at least {MIN_KEY_BYTES} bytes ({MIN_KEY_BYTES * 8} bits) of secret material")
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (DOMAIN, purpose, namespace.encode(), value.encode()):
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    return mac.digest()


def pseudonymise_patient_id(key: bytes, project: str, patient_id: str) -> str:
    """Keyed pseudonym for a PatientID: ``VF-`` + 26 base32 characters; surrounding padding is ignored."""
    digest = keyed_digest(key, b"patient", project, patient_id.strip(" \x00"))
    return PSEUDONYM_PREFIX + base64.b32encode(digest).decode("ascii")[:26]


def is_pseudonym(value: str) -> bool:
    return bool(PSEUDONYM_PATTERN.match(value))


def patient_ref(key: bytes, project: str, patient_id: str | None) -> str | None:
    """What a service may keep of a PatientID: its pseudonym. A value that already is one (a series from
    the catalogue carries the pseudonym ingest wrote) is kept as it is, so one patient has one reference."""
    if not patient_id or not patient_id.strip(" \x00"):
        return None
    if is_pseudonym(patient_id):
        return patient_id
    return pseudonymise_patient_id(key, project, patient_id)


def resolve_key(secret: str | None, key_file: Path) -> bytes:
    """The deployment secret, or a random one generated once into ``key_file`` (a single-machine trial)."""
    if secret is not None:
        return secret.encode()
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_hex(32))
        key_file.chmod(0o600)
    return key_file.read_text().strip().encode()


__all__ = [
    "DOMAIN",
    "PSEUDONYM_PATTERN",
    "is_pseudonym",
    "keyed_digest",
    "patient_ref",
    "pseudonymise_patient_id",
    "resolve_key",
]
