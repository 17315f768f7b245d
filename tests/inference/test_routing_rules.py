"""Routing-rule matching, a pure function: which rules apply to a completed series."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import pytest

from services.inference.routing import SeriesFacts, compile_pattern, match_rules, routed_request_id, rule_matches

MR_SOP = "1.2.840.10008.5.1.4.1.1.4"
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class Rule:
    id: int
    enabled: bool = True
    modality: str | None = None
    body_part_examined: str | None = None
    series_description_pattern: str | None = None
    sop_class_uid: str | None = None
    calling_ae_title: str | None = None
    site: str | None = None


def with_criterion(criterion: str, value: str) -> Rule:
    changes: dict[str, object] = {criterion: value}
    return replace(Rule(1), **changes)  # type: ignore[arg-type]  # the criterion is one of Rule's str fields


SERIES = SeriesFacts(
    series_instance_uid="2.25.1",
    modality="MR",
    body_part_examined="BRAIN",
    series_description="HCropVolume T1",
    sop_class_uid=MR_SOP,
    calling_ae_title="SCANNER1",
    site="site-a",
)


def test_a_rule_without_criteria_matches_every_volume_and_disabled_rules_none() -> None:
    assert rule_matches(SERIES, Rule(1))
    assert not rule_matches(SERIES, Rule(1, enabled=False))
    assert not rule_matches(replace(SERIES, volumetric=False), Rule(1))


@pytest.mark.parametrize(
    ("criterion", "matching", "other"),
    [
        ("modality", "mr", "CT"),  # code strings: case-insensitive
        ("body_part_examined", "brain ", "CHEST"),
        ("sop_class_uid", MR_SOP, CT_SOP),
        ("calling_ae_title", "SCANNER1", "SCANNER2"),
        ("site", "site-a", "site-b"),
        ("series_description_pattern", r"(?i)hcrop", r"^T1"),
    ],
)
def test_each_criterion_alone_decides(criterion: str, matching: str, other: str) -> None:
    assert rule_matches(SERIES, with_criterion(criterion, matching))
    assert not rule_matches(SERIES, with_criterion(criterion, other))
    # an empty criterion is "any", not "empty value"
    assert rule_matches(SERIES, with_criterion(criterion, ""))


def test_every_criterion_must_hold() -> None:
    rule = Rule(1, modality="MR", body_part_examined="BRAIN", series_description_pattern="HCrop", site="site-a")
    assert rule_matches(SERIES, rule)
    assert not rule_matches(replace(SERIES, site="site-b"), rule)
    assert not rule_matches(replace(SERIES, body_part_examined=""), rule)  # a missing value is not a match
    assert not rule_matches(replace(SERIES, series_description="T2 axial"), rule)


def test_all_matching_rules_apply_in_id_order() -> None:
    rules = [Rule(7, modality="MR"), Rule(3), Rule(5, modality="CT"), Rule(2, enabled=False), Rule(4, site="site-a")]
    assert [r.id for r in match_rules(SERIES, rules)] == [3, 4, 7]
    assert match_rules(replace(SERIES, modality="US", site="x"), rules) == [Rule(3)]
    assert match_rules(SERIES, []) == []


def test_pattern_is_searched_not_fully_matched_and_bad_patterns_raise() -> None:
    assert rule_matches(SERIES, Rule(1, series_description_pattern="Volume"))
    assert not rule_matches(SERIES, Rule(1, series_description_pattern="^Volume$"))
    with pytest.raises(re.error):
        compile_pattern("(unclosed")
    with pytest.raises(re.error):
        compile_pattern("a" * 257)


def test_routed_request_id_is_stable_per_rule_and_series_and_a_valid_request_id() -> None:
    uid = "1.2.826.0.1.3680043.8.498." + "1" * 38  # 64 characters
    first = routed_request_id(3, uid)
    assert first == routed_request_id(3, uid)
    assert first != routed_request_id(4, uid) and first != routed_request_id(3, uid[:-1] + "2")
    assert re.fullmatch(r"^[A-Za-z0-9_.-]{8,64}$", first)
