"""``/metrics`` after a small run: every counter moves by exactly what the run did.

The run: a root node fans out to three children; one child succeeds, one errors
(and gets a retry, which errors again and is out of retries), one is pruned.
Time is moved forward through the server's clock (never by sleeping) so the
delayed retry becomes claimable, which the backlog gauge must notice. The same
trick makes a lease run out and an hourly cron come due, for the counters that
the background loops move.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sm_api import Api, expect_error, node, template_node
from sm_support import RunningServer
from state_manager.services import runs, states
from state_manager.services.context import Context, now_ms

NS = "ops-metrics"
RETRY_DELAY_MS = 60_000
NS_ROUTE = "/v0/namespace/{namespace_name}"
REFERENCE = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"

Labels = frozenset[tuple[str, str]]


class Scrape:
    """One parsed exposition: sample value by (sample name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, Labels], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name`` with exactly ``labels`` (0 if absent, as Prometheus reads it)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def matching(self, name: str, **labels: str) -> dict[Labels, float]:
        """Every sample ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return {
            key: value
            for (sample, key), value in self.samples.items()
            if sample == name and wanted <= key
        }


async def scrape(client: httpx.AsyncClient) -> Scrape:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    return Scrape(r.text)


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def gauge(result: Scrape, name: str) -> dict[tuple[str, ...], float]:
    """The gauge ``name`` for our namespace, keyed by its other label values (zeros dropped)."""
    out: dict[tuple[str, ...], float] = {}
    for key, value in result.matching(name, namespace=NS).items():
        rest = tuple(v for k, v in sorted(key) if k != "namespace")
        if value:
            out[rest] = value
    return out


def context_of(server: RunningServer) -> Context:
    app = server.server.config.app
    assert isinstance(app, FastAPI)
    context: Context = app.state.context
    return context


def shift_clock(server: RunningServer, by_ms: int) -> None:
    """Move the server's notion of now forward by ``by_ms`` (every service reads ``ctx.clock``)."""
    context_of(server).clock = lambda: now_ms() + by_ms


async def on_server_loop[T](server: RunningServer, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` on the event loop of the server's thread and wait for its result."""
    loop = server.server.servers[0].get_loop()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))


async def test_counters_and_gauges_move_by_what_the_run_did(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    api = Api(client, NS)
    await api.register(node("A", outputs=("y",)), node("B", inputs=("z",)))
    await api.create_graph(
        "g",
        {
            "nodes": [
                template_node("A", "a", NS, {}, ["b"]),
                template_node("B", "b", NS, {"z": "${{ a.outputs.y }}"}),
            ],
            "retry_policy": {
                "max_retries": 1,
                "strategy": "FIXED",
                "backoff_factor": RETRY_DELAY_MS,
            },
        },
    )
    s0 = await scrape(client)
    assert gauge(s0, "exosphere_states") == {}

    # Fan-out: A's one report with three outputs makes three B states.
    await api.trigger("g")
    a = await api.claim_one("A")
    await api.executed(a["state_id"], {"y": "1"}, {"y": "2"}, {"y": "3"})
    s1 = await scrape(client)
    assert gauge(s1, "exosphere_claimable_backlog") == {("B",): 3}
    # Only states waiting or claimed are sampled; finished ones are counted by reports.
    assert gauge(s1, "exosphere_states") == {("B", "CREATED"): 3}

    # One B succeeds, one errors (a retry is scheduled a minute out), one is pruned.
    b1, b2, b3 = (s["state_id"] for s in await api.claim("B", batch_size=3))
    await api.executed(b1)
    assert (await api.errored(b2, "first failure"))["retry_created"] is True
    r = await api.post_state(b3, "prune", {"data": {"why": "not needed"}})
    assert r.status_code == 200, r.text
    # Rejected reports and requests are not counted as reports or runs.
    expect_error(await api.post_state(b1, "errored", {"error": "late"}), 400)
    async with httpx.AsyncClient(base_url=server.base_url) as anonymous:
        expect_error(await anonymous.post(f"{api.base}/graph/g/trigger", json={}), 401)
        expect_error(await anonymous.get("/no/such/path"), 404)
    assert await api.claim("B") == []  # the retry is not due yet
    s2 = await scrape(client)
    assert gauge(s2, "exosphere_claimable_backlog") == {}
    assert gauge(s2, "exosphere_states") == {("B", "CREATED"): 1}

    # A minute later the retry is claimable; it fails again and is out of retries.
    shift_clock(server, RETRY_DELAY_MS + 1_000)
    s3 = await scrape(client)
    assert gauge(s3, "exosphere_claimable_backlog") == {("B",): 1}
    retry = await api.claim_one("B")
    assert (await api.errored(retry["state_id"], "second failure"))["retry_created"] is False
    s4 = await scrape(client)
    assert gauge(s4, "exosphere_claimable_backlog") == {}
    assert gauge(s4, "exosphere_states") == {}

    def moved(name: str, **labels: str) -> float:
        return delta(s0, s4, name, **labels)

    assert moved("exosphere_runs_triggered_total", namespace=NS, graph="g", source="api") == 1
    assert moved("exosphere_runs_triggered_total", namespace=NS, graph="g", source="cron") == 0
    assert moved("exosphere_states_claimed_total", namespace=NS, node="A") == 1
    assert moved("exosphere_states_claimed_total", namespace=NS, node="B") == 4
    reports = "exosphere_state_reports_total"
    assert moved(reports, namespace=NS, node="A", outcome="executed") == 1
    assert moved(reports, namespace=NS, node="B", outcome="executed") == 1
    assert moved(reports, namespace=NS, node="B", outcome="errored") == 2
    assert moved(reports, namespace=NS, node="B", outcome="pruned") == 1
    assert sum(s4.matching(reports, namespace=NS).values()) == 5
    assert moved("exosphere_state_retries_total", namespace=NS, node="B") == 1
    assert moved("exosphere_state_retries_total", namespace=NS, node="A") == 0
    assert s4.matching("exosphere_lease_expiries_total") == {}

    transition = "exosphere_state_claim_to_report_seconds"
    assert moved(f"{transition}_count", namespace=NS, node="A") == 1
    assert moved(f"{transition}_count", namespace=NS, node="B") == 4
    # Every observation lands in the +Inf bucket; no report took negative time.
    assert moved(f"{transition}_bucket", namespace=NS, node="B", le="+Inf") == 4
    assert s4.value(f"{transition}_sum", namespace=NS, node="B") >= 0

    # Every operation that reached the committer (refused ones too) was in some batch.
    assert moved("exosphere_commit_batch_operations_sum") == 11
    assert 1 <= moved("exosphere_commit_batch_operations_count") <= 11

    http = "exosphere_http_request_duration_seconds_count"
    expected_requests = {
        ("POST", f"{NS_ROUTE}/graph/{{graph_name}}/trigger", "200"): 1,
        ("POST", f"{NS_ROUTE}/graph/{{graph_name}}/trigger", "401"): 1,
        ("POST", f"{NS_ROUTE}/states/enqueue", "200"): 4,
        ("POST", f"{NS_ROUTE}/state/{{state_id}}/executed", "200"): 2,
        ("POST", f"{NS_ROUTE}/state/{{state_id}}/errored", "200"): 2,
        ("POST", f"{NS_ROUTE}/state/{{state_id}}/errored", "400"): 1,
        ("POST", f"{NS_ROUTE}/state/{{state_id}}/prune", "200"): 1,
        ("GET", "unmatched", "404"): 1,
        # Each scrape is recorded once its response has gone out: s0..s3 are in s4.
        ("GET", "/metrics", "200"): 4,
    }
    for (method, route, status), count in expected_requests.items():
        got = moved(http, method=method, route=route, status=status)
        assert got == count, (method, route, status, got, s4.matching(http))
    # Routes are templates, never raw paths (ids in label values would explode cardinality).
    routes = {dict(key)["route"] for key in s4.matching(http)}
    assert not any(a["state_id"] in route or NS in route for route in routes), routes


async def test_every_metric_family_is_exported_with_conventional_names(
    client: httpx.AsyncClient,
) -> None:
    result = await scrape(client)
    expected = {
        "exosphere_states": "gauge",
        "exosphere_claimable_backlog": "gauge",
        "exosphere_database_up": "gauge",
        "exosphere_states_claimed": "counter",
        "exosphere_state_reports": "counter",
        "exosphere_state_retries": "counter",
        "exosphere_lease_expiries": "counter",
        "exosphere_runs_triggered": "counter",
        "exosphere_cron_fires": "counter",
        "exosphere_state_claim_to_report_seconds": "histogram",
        "exosphere_http_request_duration_seconds": "histogram",
        "exosphere_commit_batch_operations": "histogram",
    }
    assert {name: result.types.get(name) for name in expected} == expected
    exported = {
        f"{name}_total" if kind == "counter" else name
        for name, kind in result.types.items()
        if name.startswith("exosphere_")
    }
    # The configuration reference lists exactly the metrics the server exports.
    documented = set(re.findall(r"^\| `(exosphere_\w+)` \|", REFERENCE.read_text(), re.M))
    assert documented == exported


async def test_lease_expiries_and_cron_fires_are_counted(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    """The background loops' counters: a lease runs out and an hourly cron comes due."""
    api = Api(client, NS)
    await api.register(node("A"))
    await api.create_graph("leased", {"nodes": [template_node("A", "a", NS)]})
    await api.create_graph(
        "hourly",
        {
            "nodes": [template_node("A", "a", NS)],
            "triggers": [{"type": "CRON", "value": {"expression": "0 * * * *"}}],
        },
    )
    run_id = await api.trigger("leased")
    claimed = await api.claim_one("A")
    s0 = await scrape(client)

    # Jump to half past the hour after next: the cron's first time (the next full hour) has
    # passed, its following one is half an hour away, and the claim's one-hour lease is over.
    hour = 3_600_000
    now = now_ms()
    shift_clock(server, (now // hour + 2) * hour + hour // 2 - now)

    def fired(result: Scrape) -> bool:
        expired = result.value("exosphere_lease_expiries_total", namespace=NS, node="A")
        return expired > 0 and result.value("exosphere_cron_fires_total", outcome="triggered") > 0

    # The background loops would get there within seconds; run their steps now instead
    # (on the server's event loop; whichever runs first does the work, exactly once).
    context = context_of(server)
    await on_server_loop(server, states.expire_leases(context))
    await on_server_loop(server, runs.fire_due_trigger(context))
    s1 = await scrape(client)
    for _ in range(200):  # the loops run every few seconds; wait for both, but not forever
        if fired(s1):
            break
        await asyncio.sleep(0.1)
        s1 = await scrape(client)
    assert fired(s1), s1.text

    def moved(name: str, **labels: str) -> float:
        return delta(s0, s1, name, **labels)

    assert moved("exosphere_lease_expiries_total", namespace=NS, node="A") == 1
    assert moved("exosphere_cron_fires_total", outcome="triggered") == 1
    assert moved("exosphere_cron_fires_total", outcome="failed") == 0
    assert moved("exosphere_runs_triggered_total", namespace=NS, graph="hourly", source="cron") == 1
    assert moved("exosphere_runs_triggered_total", namespace=NS, graph="hourly", source="api") == 0
    # An expired lease is a failed attempt: a retry is scheduled, but nothing was reported.
    assert moved("exosphere_state_retries_total", namespace=NS, node="A") == 1
    assert sum(s1.matching("exosphere_state_reports_total", namespace=NS).values()) == 0
    details = await api.node_details("leased", run_id, claimed["state_id"])
    assert details["status"] == "RETRY_CREATED", details
