"""Schemathesis over every service's OpenAPI document, with a token of each role and without one.

Valid (positive) and invalid (negative) data for every operation, bounded in examples and in time so the
whole stage stays within a few minutes on two cores. The one property asserted: no response is a server
error. A 5xx here is a bug: bad input must get a 4xx with a reason (docs/api-hardening.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

from tests.fuzz.conftest import target_for

pytestmark = pytest.mark.fuzz

SERVICES = ["ingest", "preprocessing", "aggregation", "model_registry", "inference"]
ROLES = ["admin", "operator", "researcher", "pacs", ""]  # "": no token at all
EXAMPLES_PER_OPERATION = 6
SECONDS_PER_RUN = 12.0  # one service, one role, both generation modes


@schemathesis.serializer("multipart/related")
def _multipart_related_as_is(ctx: object, value: object) -> bytes:
    """STOW bodies as generated: the documented media type has no boundary, so the service answers 400;
    real multipart bodies are fuzzed by test_stow_mutation_fuzz.py."""
    return value if isinstance(value, bytes) else str(value).encode()


@dataclass
class FuzzReport:
    requests: int = 0
    unsendable: int = 0
    server_errors: list[str] = field(default_factory=list)


def fuzz_service(url: str, token: str | None, seconds: float) -> FuzzReport:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    report = FuzzReport()
    deadline = time.monotonic() + seconds
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    session = requests.Session()

    for mode in (GenerationMode.NEGATIVE, GenerationMode.POSITIVE):
        for operation in operations:
            if time.monotonic() > deadline:
                return report

            @hypothesis.settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,  # the same cases on every run: a CI failure reproduces locally
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                if time.monotonic() > deadline:
                    return
                try:
                    response = case.call(base_url=url, session=session, headers=headers, timeout=30)
                except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError, ValueError):
                    report.unsendable += 1  # the client library refuses to send it: nothing reached the server
                    return
                except schemathesis.errors.SerializationNotPossible:
                    report.unsendable += 1
                    return
                report.requests += 1
                if response.status_code >= 500:
                    report.server_errors.append(
                        f"{response.status_code} {case.method} {response.request.url} "
                        f"({case.meta.generation.mode.value if case.meta else '?'}): {response.text[:300]}"
                    )

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                continue  # nothing to make invalid (an operation without parameters or body)
    return report


@pytest.mark.parametrize("role", ROLES, ids=[r or "anonymous" for r in ROLES])
@pytest.mark.parametrize("service", SERVICES)
def test_no_server_error_for_any_generated_request(request: pytest.FixtureRequest, service: str, role: str):
    target = target_for(request, service)
    report = fuzz_service(target.url, target.tokens[role] if role else None, SECONDS_PER_RUN)
    print(f"fuzz {service}/{role or 'anonymous'}: {report.requests} requests, {report.unsendable} unsendable")
    assert report.requests > 0, f"{service}: nothing was sent ({report.unsendable} cases unsendable)"
    assert not report.server_errors, f"{len(report.server_errors)} server errors:\n" + "\n".join(
        report.server_errors[:20]
    )
