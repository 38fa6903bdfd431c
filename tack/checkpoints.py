"""WAL checkpoints on a thread of their own, off every writer's path.

SQLite copies its write-ahead log back into the database file (a checkpoint)
from inside whichever commit pushes the log past 1,000 pages, and that copy
ends in the only fsync a commit with ``synchronous=normal`` ever waits for.
The commit that drew it, a knot frame's intake or a worker's status, took
milliseconds longer: every few dozen pipelines, on the dispatch path. The
service turns that off (``open_database(..., background_checkpoints=True)``) and
checkpoints here instead, once a second, in PASSIVE mode: it takes no lock a
writer or reader waits for, and SQLite runs it with the GIL released.

A crash loses nothing either way: committed pages are in the log, which
SQLite replays on the next open.
"""

from __future__ import annotations

import threading
import time

import peewee

from . import logs, store

log = logs.get("store")

CHECKPOINT_SECONDS = 1.0
# A log this long after a checkpoint means readers keep the checkpoint from
# finishing (a reader holds the pages it reads): worth a line, not more often
# than WARN_EVERY_SECONDS.
LONG_LOG_FRAMES = 250_000  # about 1 GB of 4 KiB pages
WARN_EVERY_SECONDS = 300.0


class Checkpointer:
    def __init__(self, db: peewee.Database, stop: threading.Event) -> None:
        self._db = db
        self._stop = stop
        self._warned_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.wait(CHECKPOINT_SECONDS):
                self.checkpoint()
        finally:
            store.release_connection()

    def checkpoint(self) -> None:
        """One passive checkpoint; a failed one is made good by the next."""
        try:
            row = self._db.execute_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except Exception:
            # Housekeeping: a failed checkpoint leaves the log longer until
            # the next one; nothing committed is at risk.
            log.exception("WAL checkpoint failed; trying again")
            return
        _busy, frames, copied = row
        if frames - copied >= LONG_LOG_FRAMES:
            self._warn_long_log(frames, copied)

    def _warn_long_log(self, frames: int, copied: int) -> None:
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY_SECONDS:
            return
        self._warned_at = now
        log.warning(
            "WAL keeps growing: long-running readers hold back checkpoints",
            extra={"wal_frames": frames, "checkpointed_frames": copied},
        )
