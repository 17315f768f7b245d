"""DICOM C-STORE / C-ECHO receiver (pynetdicom), for modalities and PACS that push over DIMSE.

``python -m services.ingest.dimse`` runs it. Each stored instance goes through the same receiver as
STOW-RS. DIMSE has no tokens: callers are admitted by calling AE title (``dimse_allowed_ae_titles``)
and by network policy. Every C-STORE and C-ECHO, answered or refused, is written to the audit log like an
HTTP request (:class:`DimseAuditor`).
"""

from __future__ import annotations

import io
import logging
import signal
import threading
import uuid
from collections.abc import Callable
from typing import Any

from pydicom.filewriter import dcmwrite
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from services.ingest.context import SERVICE, IngestContext
from services.ingest.settings import IngestSettings
from services.ingest.validation import InstanceRejectedError
from shared import audit
from shared.observability.logging import configure_logging

log = logging.getLogger("voxelflow.ingest.dimse")

STATUS_SUCCESS = 0x0000
STATUS_NOT_AUTHORIZED = 0x0124  # Refused: not authorised (PS3.7 C.5)
STATUS_PROCESSING_FAILURE = 0x0110  # the receiver failed, not the sender: HTTP's 5xx


def outcome_of(status: int) -> str:
    """A DIMSE status as the audit log's outcome (the same words as for HTTP)."""
    if status == STATUS_SUCCESS:
        return "success"
    if status == STATUS_NOT_AUTHORIZED:
        return "denied"
    return "error" if status == STATUS_PROCESSING_FAILURE else "rejected"


class DimseAuditor:
    """Writes one audit row per DIMSE message answered, as the HTTP middleware does per request.

    DIMSE has no tokens: the caller is its calling AE title at its address, ``dimse:<AE>@<address>``. An
    admitted caller (the AE title allow-list) acts with role ``pacs``; a refused one is recorded without a
    role, as an HTTP request without a valid token is. Object UIDs are the pseudonymised ones only.
    """

    def __init__(self, ctx: IngestContext):
        self.ctx = ctx

    def __call__(self, event: Any, method: str, status: int, original_uids: list[str], admitted: bool) -> None:
        """``original_uids`` as the sender named them; the row holds their pseudonyms."""
        requestor = event.assoc.requestor
        audit.record(
            self.ctx.session_factory,
            service=SERVICE,
            request_id=uuid.uuid4().hex,
            principal=f"dimse:{requestor.ae_title.strip()}@{requestor.address}",
            role="pacs" if admitted else None,
            method=method,
            path=f"dimse://{self.ctx.settings.dimse_ae_title}",
            object_uids=[self.ctx.deidentifier.pseudonymise_uid(uid) for uid in original_uids if uid],
            status_code=status,
            outcome=outcome_of(status),
            client=f"{requestor.address}:{requestor.port}",
        )


def _admits(ctx: IngestContext) -> Callable[[Any], bool]:
    allowed = {title.strip() for title in ctx.settings.dimse_allowed_ae_titles}
    return lambda event: not allowed or event.assoc.requestor.ae_title.strip() in allowed


def make_echo_handler(ctx: IngestContext) -> Callable[[Any], int]:
    """C-ECHO: success for an admitted AE, refused (0x0124) for another; audited either way."""
    admits, auditor = _admits(ctx), DimseAuditor(ctx)

    def handle_echo(event: Any) -> int:
        admitted = admits(event)
        status = STATUS_SUCCESS if admitted else STATUS_NOT_AUTHORIZED
        auditor(event, "C-ECHO", status, [], admitted)
        return status

    return handle_echo


def make_store_handler(ctx: IngestContext) -> Callable[[Any], int]:
    admits, auditor = _admits(ctx), DimseAuditor(ctx)

    def handle_store(event: Any) -> int:
        # The request names the instance without decoding the data set (which a refused caller never gets).
        affected = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        if not admits(event):
            auditor(event, "C-STORE", STATUS_NOT_AUTHORIZED, [affected], admitted=False)
            return STATUS_NOT_AUTHORIZED
        try:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            buffer = io.BytesIO()
            dcmwrite(buffer, dataset, enforce_file_format=True)
            received = ctx.receiver.receive_dataset(
                dataset, buffer.tell(), source="dimse", calling_ae_title=event.assoc.requestor.ae_title
            )
        except InstanceRejectedError as exc:
            log.warning("C-STORE refused: %s", exc.message, extra={"reason": exc.reason.value})
            auditor(event, "C-STORE", exc.failure_status, [exc.sop_instance_uid or affected], admitted=True)
            return exc.failure_status
        except Exception:
            # As for a STOW part: an unforeseen failure is this instance's processing failure, reported and
            # audited, not an exception that pynetdicom would answer for us unaudited.
            log.exception("C-STORE failed unexpectedly")
            auditor(event, "C-STORE", STATUS_PROCESSING_FAILURE, [affected], admitted=True)
            return STATUS_PROCESSING_FAILURE
        auditor(event, "C-STORE", STATUS_SUCCESS, [received.original_sop_instance_uid], admitted=True)
        return STATUS_SUCCESS

    return handle_store


def start_receiver(ctx: IngestContext, block: bool = False, port: int | None = None) -> Any:
    """Start the SCP (on ``port``, default ``dimse_port``); returns the pynetdicom server (call
    ``.shutdown()``) unless ``block``."""
    ae = AE(ae_title=ctx.settings.dimse_ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = 0
    handlers: list[Any] = [(evt.EVT_C_STORE, make_store_handler(ctx)), (evt.EVT_C_ECHO, make_echo_handler(ctx))]
    address = (ctx.settings.dimse_host, ctx.settings.dimse_port if port is None else port)
    log.info("DICOM receiver %s listening on %s:%d", ctx.settings.dimse_ae_title, *address)
    return ae.start_server(address, block=block, evt_handlers=handlers)


def main() -> None:
    settings = IngestSettings()
    configure_logging("ingest-dimse", settings.log_level, settings.log_json)
    ctx = IngestContext(settings)
    ctx.migrate()
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port)
    server = start_receiver(ctx)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
