"""Where results go: a PACS over DICOMweb STOW-RS or over DIMSE C-STORE, chosen by the URL's scheme.

``http(s)://…`` is a DICOMweb root (STOW-RS, :mod:`services.inference.pacs_upload`);
``dicom://AET@host:port`` is a DICOM node that accepts C-STORE (pynetdicom, one association per send,
one presentation context per SOP class with the transfer syntaxes the datasets are encoded in).

Errors split as the task needs them: a PACS that answered and refused an instance raises
:class:`PacsRefusedError` (permanent: the task dead-letters it, a retry would be refused again); a PACS
that cannot be reached, rejects or aborts the association raises :class:`PacsUnavailableError`
(``ConnectionError``: the task retries).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from pydicom.dataset import Dataset

from services.inference.pacs_upload import PacsRefusedError, stow

#: ``dicom://AET@host:port``: AE titles are at most 16 characters, no backslash nor control characters
DIMSE_URL = re.compile(r"dicom://(?P<aet>[^@\\/\x00-\x1f]{1,16})@(?P<host>[^:/@]+):(?P<port>\d{1,5})/?")
#: C-STORE statuses that mean "stored" (0x0000 success; 0xB000/0xB006/0xB007 warnings: stored with coercion)
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class PacsUnavailableError(ConnectionError):
    """The PACS could not be reached or would not associate; a later try may succeed."""


class Destination(Protocol):
    url: str

    def send(self, datasets: Sequence[Dataset]) -> list[str]:
        """Store every dataset; return the SOP Instance UIDs the destination confirmed."""
        ...


@dataclass
class StowDestination:
    url: str
    headers: dict[str, str] = field(default_factory=dict)

    def send(self, datasets: Sequence[Dataset]) -> list[str]:
        return stow(self.url, datasets, self.headers)


@dataclass
class CStoreDestination:
    url: str
    called_aet: str
    host: str
    port: int
    calling_aet: str = "VOXELFLOW"
    timeout_seconds: float = 60.0

    def send(self, datasets: Sequence[Dataset]) -> list[str]:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_seconds
        for sop_class, syntaxes in presentation_contexts(datasets).items():
            ae.add_requested_context(sop_class, syntaxes)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet)
        if not assoc.is_established:
            raise PacsUnavailableError(f"{self.url}: association not established (rejected, aborted or no answer)")
        stored, refused = [], []
        accepted = {context.abstract_syntax for context in assoc.accepted_contexts}
        try:
            for ds in datasets:
                if str(ds.SOPClassUID) not in accepted:  # e.g. a PACS that does not know Label Map SEG
                    refused.append(f"{ds.SOPInstanceUID}: SOP class {ds.SOPClassUID} not accepted")
                    continue
                status = assoc.send_c_store(ds)
                if not status:  # no response: the association was aborted or timed out
                    raise PacsUnavailableError(f"{self.url}: no C-STORE response for {ds.SOPInstanceUID}")
                code = int(status.Status)
                if code in STORED_STATUSES:
                    stored.append(str(ds.SOPInstanceUID))
                else:
                    refused.append(f"{ds.SOPInstanceUID}: status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        if refused:
            raise PacsRefusedError(f"{self.url} refused {len(refused)} instance(s): {', '.join(refused)}")
        return stored


def presentation_contexts(datasets: Sequence[Dataset]) -> dict[str, list[str]]:
    """SOP class → transfer syntaxes the datasets of that class are encoded in (each sent as it is)."""
    contexts: dict[str, list[str]] = {}
    for ds in datasets:
        syntax = str(ds.file_meta.TransferSyntaxUID)
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), [])
        if syntax not in syntaxes:
            syntaxes.append(syntax)
    return contexts


def is_destination_url(url: str) -> bool:
    return url.startswith(("http://", "https://")) or DIMSE_URL.fullmatch(url) is not None


def destination_for(url: str, headers: dict[str, str] | None = None, calling_aet: str = "VOXELFLOW") -> Destination:
    """The destination a URL names; ``headers`` (HTTP credentials) serve STOW only."""
    if urlsplit(url).scheme in ("http", "https"):
        return StowDestination(url, dict(headers or {}))
    match = DIMSE_URL.fullmatch(url)
    if match is None:
        raise ValueError(f"{url!r} is neither a DICOMweb root (http(s)://) nor dicom://AET@host:port")
    return CStoreDestination(url, match["aet"], match["host"], int(match["port"]), calling_aet)
