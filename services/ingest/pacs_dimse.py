"""The DIMSE side of a PACS pull (pynetdicom SCU): C-FIND to find, C-MOVE or C-GET to retrieve.

For PACS that speak no DICOMweb, which is still most of those in hospitals. The Study Root model is used
throughout (every Q/R SCP supports it). Before a series is retrieved its instances are listed by an
IMAGE-level C-FIND, for two reasons: C-GET must propose a storage presentation context for every SOP
class it will be sent, and the list is what "every instance arrived" is checked against.

C-MOVE makes the PACS open its own association to voxelflow's C-STORE receiver
(:mod:`services.ingest.dimse`, which the PACS must know by AE title, host and port); instances then reach
the catalogue through that process, and this side checks the catalogue for them. Orthanc (like other
SCPs) ends a C-MOVE at its first failed sub-operation, so when some did not arrive they are moved again one
at a time: one instance voxelflow refuses costs only itself. C-GET needs nothing configured on the PACS:
the instances come back on the pull's own association and go through the receiver here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from services.ingest.pacs_pull import (
    STATUS_SUCCESS,
    PacsRefusedError,
    PacsUnavailableError,
    Sink,
    Transfer,
    dimse_identifier,
)
from services.ingest.settings import IngestSettings, PacsConnection

PENDING = (0xFF00, 0xFF01)
WARNING = 0xB000  # sub-operations complete, one or more failures or warnings
MOVE_DESTINATION_UNKNOWN = 0xA801
CANNOT_UNDERSTAND = 0xC000
#: one context is the Q/R model's; PS3.8 allows 128 presentation contexts in an association
MAX_STORAGE_CONTEXTS = 127


def _status(status: Dataset) -> tuple[int | None, str]:
    """(status code, error comment) of a DIMSE response; (None, "") when the association ended without one."""
    if "Status" not in status:
        return None, ""
    comment = str(status.get("ErrorComment", "") or "")
    return int(status.Status), comment


def _describe(code: int, comment: str) -> str:
    return f"status 0x{code:04X}" + (f" ({comment})" if comment else "")


class DimseSource:
    """A PACS reached over DIMSE, as a :class:`services.ingest.pacs_pull.PacsSource`."""

    find_method = "C-FIND"

    def __init__(
        self,
        called_ae_title: str,
        host: str,
        port: int,
        calling_ae_title: str,
        retrieve: str = "move",
        move_destination: str | None = None,
        timeout_seconds: float = 60.0,
    ) -> None:
        self.called, self.host, self.port = called_ae_title, host, port
        self.calling = calling_ae_title
        self.retrieve = retrieve
        self.move_destination = move_destination or calling_ae_title
        self.timeout = timeout_seconds
        self.address = f"dimse://{called_ae_title}@{host}:{port}"
        self.retrieve_method = "C-GET" if retrieve == "get" else "C-MOVE"

    @classmethod
    def from_connection(cls, connection: PacsConnection, settings: IngestSettings) -> DimseSource:
        parts = urlsplit(connection.url)
        assert parts.username and parts.hostname and parts.port  # checked by PacsConnection
        return cls(
            called_ae_title=parts.username,
            host=parts.hostname,
            port=parts.port,
            calling_ae_title=connection.calling_ae_title or settings.dimse_ae_title,
            retrieve=connection.retrieve,
            move_destination=connection.move_destination or settings.dimse_ae_title,
            timeout_seconds=connection.timeout_seconds,
        )

    # ------------------------------------------------------------------ associations

    @contextmanager
    def _association(
        self,
        contexts: list[Any],
        roles: list[Any] | None = None,
        handlers: list[Any] | None = None,
    ) -> Iterator[Association]:
        ae = AE(ae_title=self.calling)
        for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, name, self.timeout)
        assoc = ae.associate(
            self.host, self.port, contexts, ae_title=self.called, ext_neg=roles or None, evt_handlers=handlers
        )
        if not assoc.is_established:
            self._not_established(assoc)
        try:
            wanted = contexts[0].abstract_syntax
            if not any(c.abstract_syntax == wanted for c in assoc.accepted_contexts):
                raise PacsRefusedError(f"{self.address} does not support {wanted.name}")
            yield assoc
        except BaseException:
            assoc.abort()  # a time limit or an error mid-exchange: do not leave the PACS waiting
            raise
        else:
            assoc.release()

    def _not_established(self, assoc: Association) -> None:
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            result = getattr(primitive, "result", None)
            reason = getattr(primitive, "reason_str", "") or ""
            message = (
                f"{self.address} rejected the association from {self.calling}: {reason or 'no reason given'} "
                "(check the called AE title and that the PACS knows this calling AE title)"
            )
            if result == 0x01:  # rejected-permanent
                raise PacsRefusedError(message)
            raise PacsUnavailableError(message)
        raise PacsUnavailableError(
            f"no association with {self.address} within {self.timeout:g} s (refused, aborted or timed out: "
            "is the PACS up, and are the host and port right?)"
        )

    # ------------------------------------------------------------------ C-FIND

    def _find(self, level: str, keys: Mapping[str, str], returned: Sequence[str]) -> list[Dataset]:
        identifier = dimse_identifier(level, keys, returned)
        model = StudyRootQueryRetrieveInformationModelFind
        matches: list[Dataset] = []
        with self._association([build_context(model)]) as assoc:
            for status, found in assoc.send_c_find(identifier, model):
                code, comment = _status(status)
                if code is None:
                    raise PacsUnavailableError(f"{self.address}: no C-FIND answer within {self.timeout:g} s")
                if code in PENDING:
                    if found is not None:
                        matches.append(found)
                elif code != STATUS_SUCCESS:
                    raise PacsRefusedError(
                        f"{self.address}: C-FIND at {level} level failed, {_describe(code, comment)}"
                    )
        return matches

    @staticmethod
    def _uids(matches: Sequence[Dataset], keyword: str) -> list[str]:
        seen: dict[str, None] = {}
        for match in matches:
            value = str(match.get(keyword, "") or "").strip()
            if value:
                seen.setdefault(value)
        return list(seen)

    def find_studies(self, query: Mapping[str, str]) -> list[str]:
        return self._uids(self._find("STUDY", query, ["StudyInstanceUID"]), "StudyInstanceUID")

    def find_series(self, study_uid: str, query: Mapping[str, str]) -> list[str]:
        keys = {**query, "StudyInstanceUID": study_uid}
        return self._uids(self._find("SERIES", keys, ["SeriesInstanceUID"]), "SeriesInstanceUID")

    def _instances(self, study_uid: str, series_uid: str) -> list[tuple[str, str]]:
        """(SOPInstanceUID, SOPClassUID) of every instance of the series."""
        keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
        matches = self._find("IMAGE", keys, ["SOPInstanceUID", "SOPClassUID"])
        found: dict[str, str] = {}
        for match in matches:
            uid = str(match.get("SOPInstanceUID", "") or "").strip()
            if uid:
                found[uid] = str(match.get("SOPClassUID", "") or "").strip()
        return list(found.items())

    # ------------------------------------------------------------------ retrieve

    def retrieve_series(self, study_uid: str, series_uid: str, sink: Sink) -> Transfer:
        instances = self._instances(study_uid, series_uid)
        if not instances:
            return Transfer()
        if self.retrieve == "get":
            return self._get(study_uid, series_uid, instances, sink)
        return self._move(study_uid, series_uid, [uid for uid, _ in instances], sink)

    def _retrieve(
        self, assoc: Association, send: Callable[..., Iterator[tuple[Dataset, Dataset | None]]], identifier: Dataset
    ) -> tuple[int, str]:
        """Run one C-MOVE/C-GET to its final response: (status, error comment)."""
        final: tuple[int, str] = (STATUS_SUCCESS, "")
        for status, _ in send(identifier):
            code, comment = _status(status)
            if code is None:
                raise PacsUnavailableError(
                    f"{self.address}: no {self.retrieve_method} answer within {self.timeout:g} s"
                )
            if code not in PENDING:
                final = (code, comment)
        return final

    def _move(self, study_uid: str, series_uid: str, uids: list[str], sink: Sink) -> Transfer:
        model = StudyRootQueryRetrieveInformationModelMove
        keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
        with self._association([build_context(model)]) as assoc:

            def send(identifier: Dataset) -> Iterator[tuple[Dataset, Dataset | None]]:
                return assoc.send_c_move(identifier, self.move_destination, model)

            status, comment = self._retrieve(assoc, send, dimse_identifier("SERIES", keys, []))
            if status == MOVE_DESTINATION_UNKNOWN:
                raise PacsRefusedError(self._unknown_destination(status, comment))
            arrived = sink.present(uids)
            missing = [uid for uid in uids if uid not in arrived]
            for index, uid in enumerate(missing):
                one = {**keys, "SOPInstanceUID": uid}
                single_status, single_comment = self._retrieve(assoc, send, dimse_identifier("IMAGE", one, []))
                if index == 0 and not arrived and not sink.present([uid]):
                    # nothing of the series arrived, not even alone: the destination is the problem
                    status, comment = single_status, single_comment
                    break
        arrived = sink.present(uids)
        failed = len(uids) - len(arrived)
        transfer = Transfer(stored=len(arrived), failed=failed, status=status if failed else STATUS_SUCCESS)
        if failed == len(uids):
            transfer.note = self._unknown_destination(status, comment)
        elif failed:
            transfer.note = (
                f"{failed} of {len(uids)} instances did not reach the catalogue after C-MOVE to "
                f"{self.move_destination} ({_describe(status, comment)}); the receiver's log says why it refused them"
            )
        return transfer

    def _unknown_destination(self, status: int, comment: str) -> str:
        return (
            f"nothing arrived from C-MOVE to {self.move_destination} ({_describe(status, comment)}): the PACS "
            f"must know voxelflow's receiver as a modality (AE title {self.move_destination}, its host and DIMSE "
            "port) and the receiver must be running; or set retrieve to 'get'"
        )

    def _get(self, study_uid: str, series_uid: str, instances: list[tuple[str, str]], sink: Sink) -> Transfer:
        model = StudyRootQueryRetrieveInformationModelGet
        classes = sorted({sop_class for _, sop_class in instances if sop_class})
        if not classes or len(classes) > MAX_STORAGE_CONTEXTS:  # the PACS did not say: the common ones
            classes = [str(c.abstract_syntax) for c in StoragePresentationContexts][:MAX_STORAGE_CONTEXTS]
        contexts = [build_context(model)] + [build_context(c, ALL_TRANSFER_SYNTAXES) for c in classes]
        roles = [build_role(c, scp_role=True) for c in classes]
        outcome: dict[str, int] = {}

        def on_store(event: Any) -> int:
            try:
                dataset = event.dataset
                dataset.file_meta = event.file_meta
                uid = str(dataset.get("SOPInstanceUID", "") or "")
                size = len(event.request.DataSet.getvalue())
            except Exception:
                return CANNOT_UNDERSTAND
            outcome[uid] = sink.store(dataset, size)
            return outcome[uid]

        keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
        with self._association(contexts, roles, [(evt.EVT_C_STORE, on_store)]) as assoc:

            def send(identifier: Dataset) -> Iterator[tuple[Dataset, Dataset | None]]:
                return assoc.send_c_get(identifier, model)

            status, comment = self._retrieve(assoc, send, dimse_identifier("SERIES", keys, []))
        stored = sum(1 for code in outcome.values() if code == STATUS_SUCCESS)
        refused = len(outcome) - stored
        missing = sum(1 for uid, _ in instances if uid not in outcome)
        transfer = Transfer(stored=stored, failed=refused + missing, status=status)
        problems = []
        if refused:
            problems.append(f"{refused} refused by ingest validation (see the ingest log)")
        if missing:
            problems.append(f"{missing} listed by C-FIND but not sent ({_describe(status, comment)})")
        transfer.note = "; ".join(problems) or None
        return transfer

    def close(self) -> None:
        """Nothing held between calls: every exchange has its own association."""
