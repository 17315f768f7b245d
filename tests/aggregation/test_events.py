"""Live progress of a federated run: the per-epoch events of the (fake) site workers and the aggregator's round
events, in the run's Redis stream, served as Server-Sent Events by the real aggregation API under uvicorn, and
followed by ``voxelflow runs watch``. Real PostgreSQL, Redis, S3 and aggregator worker process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shared.client import ServerEvent, ServiceClient, parse_sse
from shared.contracts.progress import eta_seconds, site_epochs_left
from tests.aggregation import fake_site_worker as fake
from tests.aggregation.conftest import Api, wait_finished
from tests.aggregation.test_federated_runs import start
from tests.service_harness import serving

pytestmark = pytest.mark.usefixtures("aggregator")


@pytest.fixture(scope="module")
def api_url(aggregation_env: dict[str, str]) -> Iterator[str]:
    """The aggregation API served by uvicorn (streaming responses go over a real socket, as deployed)."""
    from services.aggregation.main import create_app

    with serving(create_app(), "aggregation") as url:
        yield url


def follow(api_url: str, token: str, run_id: str, last_event_id: str | None = None) -> Iterator[ServerEvent]:
    with ServiceClient("aggregation", token=token, url=api_url, timeout=60) as client:
        yield from client.events(f"/federated-runs/{run_id}/events", last_event_id)


def test_eta_is_the_recent_mean_epoch_duration_times_the_epochs_left():
    assert eta_seconds([], 3) is None
    assert eta_seconds([2.0, 4.0], 3) == pytest.approx(9.0)
    assert eta_seconds([100.0, 1, 1, 1, 1, 1], 2) == pytest.approx(2.0)  # only the last five count
    assert eta_seconds([2.0], 0) == 0.0
    # 3 rounds of 4 epochs; after epoch 1 of round 0: 3 more this round, 8 in the two rounds after
    assert site_epochs_left(3, 4, 0, 1) == 11
    assert site_epochs_left(3, 4, 2, 4) == 0


def test_a_run_streams_live_round_and_epoch_events_then_ends(api: Api, api_url, dataset, initial_weights):
    release = threading.Event()
    behaviour = fake.Behaviour(hold={("site-b", 1): release})
    run_id = start(api, dataset, initial_weights, behaviour, rounds=2, local_epochs=2)
    events: list[ServerEvent] = []
    try:
        for event in follow(api_url, api.tokens["researcher"], run_id):
            events.append(event)
            if event.kind == "round_aggregated" and event.data["round"] == 0:
                # round 1 cannot close while site-b is held: this event came live, not from a replay
                assert api.get(run_id)["status"] == "running"
                release.set()
    finally:
        release.set()
    assert wait_finished(api, run_id)["status"] == "succeeded"
    kinds = [(e.kind, e.data.get("round")) for e in events]
    assert kinds[0] == ("round_started", 0) and kinds[-1] == ("run_finished", 2)
    assert events[-1].data["status"] == "succeeded"
    order = [kinds.index(k) for k in (("round_aggregated", 0), ("round_started", 1), ("round_aggregated", 1))]
    assert order == sorted(order)
    epochs = [e.data for e in events if e.kind == "epoch"]
    assert sorted((d["site"], d["round"], d["epoch"]) for d in epochs) == sorted(
        (site, r, epoch) for site in fake.SITES for r in (0, 1) for epoch in (1, 2)
    )
    for d in epochs:
        assert d["epochs"] == 2 and d["loss"] > 0 and d["val_dice"] > 0 and d["seconds"] > 0
        left = site_epochs_left(2, 2, d["round"], d["epoch"])  # every epoch of a site lasts the same here
        assert d["eta_seconds"] == pytest.approx(left * (0.5 + fake.SITE_FACTOR[d["site"]]))
    aggregated = [e.data for e in events if e.kind == "round_aggregated"]
    assert [a["participants"] for a in aggregated] == [3, 3]
    assert all("epsilon" not in a for a in aggregated)  # no privacy: no ε
    ids = [e.id for e in events]
    assert all(ids) and len(set(ids)) == len(ids)

    # a client that reconnects with Last-Event-ID gets exactly what came after it, with the same ETAs
    again = list(follow(api_url, api.tokens["researcher"], run_id, last_event_id=events[4].id))
    assert [(e.id, e.kind, e.data) for e in again] == [(e.id, e.kind, e.data) for e in events[5:]]


def test_a_private_run_reports_epsilon_and_a_failed_run_ends_its_stream(api: Api, api_url, dataset, initial_weights):
    privacy = {"clip_norm": 10.0, "noise_multiplier": 1.0, "delta": 1e-5}
    run_id = start(api, dataset, initial_weights, rounds=2, privacy=privacy)
    events = list(follow(api_url, api.tokens["operator"], run_id))
    run = wait_finished(api, run_id)
    epsilons = [e.data["epsilon"] for e in events if e.kind == "round_aggregated"]
    assert epsilons == pytest.approx([r["epsilon"] for r in run["round_progress"]]) and epsilons[0] < epsilons[1]

    behaviour = fake.Behaviour(fail={(site, None) for site in fake.SITES})
    failed_id = start(api, dataset, initial_weights, behaviour, rounds=2)
    events = list(follow(api_url, api.tokens["researcher"], failed_id))
    assert events[-1].kind == "run_finished" and events[-1].data["status"] == "failed"
    assert "quorum" in events[-1].data["error"]
    assert not any(e.kind == "round_aggregated" for e in events)


def test_events_are_authenticated_and_validated(api: Api, api_url, dataset, initial_weights):
    path = f"{api_url}/federated-runs/fr-0000000000000000/events"
    assert httpx.get(path, timeout=10).status_code == 401
    assert httpx.get(path, headers=api.headers("pacs"), timeout=10).status_code == 403
    missing = httpx.get(path, headers=api.headers(), timeout=10)
    assert missing.status_code == 404 and "no federated run" in missing.text
    bad_id = httpx.get(path, headers={**api.headers(), "Last-Event-ID": "yesterday"}, timeout=10)
    assert bad_id.status_code == 422


def test_the_wire_format_is_server_sent_events(api: Api, api_url, dataset, initial_weights):
    run_id = start(api, dataset, initial_weights, rounds=1)
    with httpx.stream(
        "GET", f"{api_url}/federated-runs/{run_id}/events", headers=api.headers(), timeout=httpx.Timeout(10, read=60)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = list(response.iter_lines())
    events = list(parse_sse(iter(lines)))
    assert events[-1].kind == "run_finished" and events[0].kind == "round_started"
    first = lines.index(next(line for line in lines if line.startswith("id: ")))
    assert lines[first + 1] == "event: round_started" and lines[first + 2].startswith("data: {")


def watch(api_url: str, token: str, run_id: str, monkeypatch: Any, capsys: Any) -> tuple[int, str]:
    from shared.cli import main

    monkeypatch.setenv("VOXELFLOW_AGGREGATION_API_URL", api_url)
    monkeypatch.setenv("VOXELFLOW_TOKEN", token)
    code, message = 0, ""
    try:
        main(["runs", "watch", run_id])
    except SystemExit as exc:  # sys.exit(1) for a failed run, sys.exit(message) for a user error
        code, message = (exc.code, "") if isinstance(exc.code, int) else (1, str(exc.code))
    captured = capsys.readouterr()
    return code, captured.out + captured.err + message


def test_runs_watch_follows_a_run_and_exits_with_its_outcome(
    api: Api, api_url, dataset, initial_weights, monkeypatch, capsys
):
    run_id = start(api, dataset, initial_weights, rounds=2, local_epochs=2)
    code, output = watch(api_url, api.tokens["researcher"], run_id, monkeypatch, capsys)
    assert code == 0, output
    assert "round 0 aggregated" in output and "round 1 aggregated" in output
    assert all(site in output for site in fake.SITES)
    assert f"run {run_id} succeeded" in output

    failing = fake.Behaviour(fail={(site, None) for site in fake.SITES})
    failed_id = start(api, dataset, initial_weights, failing, rounds=1)
    code, output = watch(api_url, api.tokens["researcher"], failed_id, monkeypatch, capsys)
    assert code == 1 and f"run {failed_id} failed" in output and "quorum" in output

    code, output = watch(api_url, api.tokens["researcher"], "fr-0000000000000000", monkeypatch, capsys)
    assert code == 1 and "no federated run" in output
