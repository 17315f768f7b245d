"""The DICOM receiver audits every C-STORE and C-ECHO as the HTTP services audit a request: answered or
refused, with the caller, its role (none when it was not admitted), the outcome and pseudonymised UIDs only.

Driven over real associations: pynetdicom as the modality for the statuses, dcmtk's echoscu/storescu for
what a real PACS sends; the receiver is the production one (``services.ingest.dimse.start_receiver``).
"""

from __future__ import annotations

import io
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from services.ingest.models import Instance
from shared.db.models import AuditEvent
from tests.ingest.conftest import IngestService
from tests.ingest.test_dicomweb_api import minimal_image
from tests.service_harness import free_port


@dataclass
class Receiver:
    ctx: object  # services.ingest.context.IngestContext
    port: int
    admitted: str  # the one calling AE title allowed to store
    intruder: str  # an AE title that is not

    def associate(self, calling: str) -> object:
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="VOXELFLOW")
        assert assoc.is_established
        return assoc

    def audit_rows(self, calling: str) -> list[AuditEvent]:
        with self.ctx.session_factory() as session:  # type: ignore[attr-defined]
            query = select(AuditEvent).where(AuditEvent.principal == f"dimse:{calling}@127.0.0.1")
            return list(session.scalars(query.order_by(AuditEvent.id)))

    def pseudonym(self, uid: str) -> str:
        return str(self.ctx.deidentifier.pseudonymise_uid(uid))  # type: ignore[attr-defined]

    def stored(self, original_sop_uid: str) -> bool:
        with self.ctx.session_factory() as session:  # type: ignore[attr-defined]
            query = select(Instance.id).where(Instance.sop_instance_uid == self.pseudonym(original_sop_uid))
            return session.scalar(query) is not None


@pytest.fixture
def receiver(ingest_service: IngestService) -> Iterator[Receiver]:
    from services.ingest.dimse import start_receiver

    ctx = ingest_service.ctx
    settings = ctx.settings  # type: ignore[attr-defined]
    saved = settings.dimse_port, list(settings.dimse_allowed_ae_titles)
    # titles of their own, so that this test's audit rows are told apart from any other test's
    admitted, intruder = f"MOD{secrets.token_hex(4).upper()}", f"BAD{secrets.token_hex(4).upper()}"
    settings.dimse_port, settings.dimse_allowed_ae_titles = free_port(), [admitted]
    server = start_receiver(ctx)  # type: ignore[arg-type]
    try:
        yield Receiver(ctx, settings.dimse_port, admitted, intruder)
    finally:
        server.shutdown()
        settings.dimse_port, settings.dimse_allowed_ae_titles = saved


def _dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data), force=True)  # minimal_image writes no preamble


def test_echo_is_audited_answered_or_refused(receiver: Receiver) -> None:
    for calling, expected in ((receiver.admitted, 0x0000), (receiver.intruder, 0x0124)):
        assoc = receiver.associate(calling)
        status = assoc.send_c_echo()  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        assert status.Status == expected, calling
    (ok,) = receiver.audit_rows(receiver.admitted)
    assert (ok.method, ok.status_code, ok.outcome, ok.role) == ("C-ECHO", 0, "success", "pacs")
    assert ok.path == "dimse://VOXELFLOW" and ok.client.startswith("127.0.0.1:") and ok.service == "ingest"
    (refused,) = receiver.audit_rows(receiver.intruder)
    assert (refused.method, refused.status_code, refused.outcome, refused.role) == ("C-ECHO", 0x0124, "denied", None)


def test_store_is_audited_with_pseudonymised_uids_only(receiver: Receiver) -> None:
    good, bad, unadmitted = (
        _dataset(minimal_image()),
        _dataset(minimal_image(PatientID="SYNTH-2", SeriesInstanceUID=None)),  # refused: no series
        _dataset(minimal_image()),
    )
    assoc = receiver.associate(receiver.admitted)
    statuses = [assoc.send_c_store(ds).Status for ds in (good, bad)]  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assoc = receiver.associate(receiver.intruder)
    statuses.append(assoc.send_c_store(unadmitted).Status)  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assert statuses == [0x0000, 0xA900, 0x0124]
    assert receiver.stored(good.SOPInstanceUID)
    assert not receiver.stored(bad.SOPInstanceUID) and not receiver.stored(unadmitted.SOPInstanceUID)

    stored, rejected = receiver.audit_rows(receiver.admitted)
    assert (stored.method, stored.status_code, stored.outcome, stored.role) == ("C-STORE", 0, "success", "pacs")
    assert (rejected.method, rejected.status_code, rejected.outcome) == ("C-STORE", 0xA900, "rejected")
    (denied,) = receiver.audit_rows(receiver.intruder)
    assert (denied.method, denied.status_code, denied.outcome, denied.role) == ("C-STORE", 0x0124, "denied", None)
    # every row names its instance, by pseudonym: the sender's UIDs never reach the audit log
    for row, ds in ((stored, good), (rejected, bad), (denied, unadmitted)):
        assert row.object_uids == [receiver.pseudonym(ds.SOPInstanceUID)]
        assert ds.SOPInstanceUID not in row.object_uids


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is installed by ci/install-system.sh")
def test_dcmtk_refused_echo_and_store_are_audited(receiver: Receiver, tmp_path: Path) -> None:
    """What a real PACS sees and what the log says, for a caller that is not on the allow-list."""
    target = ["127.0.0.1", str(receiver.port)]
    echo = subprocess.run(
        ["echoscu", "-v", "-aet", receiver.intruder, "-aec", "VOXELFLOW", *target],
        capture_output=True,
        text=True,
        timeout=30,
    )
    instance = tmp_path / "instance.dcm"
    _dataset(minimal_image()).save_as(instance, enforce_file_format=True)  # a Part-10 file, as storescu reads
    push = subprocess.run(
        ["storescu", "-v", "-aet", receiver.intruder, "-aec", "VOXELFLOW", *target, str(instance)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert re.search(r"Status: 0x0?124", echo.stderr), echo  # dcmtk names no C-ECHO status "not authorised"
    assert re.search(r"Status: 0x0?124", push.stderr), push
    rows = receiver.audit_rows(receiver.intruder)
    assert [(r.method, r.outcome, r.role) for r in rows] == [("C-ECHO", "denied", None), ("C-STORE", "denied", None)]
    original = str(pydicom.dcmread(instance).SOPInstanceUID)
    assert rows[1].object_uids == [receiver.pseudonym(original)] and not receiver.stored(original)
