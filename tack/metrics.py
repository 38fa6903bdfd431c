"""What tack exposes on ``GET /metrics``, in Prometheus' text format.

Made with ``prometheus_client``, in a registry of tack's own. Two kinds:

- events counted where they happen (``Metrics``' counters and histogram):
  pipelines accepted and rejected, workflows finished and how long they
  ran, HTTP requests;
- state read when Prometheus scrapes (``StateCollector``): jetstream events
  applied and skipped and the cursor's lag, knot streams and their
  connections, running and queued workflows, subscribers. Counting these
  again on every hot path would cost ingest for nothing: the counts exist.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Rejections by kind: the messages themselves name knots and keys, which
# would make a label of unbounded values.
REJECTION_KINDS = (
    ("not_member", ("not the spindle owner or a member",)),
    ("not_served", ("no served repo", "no repo record", "not a served repo")),
    ("wrong_knot", ("lives on knot", "came from", "belongs to another owner", "not the author")),
)


def rejection_kind(reason: str) -> str:
    for kind, phrases in REJECTION_KINDS:
        if any(phrase in reason for phrase in phrases):
            return kind
    return "invalid"


@dataclass
class State:
    """Readers of the running service's state, for ``StateCollector``."""

    jetstream_applied: Callable[[], int]
    jetstream_skipped: Callable[[], int]
    jetstream_cursor_us: Callable[[], int | None]
    knot_streams: Callable[[], tuple[int, int, int]]  # followed, connected, connections made
    workflows: Callable[[], tuple[int, int]]  # running, queued
    subscribers: Callable[[], tuple[int, int]]  # /events, log streams


class StateCollector:
    def __init__(self, state: State) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state
        yield _counter(
            "tack_jetstream_events_applied", "Jetstream records written", state.jetstream_applied()
        )
        yield _counter(
            "tack_jetstream_events_skipped",
            "Jetstream frames skipped as bad records",
            state.jetstream_skipped(),
        )
        cursor = state.jetstream_cursor_us()
        lag = max(time.time() - cursor / 1e6, 0.0) if cursor else float("nan")
        yield _gauge("tack_jetstream_lag_seconds", "Age of the last jetstream event applied", lag)
        followed, connected, connections = state.knot_streams()
        yield _gauge("tack_knots_followed", "Knot event streams tack follows", followed)
        yield _gauge("tack_knots_connected", "Knot event streams connected now", connected)
        yield _counter(
            "tack_knot_connections", "Knot stream connections made (reconnects included)",
            connections,
        )  # fmt: skip
        running, queued = state.workflows()
        yield _gauge("tack_workflows_running", "Workflows running in this process", running)
        yield _gauge("tack_workflows_queued", "Workflows waiting for a worker", queued)
        events, logs = state.subscribers()
        yield _gauge("tack_events_subscribers", "Subscribers of /events", events)
        yield _gauge("tack_log_subscribers", "Open log streams (/logs and the XRPC one)", logs)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class Metrics:
    """tack's registry: the counted events, and the state collector once set."""

    def __init__(self) -> None:
        # No ``_created`` series beside each counter: tack restarts are
        # visible in the counters resetting, and they doubled the page.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.pipelines_accepted = Counter(
            "tack_pipelines_accepted", "Pipelines accepted", registry=self.registry
        )
        self.pipelines_rejected = Counter(
            "tack_pipelines_rejected",
            "Knot events and requests refused, by kind",
            ["reason"],
            registry=self.registry,
        )
        self.workflows_finished = Counter(
            "tack_workflows_finished",
            "Workflows ended, by final status",
            ["status"],
            registry=self.registry,
        )
        self.workflow_seconds = Histogram(
            "tack_workflow_duration_seconds",
            "Time from a workflow's start on a worker to its final status",
            ["backend"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf")),
            registry=self.registry,
        )
        self.http_requests = Counter(
            "tack_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )

    def watch(self, state: State) -> None:
        self.registry.register(StateCollector(state))

    def rejected(self, reason: str) -> None:
        self.pipelines_rejected.labels(rejection_kind(reason)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
