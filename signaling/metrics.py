"""The front door's Prometheus metrics: sessions started and refused, placements, workers.

Served at /metrics in Prometheus' text format by `prometheus_client`, from this app's own
registry plus any others given (the one-process server adds its worker's). Labels are few and
fixed: a refusal's error code, a placement's outcome, a worker's state.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STATES = ("serving", "draining", "degraded")


class FrontDoorMetrics:
    def __init__(self, others: Iterable[CollectorRegistry] = ()) -> None:
        self.registry = CollectorRegistry()
        self._others = list(others)
        registry = self.registry
        self.sessions_started = Counter(
            "lipsync_gateway_sessions_started", "Sessions placed and answered", registry=registry
        )
        self.sessions_refused = Counter(
            "lipsync_gateway_sessions_refused",
            "Offers refused, by error code",
            ["code"],
            registry=registry,
        )
        self.placements = Counter(
            "lipsync_placements",
            "Placement decisions: placed, full (no worker had room), refused by the worker, "
            "unreachable worker",
            ["outcome"],
            registry=registry,
        )
        self.placement_seconds = Histogram(
            "lipsync_placement_seconds",
            "From an offer's arrival to its answer, for placed sessions",
            registry=registry,
        )
        self.workers = Gauge(
            "lipsync_workers", "Live workers, by state", ["state"], registry=registry
        )

    def count_workers(self, states: Iterable[str]) -> None:
        found = list(states)
        for state in STATES:
            self.workers.labels(state).set(found.count(state))

    def text(self) -> bytes:
        return b"".join(generate_latest(r) for r in (self.registry, *self._others))


METRICS = web.AppKey("metrics", FrontDoorMetrics)
CONTENT_TYPE = CONTENT_TYPE_LATEST
