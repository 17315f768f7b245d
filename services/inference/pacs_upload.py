"""Send results to the PACS over STOW-RS (dicomweb-client) and check the PACS kept them."""

from __future__ import annotations

from collections.abc import Sequence

from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset


class PacsRefusedError(RuntimeError):
    """The PACS answered but did not store the instance (FailedSOPSequence); retrying will not help."""


def stow(pacs_url: str, datasets: Sequence[Dataset], headers: dict[str, str] | None = None) -> list[str]:
    """Store instances; return the stored SOP Instance UIDs. Network errors propagate at once (the task retries)."""
    client = DICOMwebClient(pacs_url, headers=headers or None, timeout=120)
    # one retry layer, the task's (backoff, then a dead letter): dicomweb-client's own would retry an unreachable
    # PACS 5 times with 30 s of waits inside every task attempt, multiplying the delays without telling anyone
    client.set_http_retry_params(retry=False)
    response = client.store_instances(list(datasets))
    failed = response.get("FailedSOPSequence") or []
    if failed:
        reasons = ", ".join(
            f"{item.get('ReferencedSOPInstanceUID', '?')}: {item.get('FailureReason', '?')}" for item in failed
        )
        raise PacsRefusedError(f"PACS refused {len(failed)} instance(s): {reasons}")
    return [str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence") or []]
