"""Workflow statuses: the append-only event log behind ``/events``.

Invariants this module keeps (design invariants 4 and 5):

- each event has its own TID rkey and a ``created`` (unix ns) strictly greater
  than every earlier one, even across restarts and wall-clock steps back;
- events become visible in ``created`` order: allocation and commit happen
  under one lock, so no subscriber can see event N+1 before event N exists
  (which would make it skip N when it resumes from N+1's cursor);
- a workflow moves pending -> running -> one final status; anything else,
  and anything after a final status, is refused.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import peewee

from . import logs, tid
from .store import StatusEvent, Workflow, pipeline_uri

log = logs.get("statuses")

NSID = "sh.tangled.pipeline.status"
# NEW is tack's own: a workflow row written but not yet announced; its first
# event (pending, or failed when it cannot run) commits in the same transaction.
NEW, PENDING, RUNNING = "new", "pending", "running"
FINAL = frozenset({"success", "failed", "timeout", "cancelled"})
ALL = frozenset({PENDING, RUNNING}) | FINAL
_RANK = {NEW: -1, PENDING: 0, RUNNING: 1, **dict.fromkeys(FINAL, 2)}


def rfc3339(ns: int) -> str:
    moment = datetime.fromtimestamp(ns / 1e9, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}Z"


class StatusLog:
    def __init__(self, db: peewee.Database) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._clock_id = random.randrange(1024)
        last = StatusEvent.select(peewee.fn.MAX(StatusEvent.created)).scalar()
        self._last_created = last or 0
        self.latest_id = StatusEvent.select(peewee.fn.MAX(StatusEvent.id)).scalar() or 0

    # --- writing ------------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[StatusLog]:
        """One transaction in which ``append`` may be called; subscribers wake after commit.

        Callers retry the whole block on transient errors, so it must hold
        every write that belongs with the statuses (pipeline rows, workflows).
        """
        with self._lock:
            with self._db.atomic():
                yield self
            self.latest_id = StatusEvent.select(peewee.fn.MAX(StatusEvent.id)).scalar() or 0
        with self._changed:
            self._changed.notify_all()

    def append(
        self,
        workflow: Workflow,
        status: str,
        error: str | None = None,
        exit_code: int | None = None,
    ) -> bool:
        """Record ``status`` for ``workflow`` (inside ``writing``); False if refused."""
        if status not in ALL:
            raise ValueError(f"unknown status {status!r}")
        current = Workflow.get_by_id(workflow.id).status
        if current in FINAL or _RANK[status] <= _RANK[current]:
            return False  # final is final; no going back; repeats change nothing
        created = self._next_created()
        Workflow.update(status=status, error=error, exit_code=exit_code, updated_at=created).where(
            Workflow.id == workflow.id
        ).execute()
        rkey = tid.encode(created // 1000, self._clock_id)
        event: dict = {
            "$type": NSID,
            "pipeline": pipeline_uri(workflow.knot, workflow.rkey),
            "workflow": workflow.name,
            "status": status,
            "createdAt": rfc3339(created),
        }
        if error is not None:
            event["error"] = error
        if exit_code is not None:
            event["exitCode"] = exit_code
        frame = json.dumps({"rkey": rkey, "nsid": NSID, "event": event}, separators=(",", ":"))
        StatusEvent.create(
            rkey=rkey, created=created, workflow_id=workflow.id, status=status, frame=frame
        )
        workflow.status = status
        log.info(
            "workflow status",
            extra={
                "knot": workflow.knot,
                "rkey": workflow.rkey,
                "workflow": workflow.name,
                "status": status,
                "error": error,
                "exit_code": exit_code,
            },
        )
        return True

    def _next_created(self) -> int:
        # Whole microseconds apart, so the TID (microsecond resolution) made
        # from it is unique and sorts the same way.
        now = time.time_ns() // 1000 * 1000
        self._last_created = max(now, self._last_created + 1000)
        return self._last_created

    # --- reading ------------------------------------------------------------------

    def first_id_after(self, cursor_ns: int) -> int:
        """The id after which events newer than ``cursor_ns`` start."""
        last = (
            StatusEvent.select(peewee.fn.MAX(StatusEvent.id))
            .where(StatusEvent.created <= cursor_ns)
            .scalar()
        )
        return last or 0

    def frames_after(self, after_id: int, limit: int = 500) -> list[tuple[int, str]]:
        query = (
            StatusEvent.select(StatusEvent.id, StatusEvent.frame)
            .where(StatusEvent.id > after_id)
            .order_by(StatusEvent.id)
            .limit(limit)
        )
        return [(row.id, row.frame) for row in query]

    def wait_beyond(self, after_id: int, timeout: float) -> bool:
        """Block until an event newer than ``after_id`` exists, or ``timeout``."""
        with self._changed:
            return self._changed.wait_for(lambda: self.latest_id > after_id, timeout)
