"""Prometheus metrics, kept in a registry per application (so tests can run several)."""

from __future__ import annotations

from typing import cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)


class Metrics:
    """Every metric the state manager exports. Counters move after their transaction commits."""

    def __init__(self) -> None:
        # No *_created series: they double what a scrape carries and nothing here reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self._children: dict[tuple[int, tuple[str, ...]], Counter | Histogram] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.states_claimed = Counter(
            "exosphere_states_claimed_total",
            "States handed to workers by enqueue.",
            ["namespace", "node"],
            registry=r,
        )
        self.reports = Counter(
            "exosphere_state_reports_total",
            "Reports accepted from workers, by outcome (executed, errored, pruned, requeued).",
            ["namespace", "node", "outcome"],
            registry=r,
        )
        self.transition_seconds = Histogram(
            "exosphere_state_claim_to_report_seconds",
            "Time from a state's claim to the report that ended it.",
            ["namespace", "node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "exosphere_state_retries_total",
            "Retry states created by the retry policy.",
            ["namespace", "node"],
            registry=r,
        )
        self.lease_expiries = Counter(
            "exosphere_lease_expiries_total",
            "Claimed states taken back because their lease ran out.",
            ["namespace", "node"],
            registry=r,
        )
        self.runs_triggered = Counter(
            "exosphere_runs_triggered_total",
            "Runs created, by source (api or cron).",
            ["namespace", "graph", "source"],
            registry=r,
        )
        self.runs_deleted = Counter(
            "exosphere_runs_deleted_total",
            "Finished runs deleted, with all their states, by retention.",
            registry=r,
        )
        self.cron_fires = Counter(
            "exosphere_cron_fires_total",
            "Cron trigger records fired, by outcome (triggered or failed).",
            ["outcome"],
            registry=r,
        )
        self.batch_operations = Histogram(
            "exosphere_commit_batch_operations",
            "Operations (reports, claims, triggers...) applied per committed transaction.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.http_seconds = Histogram(
            "exosphere_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.states = Gauge(
            "exosphere_states",
            "States waiting (CREATED) or claimed (QUEUED), by namespace, node and status "
            "(sampled at scrape time; finished states: exosphere_state_reports_total).",
            ["namespace", "node", "status"],
            registry=r,
        )
        self.backlog = Gauge(
            "exosphere_claimable_backlog",
            "States claimable now, by namespace and node (sampled at scrape time).",
            ["namespace", "node"],
            registry=r,
        )
        self.database_up = Gauge(
            "exosphere_database_up",
            "1 if the last scrape could read state counts from the database, else 0.",
            registry=r,
        )

    def child[M: (Counter, Histogram)](self, metric: M, *values: str) -> M:
        """``metric.labels(*values)``, looked up once per label set (the hot paths ask for
        the same few children over and over)."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return cast(M, found)

    def render(self) -> bytes:
        return generate_latest(self.registry)
