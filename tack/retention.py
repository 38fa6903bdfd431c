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
from .store import Workflow
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
    events = _delete_old_events(cutoff)
    newly = [row.id for row in old.where(Workflow.updated_at > since).order_by(Workflow.id)]
    files = 0
    for workflow_id in newly:
        path = logbook.path(workflow_id)
        if path.exists():
            path.unlink(missing_ok=True)
            files += 1
    store.save_cursor(CURSOR, cutoff)
    return Pruned(len(newly), files, events)


# Events one transaction deletes, and the pause after each: between batches
# the write lock is free, and a writer waiting for it gets it (a lock is not
# fair; taken again at once, it would go to the pruner every time). A first
# prune of a large store held it for seconds in one statement, and every knot
# frame and status write waited.
PRUNE_BATCH = 2000
PRUNE_PAUSE = 0.01  # seconds

# Every event of a workflow final before the cutoff was created before it:
# the scan walks the ``created`` index up to the cutoff. The unary ``+`` keeps
# the planner off the workflow_id index, which it preferred and which walked
# every event of every old workflow, pruned or not (1,000,000: 1.6 s).
_DELETE_OLD_EVENTS = f"""
    DELETE FROM status_event WHERE id IN (
        SELECT id FROM status_event
        WHERE created <= ? AND +workflow_id IN (
            SELECT id FROM workflow
            WHERE status IN ({", ".join("?" for _ in FINAL)}) AND updated_at <= ?)
        LIMIT ?)"""


def _delete_old_events(cutoff: int) -> int:
    """Delete the status events of workflows final before ``cutoff``, a batch
    per transaction; how many."""
    params = (cutoff, *sorted(FINAL), cutoff, PRUNE_BATCH)
    deleted = 0
    while True:
        with store.database.atomic():
            batch = store.database.execute_sql(_DELETE_OLD_EVENTS, params).rowcount
        deleted += batch
        if batch < PRUNE_BATCH:
            return deleted
        time.sleep(PRUNE_PAUSE)


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
