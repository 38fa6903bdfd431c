"""Endpoints for the operator: ``/healthz`` and ``/metrics``.

``/healthz`` answers 200 when every check passes and 503 naming the failing
ones, as JSON with each check's figures, for load balancers and monitors.
``/metrics`` is Prometheus' text format (``tack.metrics``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from ..metrics import CONTENT_TYPE, Metrics
from .server import Handler

# How long the database may stay locked before /healthz says so.
DATABASE_WAIT = 1.0


@dataclass
class Probes:
    """Readers of the running service's state, for the checks."""

    db_path: str
    jetstream: Callable[[], tuple[bool, float | None]]  # connected, seconds since last frame
    knots: Callable[[], tuple[int, int, int]]  # followed, connected, connections made
    workers: Callable[[], tuple[int, int]]  # busy, total
    queued: Callable[[], int]


class Operator:
    def __init__(self, probes: Probes, metrics: Metrics) -> None:
        self._probes = probes
        self._metrics = metrics

    def routes(self) -> dict[str, Callable[[Handler, dict], None]]:
        return {"/healthz": self.healthz, "/metrics": self.metrics}

    def metrics(self, handler: Handler, query: dict) -> None:
        handler.send_body(HTTPStatus.OK, self._metrics.exposition(), CONTENT_TYPE)

    def healthz(self, handler: Handler, query: dict) -> None:
        checks = {
            "database": self._database(),
            "jetstream": self._jetstream(),
            "knots": self._knots(),
            "workers": self._workers(),
        }
        failing = sorted(name for name, check in checks.items() if not check["ok"])
        status = HTTPStatus.SERVICE_UNAVAILABLE if failing else HTTPStatus.OK
        body = {"status": "failing" if failing else "ok", "failing": failing, "checks": checks}
        handler.send_json(status, body, {"Cache-Control": "no-store"})

    def _database(self) -> dict[str, Any]:
        """Writable means a write transaction can begin within DATABASE_WAIT;
        it is rolled back at once."""
        started = time.monotonic()
        try:
            conn = sqlite3.connect(self._probes.db_path, timeout=DATABASE_WAIT)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return {"ok": False, "error": f"not writable: {exc}"}
        return {"ok": True, "write_ms": round((time.monotonic() - started) * 1000, 1)}

    def _jetstream(self) -> dict[str, Any]:
        connected, age = self._probes.jetstream()
        check: dict[str, Any] = {"ok": connected, "connected": connected}
        check["last_event_age_s"] = None if age is None else round(age, 1)
        if not connected:
            check["error"] = "not connected to jetstream"
        return check

    def _knots(self) -> dict[str, Any]:
        followed, connected, _ = self._probes.knots()
        # Knots come and go (a knot down is its owners' problem): figures only.
        return {"ok": True, "followed": followed, "connected": connected}

    def _workers(self) -> dict[str, Any]:
        busy, total = self._probes.workers()
        return {"ok": True, "busy": busy, "total": total, "queued": self._probes.queued()}
