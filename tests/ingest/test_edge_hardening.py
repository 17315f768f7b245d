"""Regression tests of what fuzzing the running platform found (issue 19): every bad input is a 4xx with a
reason, no STOW part is lost without a word, a slow client gets 408, and authentication comes first."""

from __future__ import annotations

import io
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit
from uuid import uuid4

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from services.ingest.models import Instance, Series
from shared.db.models import AuditEvent
from tests.ingest.conftest import IngestService, multipart_body, stow
from tests.ingest.test_dicomweb_api import FAILED, REFERENCED, count_instances, minimal_image
from tests.service_harness import free_port, patched_environ, serving, wait_for

CONTENT_TYPE = 'multipart/related; type="application/dicom"; boundary=vfboundary'


def _part(data: bytes, boundary: str = "vfboundary") -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"


def _bare_dataset() -> bytes:
    """An old Siemens MR as it arrives: no 128-byte preamble, no File Meta group, implicit VR little endian."""
    ds = pydicom.dcmread(io.BytesIO(minimal_image(Modality="MR", SOPClassUID="1.2.840.10008.5.1.4.1.1.4")), force=True)
    bare = Dataset()
    bare.update(ds)
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = True, True
    pydicom.filewriter.write_dataset(buffer, bare)  # implicit VR little endian, no File Meta
    data = buffer.getvalue()
    assert data[128:132] != b"DICM" and not data.startswith(b"\x02\x00")
    return data


def _instances_with_sop_uid(service: IngestService, pseudonymised_uid: str) -> int:
    with service.ctx.session_factory() as session:  # type: ignore[attr-defined]
        return int(
            session.scalar(select(func.count(Instance.id)).where(Instance.sop_instance_uid == pseudonymised_uid)) or 0
        )


def _audit_event(service: IngestService, request_id: str) -> AuditEvent:
    """The audit row of a request: written after its response went out, so it is waited for."""

    def find() -> AuditEvent | None:
        with service.ctx.session_factory() as session:  # type: ignore[attr-defined]
            return session.scalar(select(AuditEvent).where(AuditEvent.request_id == request_id))

    return wait_for(find, timeout=30, what=f"the audit row of request {request_id}")


# --- values past their column's range, NUL and control characters: 4xx, the database never sees them ------


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/dead-letters/2147483648/retry"),
        ("POST", "/dead-letters/9223372036854775808/retry"),
        ("POST", "/dead-letters/0/retry"),
        ("GET", "/series/1.2.3%00"),
        ("GET", "/dicomweb/studies/1.2.3%00"),
        ("GET", "/dicomweb/studies/1.2.3%00/metadata"),
        ("GET", "/dicomweb/studies/1.2.3/series/4.5%00/instances"),
        ("GET", "/dicomweb/studies/1.2.3/series/4.5/instances/6%00/metadata"),
        ("GET", "/dicomweb/studies/01.2"),
        ("GET", "/dicomweb/studies/" + "1." * 40 + "1"),
        ("GET", "/pacs/jobs/abc%00"),
        ("GET", "/admin/reidentification?value=a%00b"),
        ("GET", "/admin/reidentification?value="),
        ("GET", "/dicomweb/studies?PatientID=a%00b"),
        ("GET", "/dicomweb/studies?offset=9223372036854775808"),
        ("GET", "/dicomweb/studies?limit=%C2%B2"),
        ("POST", "/dicomweb/studies/1.2%00"),
    ],
)
def test_out_of_range_ids_and_nul_bytes_are_4xx_with_a_reason(ingest_service: IngestService, method: str, path: str):
    with ingest_service.client("admin") as client:
        response = client.request(method, path, headers={"Content-Type": CONTENT_TYPE}, content=b"")
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
    assert response.json()["detail"]


# --- STOW: no part is ever dropped in silence -------------------------------------------------------------


def test_body_without_closing_boundary_is_refused_as_a_whole(ingest_service: IngestService):
    first, last = minimal_image(), minimal_image()
    body = _part(first) + _part(last)  # no --vfboundary-- at the end
    before = count_instances(ingest_service)
    with ingest_service.client("pacs") as client:
        response = client.post("/dicomweb/studies", content=body, headers={"Content-Type": CONTENT_TYPE})
    assert response.status_code == 400, response.text
    assert "closing delimiter" in response.json()["detail"]
    assert count_instances(ingest_service) == before


def test_body_ending_with_a_wrong_boundary_is_refused_as_a_whole(ingest_service: IngestService):
    body = _part(minimal_image()) + _part(minimal_image()) + b"--otherboundary--\r\n"
    before = count_instances(ingest_service)
    with ingest_service.client("pacs") as client:
        response = client.post("/dicomweb/studies", content=body, headers={"Content-Type": CONTENT_TYPE})
    assert response.status_code == 400, response.text
    assert count_instances(ingest_service) == before


def test_truncated_last_part_is_refused_as_a_whole(ingest_service: IngestService):
    body, _ = multipart_body([minimal_image(), minimal_image()])
    with ingest_service.client("pacs") as client:
        response = client.post("/dicomweb/studies", content=body[:-200], headers={"Content-Type": CONTENT_TYPE})
    assert response.status_code == 400, response.text


def test_good_part_and_file_without_file_meta_are_both_reported(ingest_service: IngestService):
    """Before: validate_instance asked the missing transfer syntax whether it was compressed, and the 500
    hid that the good part had been stored. Now the bare dataset is read with its inferred transfer syntax."""
    good, bare = minimal_image(), _bare_dataset()
    with ingest_service.client("pacs") as client:
        response = stow(client, [good, bare])
    assert response.status_code == 200, response.text
    referenced = response.json()[REFERENCED]["Value"]
    assert len(referenced) == 2
    for item in referenced:
        pseudonym = item["00081190"]["Value"][0].rsplit("/", 1)[1]
        assert _instances_with_sop_uid(ingest_service, pseudonym) == 1
    with ingest_service.client("researcher") as client:
        retrieved = client.get(referenced[1]["00081190"]["Value"][0] + "/metadata")
    assert retrieved.status_code == 200
    assert retrieved.json()[0]["00080060"]["Value"] == ["MR"]


def test_unknown_transfer_syntax_is_refused_with_a_reason(ingest_service: IngestService):
    ds = pydicom.dcmread(io.BytesIO(minimal_image()), force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID("1.2.3.4.5.6")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    with ingest_service.client("pacs") as client:
        response = stow(client, [buffer.getvalue()])
    assert response.status_code == 409, response.text
    comment = response.json()[FAILED]["Value"][0]["00000902"]["Value"][0]
    assert "transfer syntax" in comment


def test_audit_rows_of_refused_instances_hold_no_original_uids(ingest_service: IngestService):
    refused = minimal_image(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11")  # an SR: refused, not stored
    original_uid = str(pydicom.dcmread(io.BytesIO(refused), force=True).SOPInstanceUID)
    with ingest_service.client("pacs") as client:
        response = stow(client, [refused])
    assert response.status_code == 409
    event = _audit_event(ingest_service, response.headers["x-request-id"])
    assert original_uid not in event.object_uids
    assert ingest_service.ctx.deidentifier.pseudonymise_uid(original_uid) in event.object_uids  # type: ignore[attr-defined]


# --- authentication before the body ------------------------------------------------------------------------


def test_malformed_json_without_a_token_is_401_not_422(ingest_service: IngestService):
    with ingest_service.client(role="") as anonymous:
        response = anonymous.post(
            "/pacs/orthanc/retrieve", content=b'{"study_instance_uid": ', headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 401, response.text


def _raw_request(url: str, head: bytes, body: bytes = b"", read_timeout: float = 30) -> bytes:
    """Send a request head (and part of a body) on a raw socket and read what the server answers."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=read_timeout) as sock:
        sock.sendall(head + body)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            pass
        return answer


def test_oversized_body_without_a_token_is_401_not_413(ingest_service: IngestService):
    head = (
        b"POST /dicomweb/studies HTTP/1.1\r\nHost: ingest\r\n"
        + f"X-Request-ID: oversized-anonymous-{uuid4().hex}\r\n".encode()
        + f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {64 * 1024**2 + 1}\r\n\r\n".encode()
    )
    answer = _raw_request(ingest_service.url, head)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    request_id = re.search(rb"x-request-id: (\S+)", answer, re.IGNORECASE).group(1).decode()  # type: ignore[union-attr]
    event = _audit_event(ingest_service, request_id)
    assert event.status_code == 401 and event.outcome == "denied" and event.principal is None


# --- a slow body cannot hold the server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_timeout_ingest(ingest_service: IngestService, ingest_env: dict[str, str]) -> Iterator[str]:
    """A second ingest API on the same servers whose body-read timeout is 2 s."""
    from services.ingest.main import create_app
    from services.ingest.settings import IngestSettings

    with patched_environ({"VOXELFLOW_API_BODY_TIMEOUT_SECONDS": "2"}):
        app = create_app(IngestSettings())
    with serving(app, "ingest-quick-timeout", port=free_port()) as url:
        yield url


def test_slow_body_gets_408_within_the_timeout(ingest_service: IngestService, quick_timeout_ingest: str):
    head = (
        b"POST /dicomweb/studies HTTP/1.1\r\nHost: ingest\r\n"
        + f"Authorization: Bearer {ingest_service.tokens['pacs']}\r\n".encode()
        + f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: 1000000\r\n\r\n".encode()
    )
    answer = _raw_request(quick_timeout_ingest, head, _part(b"x" * 1000), read_timeout=15)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    # the server still answers others at once
    with httpx.Client(base_url=quick_timeout_ingest, timeout=10) as client:
        assert client.get("/healthz").status_code == 200


def test_slow_json_body_gets_408_not_400(ingest_service: IngestService, quick_timeout_ingest: str):
    """FastAPI turns an error while it reads a JSON body into 400; the middleware answers 408 first."""
    head = (
        b"POST /pacs/orthanc/retrieve HTTP/1.1\r\nHost: ingest\r\n"
        + f"Authorization: Bearer {ingest_service.tokens['operator']}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    )
    answer = _raw_request(quick_timeout_ingest, head, b'{"study_instance_uid": ', read_timeout=15)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_parts_of_one_stow_received_concurrently_are_reported_in_order_and_stored_once(
    ingest_service: IngestService,
):
    """The parts of a request are received in parallel threads: twelve slices of one new series (same
    patient, study and series rows claimed at once), the first slice sent again at the end and a bad part
    in the middle must give each instance exactly one row, one series, and the per-part report in order."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    slices = [
        minimal_image(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=n, PatientID="CONC-1")
        for n in range(1, 13)
    ]
    parts = [*slices[:6], b"not a dicom file at all", *slices[6:], slices[0]]
    with ingest_service.client("pacs") as client:
        response = stow(client, parts)
    assert response.status_code == 202, response.text
    body = response.json()
    sent_order = [str(pydicom.dcmread(io.BytesIO(data), force=True).SOPInstanceUID) for data in [*slices, slices[0]]]
    reported = [item["00081155"]["Value"][0] for item in body[REFERENCED]["Value"]]
    assert reported == sent_order
    assert len(body[FAILED]["Value"]) == 1
    pseudonyms = {item["00081190"]["Value"][0].rsplit("/", 1)[1] for item in body[REFERENCED]["Value"]}
    assert len(pseudonyms) == 12
    for pseudonym in pseudonyms:
        assert _instances_with_sop_uid(ingest_service, pseudonym) == 1
    series_pseudonym = body[REFERENCED]["Value"][0]["00081190"]["Value"][0].split("/series/")[1].split("/")[0]
    with ingest_service.ctx.session_factory() as session:  # type: ignore[attr-defined]
        series_rows = session.scalars(select(Series).where(Series.series_instance_uid == series_pseudonym)).all()
        assert len(series_rows) == 1
        stored = session.scalar(
            select(func.count(Instance.id)).where(Instance.series_id == series_rows[0].id, Instance.state == "stored")
        )
    assert stored == 12


def test_one_stow_claims_its_rows_with_a_few_statements_not_a_few_per_instance(ingest_service: IngestService) -> None:
    """The parts of a request are one batch: one multi-row INSERT per catalogue table, the Series row updated
    once for the request (not once per instance), one UPDATE marks the instances stored. The old way took
    ~10 statements and two commits per instance, and hit the hot Series row once per instance."""
    from sqlalchemy import event

    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    slices = [
        minimal_image(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=n, PatientID="BATCH-1")
        for n in range(1, 13)
    ]
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if "ingest_" in statement:
            statements.append(" ".join(statement.split()[:3]).lower())

    engine = ingest_service.ctx.engine  # type: ignore[attr-defined]
    event.listen(engine, "before_cursor_execute", record)
    try:
        with ingest_service.client("pacs") as client:
            response = stow(client, slices)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert response.status_code == 200, response.text
    assert len(response.json()[REFERENCED]["Value"]) == 12
    assert statements.count("insert into ingest_instances") == 1
    assert statements.count("update ingest_instances set") == 1
    assert statements.count("update ingest_series set") == 1  # a new series: opened once, for all twelve
    assert len(statements) <= 12, statements


def test_same_uid_twice_in_one_stow_with_other_content_fails_alone(ingest_service: IngestService) -> None:
    """Within one request as across requests: a later part with the UID of an earlier one and other content is a
    conflict (0x0111); an identical later copy is a success; the earlier part and the others are stored."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    first = minimal_image(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=1)
    uid = str(pydicom.dcmread(io.BytesIO(first), force=True).SOPInstanceUID)
    other = minimal_image(
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        SOPInstanceUID=uid,
        InstanceNumber=1,
        PixelData=bytes(reversed(range(32))),
    )
    second = minimal_image(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=2)
    with ingest_service.client("pacs") as client:
        before = count_instances(ingest_service)
        response = stow(client, [first, other, second, first])
    assert response.status_code == 202, response.text
    body = response.json()
    assert [item["00081197"]["Value"][0] for item in body[FAILED]["Value"]] == [0x0111]
    assert [item["00081155"]["Value"][0] for item in body[REFERENCED]["Value"]] == [
        uid,
        str(pydicom.dcmread(io.BytesIO(second), force=True).SOPInstanceUID),
        uid,
    ]
    assert count_instances(ingest_service) == before + 2


def _bare_real_file(path: Path, implicit_vr: bool) -> tuple[bytes, str]:
    """A bundled real MR (GE, explicit VR, with private tags) rewritten as an old Siemens-style file: fresh
    SOP Instance UID, no 128-byte preamble, no File Meta group; returns the bytes and the original UID."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=implicit_vr, little_endian=True, enforce_file_format=False)
    data = buffer.getvalue()
    assert data[128:132] != b"DICM" and not data.startswith((b"\x02\x00", b"DICM"))
    return data, str(ds.SOPInstanceUID)


@pytest.mark.parametrize(
    "implicit_vr,syntax",
    [(True, pydicom.uid.ImplicitVRLittleEndian), (False, pydicom.uid.ExplicitVRLittleEndian)],
)
def test_real_files_without_preamble_or_file_meta_are_stored_with_the_inferred_transfer_syntax(
    ingest_service: IngestService, shared_data: Path, implicit_vr: bool, syntax: str
):
    """STOW of bundled real MR files with neither preamble nor File Meta: 200, every part referenced, one
    catalogue row each carrying the transfer syntax pydicom read them in, and the stored copy in S3 is a
    proper Part-10 file (preamble, DICM, File Meta) of the de-identified instance."""
    files = sorted((shared_data / "tcia_brain_tumor_progression_mr").rglob("*.dcm"))[:3]
    parts = [_bare_real_file(path, implicit_vr) for path in files]
    with ingest_service.client("pacs") as client:
        response = stow(client, [data for data, _ in parts])
    assert response.status_code == 200, response.text
    assert FAILED not in response.json()
    referenced = response.json()[REFERENCED]["Value"]
    assert len(referenced) == len(parts)
    store = ingest_service.ctx.store  # type: ignore[attr-defined]
    for item, (_, original_uid) in zip(referenced, parts, strict=True):
        pseudonym = item["00081190"]["Value"][0].rsplit("/", 1)[1]
        assert pseudonym != original_uid
        with ingest_service.ctx.session_factory() as session:  # type: ignore[attr-defined]
            row = session.scalars(select(Instance).where(Instance.sop_instance_uid == pseudonym)).one()
        assert (row.state, row.transfer_syntax_uid) == ("stored", syntax)
        stored = store.get_bytes(row.object_key)
        assert stored[128:132] == b"DICM"
        reread = pydicom.dcmread(io.BytesIO(stored))
        assert reread.file_meta.TransferSyntaxUID == syntax
        assert str(reread.SOPInstanceUID) == pseudonym and reread.Modality == "MR"
        assert len(reread.PixelData) == reread.Rows * reread.Columns * reread.BitsAllocated // 8
