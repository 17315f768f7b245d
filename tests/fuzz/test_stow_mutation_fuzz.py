"""A multipart/DICOM mutation fuzzer on STOW-RS: what a worst-case PACS or a broken proxy would send.

Each example is one STOW request of a few instances, each instance mutated (truncated, File Meta dropped or
garbled, a wrong VR, an oversized length, pixel data of the wrong size, deeply nested sequences, flipped
bytes), and the multipart framing itself sometimes broken (closing delimiter missing or wrong, garbage part
headers). Asserted for every request: no server error, and no part lost in silence: either the request is
refused as a whole (400, and then none of its instances is in the catalogue) or every part is in the
PS3.18 response, as stored (and then in the catalogue) or as failed.
"""

from __future__ import annotations

import io
import itertools
import time

import httpx
import hypothesis
import pydicom
import pytest
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import func, select

from services.ingest.models import Instance
from tests.fuzz.conftest import IngestService
from tests.ingest.test_dicomweb_api import FAILED, REFERENCED, minimal_image

pytestmark = pytest.mark.fuzz

SECONDS = 45.0
BOUNDARY = "fuzzboundary"
MUTATIONS = (
    "none",
    "truncate",
    "drop_file_meta",
    "garble_file_meta",
    "wrong_vr",
    "oversized_length",
    "short_pixels",
    "long_pixels",
    "deep_sequence",
    "flip_bytes",
    "not_dicom",
)
FRAMINGS = ("proper", "no_closing_delimiter", "wrong_closing_boundary", "garbage_part_header", "truncated_body")


def _bytes_of(ds: Dataset, *, implicit_bare: bool = False) -> bytes:
    if implicit_bare:
        buffer = pydicom.filebase.DicomBytesIO()
        buffer.is_implicit_VR, buffer.is_little_endian = True, True
        pydicom.filewriter.write_dataset(buffer, ds)
        return bytes(buffer.getvalue())
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


_serial = itertools.count(10**20)


def _fresh_uid(root: str) -> str:
    """A UID never sent before, always of the same length (so that every example's bytes have the same
    layout, as hypothesis requires of a strategy)."""
    return f"{root}.{next(_serial)}"


def mutated_instance(mutation: str, draw: st.DrawFn) -> tuple[bytes, str]:
    """One instance's bytes after ``mutation``, and its original SOP Instance UID."""
    data = minimal_image(
        SOPInstanceUID=_fresh_uid("1.2.826.0.1.3680043.10.1"),
        StudyInstanceUID=_fresh_uid("1.2.826.0.1.3680043.10.2"),
        SeriesInstanceUID=_fresh_uid("1.2.826.0.1.3680043.10.3"),
    )
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    data = _bytes_of(ds)
    sop_uid = str(ds.SOPInstanceUID)
    if mutation == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "drop_file_meta":
        bare = Dataset()
        bare.update(ds)
        data = _bytes_of(bare, implicit_bare=True)
    elif mutation == "garble_file_meta":
        at = data.find(b"\x02\x00\x10\x00")  # (0002,0010) TransferSyntaxUID
        junk = draw(st.binary(min_size=1, max_size=24))
        data = data[: at + 8] + junk + data[at + 8 + len(junk) :]
    elif mutation == "wrong_vr":
        at = data.find(b"\x28\x00\x10\x00")  # (0028,0010) Rows, explicit VR "US"
        data = data[: at + 4] + draw(st.sampled_from([b"SQ", b"XX", b"OB", b"UN", b"\x00\x00"])) + data[at + 6 :]
    elif mutation == "oversized_length":
        at = data.find(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData, explicit VR "OW" + 2 reserved + 4-byte length
        length = draw(st.sampled_from([0xFFFFFFF0, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 30]))
        data = data[: at + 8] + length.to_bytes(4, "little") + data[at + 12 :]
    elif mutation in ("short_pixels", "long_pixels"):
        size = draw(st.integers(0, 30)) if mutation == "short_pixels" else draw(st.integers(34, 4096))
        ds.PixelData = bytes(size + size % 2)
        data = _bytes_of(ds)
    elif mutation == "deep_sequence":
        depth = draw(st.integers(20, 300))
        item = Dataset()
        item.CodeValue = "leaf"
        for _ in range(depth):
            outer = Dataset()
            outer.ReferencedSeriesSequence = Sequence([item])
            item = outer
        ds.ReferencedSeriesSequence = item.ReferencedSeriesSequence
        data = _bytes_of(ds)
    elif mutation == "flip_bytes":
        buffer = bytearray(data)
        for offset in draw(st.lists(st.integers(0, len(buffer) - 1), min_size=1, max_size=8)):
            buffer[offset] ^= 0xFF
        data = bytes(buffer)
    elif mutation == "not_dicom":
        data = draw(st.binary(min_size=0, max_size=512))
    return data, sop_uid


@st.composite
def stow_requests(draw: st.DrawFn) -> tuple[bytes, str, list[str]]:
    mutations = draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=4))
    instances = [mutated_instance(m, draw) for m in mutations]
    framing = draw(st.sampled_from(FRAMINGS))
    parts = []
    for index, (data, _) in enumerate(instances):
        headers = "Content-Type: application/dicom\r\n"
        if framing == "garbage_part_header" and index == len(instances) - 1:
            headers = draw(st.sampled_from(["Content-Type application/dicom\r\n", "\x00\x01: x\r\n", ": \r\n"]))
        parts.append(f"--{BOUNDARY}\r\n{headers}\r\n".encode("latin-1") + data + b"\r\n")
    body = b"".join(parts)
    if framing == "wrong_closing_boundary":
        body += b"--otherboundary--\r\n"
    elif framing != "no_closing_delimiter":
        body += f"--{BOUNDARY}--\r\n".encode()
    if framing == "truncated_body":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    return body, framing, [uid for _, uid in instances]


def _stored(service: IngestService, pseudonyms: list[str]) -> int:
    with service.ctx.session_factory() as session:  # type: ignore[attr-defined]
        query = select(func.count(Instance.id)).where(Instance.sop_instance_uid.in_(pseudonyms))
        return int(session.scalar(query) or 0)


def test_stow_mutations_never_fail_the_server_or_drop_a_part(ingest_service: IngestService):
    deadline = time.monotonic() + SECONDS
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    deidentifier = ingest_service.ctx.deidentifier  # type: ignore[attr-defined]
    sent = {"requests": 0, "parts": 0}

    with ingest_service.client("pacs") as client:

        @hypothesis.settings(
            max_examples=400,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(stow_requests())
        def check(example: tuple[bytes, str, list[str]]) -> None:
            if time.monotonic() > deadline:
                return
            body, framing, sop_uids = example
            pseudonyms = [deidentifier.pseudonymise_uid(uid) for uid in sop_uids]
            try:
                response = client.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})
            except httpx.HTTPError as exc:  # a dropped connection is as bad as a 500
                raise AssertionError(f"{framing}: the request failed: {exc!r}") from exc
            sent["requests"] += 1
            sent["parts"] += len(sop_uids)
            assert response.status_code < 500 or response.status_code == 503, (framing, response.text[:500])
            if response.status_code == 400:  # refused as a whole: none of its instances (fresh UIDs) is stored
                assert _stored(ingest_service, pseudonyms) == 0, (framing, response.text[:500])
                return
            assert response.status_code in (200, 202, 409), (framing, response.status_code, response.text[:500])
            answer = response.json()
            referenced = answer.get(REFERENCED, {}).get("Value", [])
            failed = answer.get(FAILED, {}).get("Value", [])
            assert len(referenced) + len(failed) == len(sop_uids), (framing, answer)
            unforeseen = [item for item in failed if "could not be processed" in str(item.get("00000902"))]
            assert not unforeseen, f"{framing}: a part failed with an unforeseen error (see the log): {unforeseen}"
            stored_pseudonyms = [item["00081190"]["Value"][0].rsplit("/", 1)[1] for item in referenced]
            assert _stored(ingest_service, stored_pseudonyms) == len(set(stored_pseudonyms)), answer
            assert set(stored_pseudonyms) <= set(pseudonyms), "a stored instance the request did not send"

        check()
    print(f"STOW mutation fuzz: {sent['requests']} requests, {sent['parts']} parts")
    assert sent["requests"] >= 20
