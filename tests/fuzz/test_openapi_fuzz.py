"""Schemathesis over every service's OpenAPI document, with a token of each role and without one.

Valid (positive) and invalid (negative) data for every operation, bounded in examples and in time so the
whole stage stays within a few minutes on two cores. Every response is held to all of schemathesis's
checks (``--checks all``): no server error, every status code and media type documented, the body valid
against its documented schema, schema-valid requests accepted and schema-invalid ones rejected, auth not
ignored. A failure is a bug in the service or in its OpenAPI document (docs/api-hardening.md).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.transport.serialization import Binary

from tests.fuzz.conftest import target_for
from tests.fuzz.samples import NIFTI, stow_request

pytestmark = pytest.mark.fuzz

SERVICES = ["ingest", "preprocessing", "aggregation", "model_registry", "inference"]
ROLES = ["admin", "operator", "researcher", "pacs", ""]  # "": no token at all
EXAMPLES_PER_OPERATION = 6
SECONDS_PER_RUN = 12.0  # one service, one role, both generation modes

load_all_checks()
ALL_CHECKS = CHECKS.get_all()  # what `schemathesis run --checks all` runs

# Rules JSON Schema cannot state (a relation between two fields, or what the service is configured with).
# A schema-valid request may break one; it is then refused with 422 and the rule, as a string from the route
# or as a model validator's ``value_error``. Only these operations may refuse schema-valid data so, and only
# so: a 422 naming a field constraint means the document and the service disagree, and fails the test.
DOCUMENTED_RULES: dict[tuple[str, str], str] = {
    ("GET", "/models/{name}/compare"): "a and b differ",
    ("PUT", "/cases/{id}/label"): "the label lies on the grid of the case's image",
    ("POST", "/datasets"): "a site manifest gives each case or patient one site",
    ("POST", "/federated-runs"): "min_sites is at most the number of sites",
    ("POST", "/v1/segmentations"): "send_to_pacs needs a PACS configured on the service",
    ("POST", "/v1/routing-rules"): "model_alias is one the service serves; an empty destination needs its pacs_url",
    ("PUT", "/v1/routing-rules/{id}"): "model_alias is one the service serves; an empty destination needs its pacs_url",
}


@schemathesis.serializer("multipart/related")
def _multipart_related_as_is(ctx: object, value: object) -> bytes:
    """Never used for what is sent (the framing is made in samples.stow_request); registered so that
    schemathesis can generate cases for the STOW operations at all."""
    return value if isinstance(value, bytes) else str(value).encode()


# Every generated file is a real NIfTI image (samples.py); STOW bodies are framed in samples.stow_request.
schemathesis.openapi.format("binary", st.just(Binary(NIFTI)))


def breaks_a_documented_rule(method: str, path: str, status: int, body: object) -> bool:
    """Whether a refusal of schema-valid data is one of DOCUMENTED_RULES rather than the document being wrong."""
    if (method.upper(), path) not in DOCUMENTED_RULES or status != 422 or not isinstance(body, dict):
        return False
    detail = body.get("detail")
    if isinstance(detail, str):
        return True
    return isinstance(detail, list) and all(isinstance(e, dict) and e.get("type") == "value_error" for e in detail)


def _json(response: requests.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


@dataclass
class FuzzReport:
    requests: int = 0
    unsendable: int = 0
    rule_refusals: int = 0  # schema-valid requests refused by a DOCUMENTED_RULES rule
    out_of_time: bool = False  # the run's seconds were spent before every operation had its examples
    statuses: Counter[str] = field(default_factory=Counter)  # "positive 2xx": what was answered, to read
    failures: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)


def _describe(failure: Failure, case: schemathesis.Case, response: requests.Response) -> str:
    mode = case.meta.generation.mode.value if case.meta else "?"
    body = (response.request.body or b"")[:300]
    return (
        f"{failure.code} {failure.title}: {case.method} {response.request.url} ({mode}) -> "
        f"{response.status_code} {response.content[:300]!r}\n    sent: {body!r}\n    {failure.message[:400]}"
    )


def fuzz_service(url: str, token: str | None, seconds: float, schema_token: str) -> FuzzReport:
    # /openapi.json needs a token (VOXELFLOW_PUBLIC_API_DOCS is false): the schema is fetched with
    # schema_token, whatever the role (or none) the requests are then sent with
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers={"Authorization": f"Bearer {schema_token}"})
    # The token is ours to give (or not): schemathesis must not generate, drop or garble the bearer header.
    # ignored_auth still probes every operation without it and with a wrong one.
    schema.config.generation.update(with_security_parameters=False)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    report = FuzzReport()
    deadline = time.monotonic() + seconds
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    session = requests.Session()

    for mode in (GenerationMode.NEGATIVE, GenerationMode.POSITIVE):
        for operation in operations:
            if time.monotonic() > deadline:
                report.out_of_time = True
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
                positive = case.meta is not None and case.meta.generation.mode.is_positive
                call_headers, extra = headers, {}
                if case.media_type and case.media_type.startswith("multipart/related"):
                    extra = stow_request(case.body, (case.path_parameters or {}).get("study_uid"), positive)
                    call_headers = {**headers, **extra.pop("headers")}
                try:
                    response = case.call(base_url=url, session=session, headers=call_headers, timeout=30, **extra)
                except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError, ValueError):
                    report.unsendable += 1  # the client library refuses to send it: nothing reached the server
                    return
                except schemathesis.errors.SerializationNotPossible:
                    report.unsendable += 1
                    return
                report.requests += 1
                report.statuses[f"{'positive' if positive else 'negative'} {response.status_code // 100}xx"] += 1
                try:
                    case.validate_response(
                        response,
                        checks=ALL_CHECKS,
                        headers=headers,
                        transport_kwargs={"base_url": url, "session": session, "headers": headers, "timeout": 30},
                    )
                except FailureGroup as group:
                    for failure in group.exceptions:
                        if isinstance(failure, RejectedPositiveData) and breaks_a_documented_rule(
                            case.method, case.path, response.status_code, _json(response)
                        ):
                            report.rule_refusals += 1
                            continue
                        report.kinds[f"{failure.code} {case.method} {case.path}"] += 1
                        report.failures.append(_describe(failure, case, response))

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                continue  # nothing to make invalid (an operation without parameters or body)
    return report


@pytest.mark.parametrize("role", ROLES, ids=[r or "anonymous" for r in ROLES])
@pytest.mark.parametrize("service", SERVICES)
def test_every_generated_request_conforms(request: pytest.FixtureRequest, service: str, role: str):
    target = target_for(request, service)
    report = fuzz_service(target.url, target.tokens[role] if role else None, SECONDS_PER_RUN, target.tokens["admin"])
    print(
        f"fuzz {service}/{role or 'anonymous'}: {report.requests} requests, {report.unsendable} unsendable, "
        f"{report.rule_refusals} refused by a documented rule; {dict(sorted(report.statuses.items()))}"
        + (" (out of time: later operations not reached)" if report.out_of_time else "")
    )
    assert report.requests > 0, f"{service}: nothing was sent ({report.unsendable} cases unsendable)"
    if report.failures:
        summary = "\n".join(f"{n:4d} {kind}" for kind, n in report.kinds.most_common())
        pytest.fail(f"{len(report.failures)} check failures:\n{summary}\n\n" + "\n".join(report.failures[:30]))


def test_only_documented_rules_excuse_refusing_valid_data() -> None:
    """The excuse cannot hide a document that disagrees with its service: a field constraint the schema did
    not state (a pattern, a range) is never excused, nor anything on an operation without a rule."""
    rule = ("POST", "/federated-runs")
    assert breaks_a_documented_rule(*rule, 422, {"detail": "min_sites 4 exceeds the 2 sites"})
    assert breaks_a_documented_rule(*rule, 422, {"detail": [{"type": "value_error", "loc": ["body"], "msg": "x"}]})
    field_error = {"type": "string_pattern_mismatch", "loc": ["body", "sites", 0], "msg": "x"}
    assert not breaks_a_documented_rule(*rule, 422, {"detail": [field_error]})
    assert not breaks_a_documented_rule(*rule, 422, {"detail": [{"type": "value_error"}, field_error]})
    assert not breaks_a_documented_rule(*rule, 400, {"detail": "min_sites 4 exceeds the 2 sites"})
    assert not breaks_a_documented_rule("POST", "/v1/model-exports", 422, {"detail": "roi_size values must be 8..512"})
