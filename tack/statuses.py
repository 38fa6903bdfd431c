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

import bisect
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import peewee

from . import logs, tid
from .store import StatusEvent, Workflow, compile_once, pipeline_uri

log = logs.get("statuses")

NSID = "sh.tangled.pipeline.status"
PIPELINE_NSID = "sh.tangled.pipeline"
# NEW is tack's own: the row of a workflow that cannot run, written just
# before its ``failed`` in the same transaction. One that can run is written
# pending, with its ``pending`` event (``announce_queued``).
NEW, PENDING, RUNNING = "new", "pending", "running"
FINAL = frozenset({"success", "failed", "timeout", "cancelled"})
ALL = frozenset({PENDING, RUNNING}) | FINAL
_RANK = {NEW: -1, PENDING: 0, RUNNING: 1, **dict.fromkeys(FINAL, 2)}
# The statuses a workflow may be in for a move to each status to be allowed.
_MAY_FOLLOW = {
    status: [before for before in (NEW, PENDING, RUNNING) if _RANK[before] < _RANK[status]]
    for status in ALL
}


def _moment_column(status: str) -> dict:
    """The workflow column a status stamps: when it started or finished."""
    if status == RUNNING:
        return {"started_at": 0}
    return {"finished_at": 0} if status in FINAL else {}


_ADVANCE = {
    status: compile_once(
        lambda status=status: Workflow.update(
            status=status, error="", exit_code=0, updated_at=0, **_moment_column(status)
        ).where((Workflow.id == 0) & Workflow.status.in_(_MAY_FOLLOW[status]))
    )
    for status in ALL
}
# CAST hands the frame over as the bytes stored, where TEXT would be decoded.
_FRAMES_AFTER_SQL = (
    "SELECT id, CAST(frame AS BLOB) FROM status_event WHERE id > ? ORDER BY id LIMIT ?"
)
_INSERT_EVENT = compile_once(
    lambda: StatusEvent.insert(rkey="", created=0, workflow_id=0, status="", frame="")
)


def rfc3339(ns: int) -> str:
    """``ns`` (unix nanoseconds) as RFC 3339 UTC with microseconds. Called for
    every status and log line: the part up to the second is made once per
    second, not per call."""
    global _second_prefix
    seconds, fraction = divmod(ns, 1_000_000_000)
    cached_seconds, prefix = _second_prefix  # one tuple: replaced whole, read whole
    if seconds != cached_seconds:
        prefix = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second_prefix = (seconds, prefix)
    return f"{prefix}{fraction // 1000:06d}Z"


_second_prefix: tuple[int | None, str] = (None, "")


# How many of the newest events are kept in memory, already encoded for the
# wire: live subscribers read them without touching SQLite, so a hundred
# subscribers cost the producer nothing. Older backfill comes from the store.
RECENT_EVENTS = 20_000


class StatusLog:
    def __init__(
        self,
        db: peewee.Database,
        encode: Callable[[bytes], bytes] = bytes,
        on_final: Callable[[int], None] = lambda workflow_id: None,
    ) -> None:
        """``encode`` makes an event's UTF-8 JSON what subscribers are sent
        (a websocket text frame). ``on_final(workflow_id)`` runs after a
        final status commits (log followers of that workflow wake to drain
        and close)."""
        self._db = db
        self._encode = encode
        self._on_final = on_final
        # Run by the committing thread right after each commit that added
        # events, outside the lock (the server sends them to live subscribers).
        self.after_commit: Callable[[], None] = lambda: None
        # (workflow id, log line fields) of each status written, for after commit.
        self._said: list[tuple[int, dict]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._clock_id = random.randrange(1024)
        last = StatusEvent.select(peewee.fn.MAX(StatusEvent.created)).scalar()
        self._last_created = last or 0
        self.latest_id = StatusEvent.select(peewee.fn.MAX(StatusEvent.id)).scalar() or 0
        self._uncommitted: list[tuple[int, bytes]] = []
        self._nudged = False
        # Parallel lists, ascending ids, only touched under _changed.
        self._recent_ids: list[int] = []
        self._recent_frames: list[bytes] = []

    # --- writing ------------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[StatusLog]:
        """One transaction in which ``append`` may be called; subscribers wake after commit.

        Callers retry the whole block on transient errors, so it must hold
        every write that belongs with the statuses (pipeline rows, workflows).
        """
        with self._lock:
            self._uncommitted, self._said = [], []
            try:
                with self._db.atomic():
                    yield self
            except BaseException:
                self._uncommitted, self._said = [], []
                raise
            published = bool(self._uncommitted)
            if published:
                self._publish(self._uncommitted)
            said = self._said
        if published:
            try:
                self.after_commit()
            except Exception:
                # Committed is committed: the broadcaster thread sends them.
                log.exception("events not sent by the committing thread")
            # Woken only now, after the direct sends: woken at publish, it
            # took the interpreter lock from the sending thread, on the path
            # of a pipeline's ``pending``. It looks at latest_id before it
            # waits, so a wake-up that comes late is never lost.
            with self._changed:
                self._changed.notify_all()
        # Outside the lock, which every status write of every worker waits
        # for: waking log followers and writing log lines take longer than
        # the transaction itself.
        for workflow_id, fields in said:
            if fields["status"] in FINAL:
                self._on_final(workflow_id)
        # A pending workflow was already named by "pipeline accepted": at
        # info only what happened to it since, a line fewer per workflow.
        for _, fields in said:
            level = logging.DEBUG if fields["status"] == PENDING else logging.INFO
            log.log(level, "workflow status", extra=fields)

    def _publish(self, events: list[tuple[int, bytes]]) -> None:
        with self._changed:
            self._recent_ids.extend(event_id for event_id, _ in events)
            self._recent_frames.extend(frame for _, frame in events)
            if len(self._recent_ids) > 2 * RECENT_EVENTS:  # trimmed now and then, not per commit
                del self._recent_ids[:-RECENT_EVENTS]
                del self._recent_frames[:-RECENT_EVENTS]
            self.latest_id = self._recent_ids[-1]

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
        created = self._next_created()
        moments = (created,) * len(_moment_column(status))
        # The guard in the WHERE clause is the transition rule: final is
        # final, no going back, and a repeat changes nothing.
        moved = self._db.execute_sql(
            _ADVANCE[status](),
            (status, error, exit_code, created, *moments, workflow.id, *_MAY_FOLLOW[status]),
        ).rowcount
        if not moved:
            return False
        self._add_event(workflow, status, created, error, exit_code)
        return True

    def announce_queued(self, workflow: Workflow) -> None:
        """The ``pending`` event of a workflow written as pending in this very
        transaction (inside ``writing``): no transition to check or make."""
        self._add_event(workflow, PENDING, self._next_created())

    def _add_event(
        self,
        workflow: Workflow,
        status: str,
        created: int,
        error: str | None = None,
        exit_code: int | None = None,
    ) -> None:
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
        event_id = self._db.execute_sql(
            _INSERT_EVENT(), (rkey, created, workflow.id, status, frame)
        ).lastrowid
        self._uncommitted.append((event_id, self._encode(frame.encode())))
        workflow.status = status
        fields = {
            "knot": workflow.knot,
            "rkey": workflow.rkey,
            "workflow": workflow.name,
            "status": status,
            "error": error,
            "exit_code": exit_code,
        }
        self._said.append((workflow.id, fields))

    def mint(self) -> tuple[int, str]:
        """A new (created ns, TID) from the status clock (inside ``writing``).

        Pipeline ids come from here: unique among themselves and with every
        status event's rkey, and ordered with them in time.
        """
        created = self._next_created()
        return created, tid.encode(created // 1000, self._clock_id)

    def append_pipeline(self, created: int, rkey: str, workflow_id: int, record: dict) -> None:
        """Announce a pipeline tack compiled on ``/events`` as its
        ``sh.tangled.pipeline`` record (the transitional appview learns
        pipelines there), keyed by the pipeline's own TID."""
        frame = json.dumps(
            {"rkey": rkey, "nsid": PIPELINE_NSID, "event": {"$type": PIPELINE_NSID, **record}},
            separators=(",", ":"),
        )
        event_id = self._db.execute_sql(
            _INSERT_EVENT(), (f"pipeline:{rkey}", created, workflow_id, "pipeline", frame)
        ).lastrowid
        self._uncommitted.append((event_id, self._encode(frame.encode())))

    def _next_created(self) -> int:
        # Whole microseconds apart, so the TID (microsecond resolution) made
        # from it is unique and sorts the same way.
        now = time.time_ns() // 1000 * 1000
        self._last_created = max(now, self._last_created + 1000)
        return self._last_created

    # --- reading ------------------------------------------------------------------

    def first_id_after(self, cursor_ns: int) -> int:
        """The id after which events newer than ``cursor_ns`` start."""
        # Walks the unique index on ``created`` down from the cursor: one row
        # read, where MAX(id) over every older event read them all.
        last = (
            StatusEvent.select(StatusEvent.id)
            .where(StatusEvent.created <= cursor_ns)
            .order_by(StatusEvent.created.desc())
            .limit(1)
            .scalar()
        )
        return last or 0

    def frames_after(self, after_id: int, limit: int = 500) -> tuple[int, bytes]:
        """Encoded frames of events after ``after_id`` (at most ``limit``), and the
        id of the last one; ``(after_id, b"")`` when there is none yet."""
        with self._changed:
            ids = self._recent_ids
            if ids and after_id >= ids[0] - 1:
                start = bisect.bisect_right(ids, after_id)
                end = min(start + limit, len(ids))
                if start == end:
                    return after_id, b""
                last, frames = ids[end - 1], self._recent_frames[start:end]
                return last, b"".join(frames)
        # A backfill: raw rows of precompiled SQL, no model objects, and the
        # frames as the UTF-8 bytes SQLite holds (no decoding to str and
        # encoding back): a million-event backfill is mostly this loop.
        rows = self._db.execute_sql(_FRAMES_AFTER_SQL, (after_id, limit)).fetchall()
        if not rows:
            return after_id, b""
        encode = self._encode
        return rows[-1][0], b"".join([encode(frame) for _, frame in rows])

    def nudge(self) -> None:
        """Wake whoever waits in ``wait_beyond`` (a new subscriber needs serving)."""
        with self._changed:
            self._nudged = True
            self._changed.notify_all()

    def wait_beyond(self, after_id: int, timeout: float) -> bool:
        """Block until an event newer than ``after_id`` exists, or ``timeout``."""
        with self._changed:
            woke = self._changed.wait_for(
                lambda: self.latest_id > after_id or self._nudged, timeout
            )
            self._nudged = False
            return woke
