"""DICOM C-STORE / C-ECHO receiver (pynetdicom), for modalities and PACS that push over DIMSE.

``python -m services.ingest.dimse`` runs it. Each stored instance goes through the same receiver as
STOW-RS. DIMSE has no tokens: callers are admitted by calling AE title (``dimse_allowed_ae_titles``)
and by network policy, and every association's stores are written to the audit log as principal
``dimse:<AE>@<address>`` with role ``pacs``.
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
from shared.db.base import session_scope
from shared.db.models import AuditEvent
from shared.observability.logging import configure_logging

log = logging.getLogger("voxelflow.ingest.dimse")

STATUS_SUCCESS = 0x0000
STATUS_NOT_AUTHORIZED = 0x0124  # Refused: not authorised


def _audit(ctx: IngestContext, event: Any, uids: list[str], status: int) -> None:
    requestor = event.assoc.requestor
    with session_scope(ctx.session_factory) as session:
        session.add(
            AuditEvent(
                service=SERVICE,
                request_id=uuid.uuid4().hex,
                principal=f"dimse:{requestor.ae_title}@{requestor.address}",
                role="pacs",
                method="C-STORE",
                path=f"dimse://{ctx.settings.dimse_ae_title}",
                object_uids=uids,
                status_code=status,
                outcome="success" if status == STATUS_SUCCESS else "rejected",
                client=f"{requestor.address}:{requestor.port}",
            )
        )


def make_store_handler(ctx: IngestContext) -> Callable[[Any], int]:
    allowed = {title.strip() for title in ctx.settings.dimse_allowed_ae_titles}

    def handle_store(event: Any) -> int:
        calling = event.assoc.requestor.ae_title.strip()
        if allowed and calling not in allowed:
            _audit(ctx, event, [], STATUS_NOT_AUTHORIZED)
            return STATUS_NOT_AUTHORIZED
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        buffer = io.BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        try:
            received = ctx.receiver.receive_dataset(dataset, buffer.tell(), source="dimse")
        except InstanceRejectedError as exc:
            log.warning("C-STORE refused: %s", exc.message, extra={"reason": exc.reason.value})
            _audit(ctx, event, [exc.sop_instance_uid], exc.failure_status)
            return exc.failure_status
        _audit(ctx, event, [received.sop_instance_uid], STATUS_SUCCESS)
        return STATUS_SUCCESS

    return handle_store


def start_receiver(ctx: IngestContext, block: bool = False, port: int | None = None) -> Any:
    """Start the SCP (on ``port``, default ``dimse_port``); returns the pynetdicom server (call
    ``.shutdown()``) unless ``block``."""
    ae = AE(ae_title=ctx.settings.dimse_ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = 0
    handlers: list[Any] = [(evt.EVT_C_STORE, make_store_handler(ctx))]
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
