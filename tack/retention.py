"""Retention: what a finished workflow leaves behind does not grow forever.

Once a workflow has been final for ``TACK_RETENTION_DAYS``, its log file and
its status events go; its pipeline and workflow rows stay, so the XRPC
queries still answer (with the final status) and nothing is run again. The
service prunes once a day; ``tack prune`` does it on demand, on the same
database, beside a running tack.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from . import logs, store
from .statuses import FINAL
from .store import StatusEvent, Workflow
from .worklogs import LogBook

log = logs.get("retention")

DAY_NS = 86_400 * 1_000_000_000
PRUNE_EVERY = 86_400.0  # seconds
FIRST_PRUNE_AFTER = 60.0  # after start, once the rest is up
# Workflows final before this time (unix ns) were pruned already.
CURSOR = "retention"


@dataclass(frozen=True)
class Pruned:
    workflows: int
    log_files: int
    status_events: int


def prune(logbook: LogBook, days: float, now_ns: int | None = None) -> Pruned:
    """Delete the logs and status events of workflows final for ``days``."""
    if days <= 0:
        return Pruned(0, 0, 0)
    cutoff = (now_ns or time.time_ns()) - int(days * DAY_NS)
    since = store.get_cursor(CURSOR) or 0
    old = Workflow.select(Workflow.id).where(
        Workflow.status.in_(sorted(FINAL)) & (Workflow.updated_at <= cutoff)
    )
    # Every event of such a workflow was created before it was final: the
    # ``created`` index bounds the scan.
    events = (
        StatusEvent.delete()
        .where((StatusEvent.created <= cutoff) & StatusEvent.workflow_id.in_(old))
        .execute()
    )
    newly = [row.id for row in old.where(Workflow.updated_at > since).order_by(Workflow.id)]
    files = 0
    for workflow_id in newly:
        path = logbook.path(workflow_id)
        if path.exists():
            path.unlink(missing_ok=True)
            files += 1
    store.save_cursor(CURSOR, cutoff)
    return Pruned(len(newly), files, events)


class Pruner:
    """The service's daily prune, on a thread of its own."""

    def __init__(self, logbook: LogBook, days: float, stop: threading.Event) -> None:
        self._logbook = logbook
        self._days = days
        self._stop = stop
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> None:
        if self._days > 0:
            self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = FIRST_PRUNE_AFTER
        while not self._stop.wait(delay):
            delay = PRUNE_EVERY
            try:
                done = prune(self._logbook, self._days)
                log.info("pruned", extra=vars(done) | {"retention_days": self._days})
            except Exception:
                # Retention is housekeeping: a failure waits for the next day.
                log.exception("prune failed")
            finally:
                store.release_connection()
