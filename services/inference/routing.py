"""Routing rules: which newly completed series are segmented automatically, by which model, sent where.

An operator's rule names what a series must be (modality, body part, a series-description pattern, SOP class,
the AE title that sent it, the site it was received at) and what to do with it (a model alias, a destination).
Ingest offers every completed series (``inference.route_series`` with a ``SeriesIngested``); the task asks
:func:`match_rules` which rules apply and creates one segmentation request per matching rule, with a request ID
derived from the rule and the series (:func:`routed_request_id`), so a redelivered offer never segments twice.

The decision is a pure function of the series' facts and the rules, so it is tested without any server. Why
every criterion is optional: an empty criterion means "any", so a rule says only what it cares about; why all
matching rules fire (no first-match-wins): two rules are two models an operator wants run, e.g. a
hippocampus model and a tumour model on the same T1 series.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, TypeVar

#: the longest series-description pattern a rule may hold (a bounded regex is a bounded match cost)
MAX_PATTERN_LENGTH = 256


@dataclass(frozen=True)
class SeriesFacts:
    """What a rule can look at, as ingest announced the series (pseudonymised UIDs, never originals)."""

    series_instance_uid: str
    study_instance_uid: str = ""
    modality: str = ""
    body_part_examined: str = ""
    series_description: str = ""
    sop_class_uid: str = ""
    calling_ae_title: str = ""
    site: str = ""
    volumetric: bool = True


class RuleLike(Protocol):
    """The fields of a rule that matching reads (the ORM row and plain test objects both have them)."""

    @property
    def id(self) -> int: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def modality(self) -> str | None: ...
    @property
    def body_part_examined(self) -> str | None: ...
    @property
    def series_description_pattern(self) -> str | None: ...
    @property
    def sop_class_uid(self) -> str | None: ...
    @property
    def calling_ae_title(self) -> str | None: ...
    @property
    def site(self) -> str | None: ...


@lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The rule's pattern, compiled once per process. ``re.error`` for a pattern that does not compile (the API
    refuses those with 422, so a stored rule always compiles)."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise re.error(f"pattern longer than {MAX_PATTERN_LENGTH} characters")
    return re.compile(pattern)


def _same_code(wanted: str | None, actual: str) -> bool:
    """DICOM code strings (CS: modality, body part) compare case-insensitively and without padding."""
    return not wanted or wanted.strip().upper() == actual.strip().upper()


def _same_text(wanted: str | None, actual: str) -> bool:
    """UIDs, AE titles and site names compare exactly (an AE title's trailing padding is not part of it)."""
    return not wanted or wanted.strip() == actual.strip()


def rule_matches(series: SeriesFacts, rule: RuleLike) -> bool:
    """Every criterion the rule sets holds for the series. The series-description pattern is a Python regular
    expression searched anywhere in the description (anchor it with ``^…$``; ``(?i)`` ignores case)."""
    if not rule.enabled or not series.volumetric:
        return False
    if rule.series_description_pattern and not compile_pattern(rule.series_description_pattern).search(
        series.series_description
    ):
        return False
    return (
        _same_code(rule.modality, series.modality)
        and _same_code(rule.body_part_examined, series.body_part_examined)
        and _same_text(rule.sop_class_uid, series.sop_class_uid)
        and _same_text(rule.calling_ae_title, series.calling_ae_title)
        and _same_text(rule.site, series.site)
    )


R = TypeVar("R", bound=RuleLike)


def match_rules(series: SeriesFacts, rules: Iterable[R]) -> list[R]:
    """The rules that apply to ``series``, in rule-ID order (so the requests are created in a stable order).

    A series that is not a volume (ingest flagged it: a localizer, missing slices) matches nothing: there is
    nothing to segment, and a request would only fail.
    """
    return sorted((rule for rule in rules if rule_matches(series, rule)), key=lambda rule: rule.id)


def routed_request_id(rule_id: int, series_instance_uid: str) -> str:
    """The segmentation request a rule makes of a series: the same ID whenever the offer is redelivered (or
    the series re-announced), so at most one request per series and rule. A hash, because a UID may be 64
    characters and request IDs are at most 64."""
    digest = hashlib.sha256(series_instance_uid.encode()).hexdigest()[:32]
    return f"route-{rule_id}-{digest}"


def describe(rule: RuleLike) -> Sequence[str]:
    """The criteria a rule sets, as ``name=value`` (for logs and the CLI)."""
    fields = (
        "modality",
        "body_part_examined",
        "series_description_pattern",
        "sop_class_uid",
        "calling_ae_title",
        "site",
    )
    return [f"{name}={value}" for name in fields if (value := getattr(rule, name))]
