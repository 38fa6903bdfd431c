"""Jetstream ingest: records about members, repos and collaborators into the store.

A reader thread pulls frames, decodes them (``records.decode``: pure, no
I/O) and puts the results into a bounded queue; one applier thread drains it
in arrival order. Decoding on the reader's side lets it overlap with the
applier's SQLite work, which runs without the GIL.

The applier writes a run of changes and the cursor in one transaction, so
after a crash the saved cursor never points past an event that was not
applied; the reader resumes 5 s before it, and replays are harmless because
every change is an idempotent upsert or delete on (did, rkey).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit, urlunsplit

import peewee

from . import logs, records, retry, store
from .intake import backfill
from .intake.backfill import Backfill
from .intake.knots import KnotSubscriptions
from .intake.wanted_knots import KnotChanges
from .records import BadRecord, Change
from .retry import ShutdownDuringRetry
from .stream import Backoff, Follower

log = logs.get("jetstream")

CURSOR_NAME = "jetstream"
# time_us cursors are not gapless at the boundary (events sharing a
# microsecond, servers with slightly different clocks), so resume earlier.
REWIND_US = 5_000_000
BATCH_MAX = 2000
# The reader hands frames over in runs (all one socket read brought in) of
# at most this many: one queue hand-off per frame cost more than decoding it.
RUN_MAX = 250
# A frame's time_us may move the cursor only up to this far past our clock.
MAX_CLOCK_SKEW_US = 5 * 60 * 1_000_000
# On shutdown the applier keeps draining already-received frames this long;
# what is left is replayed from the saved cursor on the next start.
DRAIN_SECONDS = 4.0


def _changes_directory(change: Change) -> bool:
    """Whether ``change`` may change an answer ``store.Directory`` keeps."""
    return change.collection in (records.REPO, records.MEMBER) or change.action == "delete_account"


def subscribe_url(endpoint: str, cursor_us: int | None) -> str:
    """The v1 subscribe URL for our collections, resuming REWIND_US before ``cursor_us``."""
    parts = urlsplit(endpoint)
    query = [("wantedCollections", c) for c in records.COLLECTIONS]
    if cursor_us is not None:
        query.insert(0, ("cursor", str(max(cursor_us - REWIND_US, 0))))
    extra = "&" + parts.query if parts.query else ""
    return urlunsplit(parts._replace(query=urlencode(query) + extra))


# A frame as the applier takes it: the change to write (None for a bad
# record) and the time that moves the cursor (None when the frame had none).
Decoded = tuple[Change | None, int | None]


class FrameDecoder:
    """Frames to ``Decoded`` items, on the reader's thread; bad ones logged."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        self.bad = 0

    def decode(self, frame: str | bytes) -> Decoded:
        try:
            change = records.decode(frame, self._hostname)
        except BadRecord as bad:
            return self._skip(bad)
        except Exception as exc:
            # Whatever a frame makes the decoder raise, the frame is bad: it
            # is skipped like any bad record, never allowed to take the batch
            # (and the events after it) down with it.
            return self._skip(BadRecord(f"undecodable: {type(exc).__name__}: {str(exc)[:200]}"))
        return change, change.time_us

    def _skip(self, bad: BadRecord) -> Decoded:
        self.bad += 1
        log.warning(
            "bad record skipped",
            extra={**bad.ids, "reason": bad.reason, "time_us": bad.time_us},
        )
        return None, bad.time_us


class Applier:
    """Drains the queue of decoded frames into the store, in order, one thread only."""

    def __init__(
        self,
        db: peewee.Database,
        frames: queue.Queue,
        directory: store.Directory,
        knots: KnotSubscriptions,
        stop: threading.Event,
        known_knots: set[str],
        on_pull_events: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._on_pull_events = on_pull_events
        self._frames = frames
        self._directory = directory
        self._knots = knots
        self._stop = stop
        self._known_knots = set(known_knots)
        self._knot_changes = KnotChanges(directory)
        self.cursor: int | None = store.get_cursor(CURSOR_NAME)
        self.applied = 0
        self.unwritable = 0

    # --- thread body -----------------------------------------------------------

    def run(self) -> None:
        drain_until: float | None = None
        while True:
            if self._stop.is_set() and drain_until is None:
                drain_until = time.monotonic() + DRAIN_SECONDS
            batch = self._take_batch(draining=drain_until is not None)
            if not batch:
                if drain_until is not None:
                    break
                continue
            try:
                self._apply_batch(batch)
            except ShutdownDuringRetry:
                log.warning(
                    "shutdown while retrying; unapplied events will be replayed",
                    extra={"cursor": self.cursor},
                )
                break
            except Exception:
                # Bad records and I/O are handled inside, and the batch's
                # changes and cursor commit together, so what fails here came
                # after the commit (knot bookkeeping): log it and go on.
                log.exception("applier failed after a batch", extra={"cursor": self.cursor})
            if drain_until is not None and time.monotonic() > drain_until:
                log.warning(
                    "drain time over; the rest is replayed on restart",
                    extra={"runs_left": self._frames.qsize()},
                )
                break
        log.info("applier stopped", extra={"cursor": self.cursor, "applied": self.applied})

    def _take_batch(self, draining: bool) -> list[Decoded]:
        """The runs waiting, in order, up to about BATCH_MAX frames."""
        try:
            batch = self._frames.get_nowait() if draining else self._frames.get(timeout=0.2)
        except queue.Empty:
            return []
        while len(batch) < BATCH_MAX:
            try:
                batch += self._frames.get_nowait()
            except queue.Empty:
                break
        return batch

    # --- applying ---------------------------------------------------------------

    def _apply_batch(self, decoded: list[Decoded]) -> None:
        changes: list[Change] = []
        newest = self.cursor or 0
        latest_plausible = time.time_ns() // 1000 + MAX_CLOCK_SKEW_US
        for change, time_us in decoded:
            if change is not None:
                changes.append(change)
            # A bad record that told its time still moves the cursor past it,
            # but only to a time that can be real: a frame from the far future
            # must not make a restart skip everything published meanwhile.
            if time_us is not None and time_us <= latest_plausible:
                newest = max(newest, time_us)
        try:
            touched = self._with_retry(lambda: self._commit(changes, newest))
        except ShutdownDuringRetry:
            raise
        except Exception as exc:
            # Something in the run is permanently unwritable. Find it by
            # writing one change at a time; the rest still land, in order.
            log.warning("batch failed, applying one by one", extra={"error": repr(exc)[:300]})
            touched = set()
            for change in changes:
                touched |= self._apply_single(change)
            touched |= self._with_retry(lambda: self._commit([], newest))
        if touched:
            self._with_retry(lambda: self._reconcile_knots(touched))
        if any(c.action == "pull_event" for c in changes):
            self._on_pull_events()
        for change in changes:
            if change.collection == records.REPO and change.action == "upsert":
                self._note_repo_did_claim(change)

    def _apply_single(self, change: Change) -> set[str]:
        """Write one change alone; the knots it touched (none when unwritable)."""
        try:
            cursor = self.cursor or 0
            if change.time_us <= time.time_ns() // 1000 + MAX_CLOCK_SKEW_US:
                cursor = max(cursor, change.time_us)
            return self._with_retry(lambda: self._commit([change], cursor))
        except ShutdownDuringRetry:
            raise
        except Exception as exc:
            self.unwritable += 1
            log.error(
                "record could not be written, skipped",
                extra={**change.ids, "error": repr(exc)[:300]},
            )
            return set()

    def _commit(self, changes: list[Change], cursor: int) -> set[str]:
        """The changes and the cursor land together or not at all; the knots
        whose wanted-ness they may have flipped."""
        self._knot_changes.track()
        with self._db.atomic():
            store.apply_changes(changes, may_grant=self._directory.is_member)
            touched = self._knot_changes.take()
            if cursor and cursor != self.cursor:
                store.save_cursor(CURSOR_NAME, cursor)
        if any(map(_changes_directory, changes)):
            self._directory.records_changed()
        self.cursor = cursor or self.cursor
        self.applied += len(changes)
        return touched

    def _with_retry(self, operation: Callable[[], object]) -> object:
        """Retry I/O trouble in place, forever, until it works or we shut down."""
        retrying = retry.store_writes(self._stop, log, "store busy, retrying the same events")
        try:
            return retrying(operation)
        except Exception as exc:
            if store.is_transient(exc):
                raise ShutdownDuringRetry() from exc
            raise

    def _note_repo_did_claim(self, change: Change) -> None:
        """Say so when a repo record claims a repo DID another author's
        record already holds: the first owner keeps it (store.repo_by_did)."""
        repo_did = (change.row or {}).get("repo_did")
        if not repo_did:
            return
        holder = self._with_retry(lambda: self._directory.repo_by_did(repo_did))
        if holder is not None and holder.did != change.did:
            log.warning(
                "repo DID already held by another author; this record is not served for it",
                extra={**change.ids, "repo_did": repo_did, "holder": holder.did},
            )

    # --- knots ------------------------------------------------------------------

    def _reconcile_knots(self, knots: set[str]) -> None:
        """Tell the knot side about those of ``knots`` that became wanted or unwanted."""
        for knot in sorted(knots):
            wanted = self._directory.is_knot_wanted(knot)
            if wanted and knot not in self._known_knots:
                self._known_knots.add(knot)
                self._knots.add_knot(knot)
            elif not wanted and knot in self._known_knots:
                self._known_knots.discard(knot)
                self._knots.remove_knot(knot)


class Ingester:
    """The reader and applier threads, started and stopped together."""

    def __init__(
        self,
        db: peewee.Database,
        directory: store.Directory,
        knots: KnotSubscriptions,
        *,
        endpoint: str,
        queue_size: int,
        backoff: Backoff,
        known_knots: set[str],
        on_pull_events: Callable[[], None] = lambda: None,
        backfill: Backfill | None = None,
        retention_hours: float = 24.0,
    ) -> None:
        self.stop_event = threading.Event()
        self._backfill = backfill
        self._retention_hours = retention_hours
        self.backfilled = threading.Event()  # the backfill ran, or was not needed
        # Bounded in runs, so that at most ``queue_size`` frames wait.
        self._run_max = min(RUN_MAX, queue_size)
        self.frames: queue.Queue[list[Decoded]] = queue.Queue(
            maxsize=max(queue_size // self._run_max, 1)
        )
        self.decoder = FrameDecoder(directory.hostname)
        self.applier = Applier(
            db, self.frames, directory, knots, self.stop_event, known_knots, on_pull_events
        )
        self.reader = Follower(
            component="jetstream",
            url=lambda: subscribe_url(endpoint, self.applier.cursor),
            on_frames=self._enqueue,
            stop=self.stop_event,
            backoff=backoff,
        )
        self._threads = [
            threading.Thread(target=self._read, name="jetstream-reader", daemon=True),
            threading.Thread(target=self.applier.run, name="jetstream-applier", daemon=True),
        ]

    def _read(self) -> None:
        """The reader thread: a backfill first when jetstream cannot replay
        what tack missed (intake/backfill.py), then jetstream itself. The
        backfill's changes go through the same queue, ahead of any frame."""
        reason = backfill.needed(self.applier.cursor, self._retention_hours)
        if self._backfill is not None and reason is not None:
            try:
                self._run_backfill(reason)
            except Exception:
                log.exception("backfill failed; records arrive as they are written")
        self.backfilled.set()
        self.reader.run()

    def _run_backfill(self, reason: str) -> None:
        log.info("backfill started", extra={"reason": reason})
        learned = backfill.Learned()
        run: list[Decoded] = []
        for change in self._backfill.changes(learned):
            if self.stop_event.is_set():
                return
            run.append((change, None))  # no time: the cursor stays where it is
            if len(run) == self._run_max:
                self._put(run)
                run = []
        if run:
            self._put(run)
        log.info(
            "backfill done",
            extra={
                "members": learned.members,
                "repos": learned.repos,
                "collaborators": learned.collaborators,
                "deleted": learned.deleted,
                "skipped": learned.skipped[:20],
            },
        )

    def _enqueue(self, frames: list[bytes]) -> None:
        decode, run_max = self.decoder.decode, self._run_max
        for start in range(0, len(frames), run_max):
            self._put([decode(frame) for frame in frames[start : start + run_max]])

    def _put(self, run: list[Decoded]) -> None:
        """Block while the queue is full: that is the back-pressure on the socket."""
        while not self.stop_event.is_set():
            try:
                self.frames.put(run, timeout=0.2)
                return
            except queue.Full:
                continue

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def request_stop(self) -> None:
        """Stop reading now; the applier drains what was received (see ``stop``)."""
        self.stop_event.set()
        self.reader.close()

    def stop(self, timeout: float = 8.0) -> None:
        self.request_stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.1))
