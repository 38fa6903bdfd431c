"""The knot side of tack: which knot event streams to follow.

The jetstream applier decides *which* knots are wanted; whoever implements
``KnotSubscriptions`` decides *how* to follow them. The split keeps invariant 2
of the design: the applier never waits on the network, so both methods must
return at once and do their connecting on threads of their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .. import logs
from ..net import HostRefused, open_vetted_socket, vet_host
from ..store import release_connection
from ..stream import Backoff, ConnectPacer, Follower

if TYPE_CHECKING:
    from .knot_frames import KnotIntake

log = logs.get("knots")


class KnotSubscriptions(Protocol):
    def add_knot(self, knot: str) -> None:
        """Start following ``knot``'s event stream (idempotent, non-blocking)."""

    def remove_knot(self, knot: str) -> None:
        """Stop following ``knot`` and close its stream (idempotent, non-blocking)."""


class LoggedKnotSubscriptions:
    """Records wanted knots without connecting; used until a consumer is wired in."""

    def __init__(self) -> None:
        self.knots: set[str] = set()

    def add_knot(self, knot: str) -> None:
        self.knots.add(knot)
        log.info("knot wanted", extra={"knot": knot})

    def remove_knot(self, knot: str) -> None:
        self.knots.discard(knot)
        log.info("knot released", extra={"knot": knot})


# --- the consumer ---------------------------------------------------------------

# Knot cursors are the knot's own clock: the ``created`` (unix ns) of the last
# frame processed (older knots: the time in its TID rkey). A restart resumes
# this far back, and so does any reconnect to a knot whose frames carry no
# ``created`` (TIDs may be stamped slightly out of order); replays cost
# nothing, since each knot event is taken in once (knot, rkey). A reconnect
# to a knot that sends ``created`` (strictly increasing) resumes exactly
# there: after a drain-cap close (1013) a rewind would replay the same
# capped window forever.
REWIND_NS = 60 * 1_000_000_000
# Save the cursor at most this often per knot (and always on disconnect).
CURSOR_SAVE_SECONDS = 1.0


class _KnotStream:
    """One knot: a follower thread feeding intake, and that knot's cursor."""

    def __init__(self, consumer: KnotConsumer, knot: str) -> None:
        self.knot = knot
        self._consumer = consumer
        self._cursor_name = f"knot:{knot}"
        self._cursor_ns: int | None = None
        self._rewind_ns = REWIND_NS  # for the next connection
        self._exact = False  # the cursor came from a frame's ``created``
        self._saved_at = 0.0
        self._dirty = False
        self.stop = threading.Event()
        self.follower = Follower(
            component="knots",
            url=self._url,
            on_frames=self._on_frames,
            stop=self.stop,
            backoff=consumer.backoff,
            ids={"knot": knot},
            open_socket=lambda url: open_vetted_socket(url, consumer.dev),
            give_up_on=(HostRefused,),
            on_disconnect=self._save_cursor,
            # Knots are mostly idle: a reader thread quiet for a ping interval
            # gives its database connection back (two descriptors each
            # otherwise). Not after every frame: reopening one cost more
            # than the rest of taking a frame in.
            on_idle=release_connection,
            pacer=consumer.pacer,
            tidy_gate=consumer.tidy_gate,
        )
        self.thread = threading.Thread(target=self._run, name=f"knot-{knot}", daemon=True)

    def _run(self) -> None:
        self.follower.run()
        self._save_cursor()

    def take_cursor(self) -> None:
        """Read (or, for a knot new to us, set) the cursor on the caller's
        thread, which holds a database connection anyway: a reader thread
        that opens one just for this keeps SQLite's schema and cache memory
        in its malloc arena after closing it (2,000 knots: ~40 MB). On any
        trouble the reader does it itself before connecting."""
        try:
            self._load_cursor()
        except Exception:
            log.warning("knot cursor not read yet", extra={"knot": self.knot}, exc_info=True)

    def _load_cursor(self) -> None:
        if self._cursor_ns is not None:
            return
        self._cursor_ns = self._consumer.read_cursor(self._cursor_name)
        if self._cursor_ns is None:
            # A knot new to us: from now. Today's knots take a missing
            # cursor as "from the beginning" and would replay their whole
            # history into pipelines. Kept so a restart resumes from here.
            self._cursor_ns = time.time_ns()
            self._rewind_ns = 0  # "now" means now: nothing before it was ours
            self._dirty = True
            self._write_cursor()

    def _url(self) -> str:
        try:
            self._load_cursor()
        finally:
            # Called before every connection: a knot that then stays quiet
            # holds no database connection meanwhile.
            release_connection()
        scheme = "ws" if self._consumer.dev else "wss"
        cursor = max(self._cursor_ns - self._rewind_ns, 0)
        self._rewind_ns = 0 if self._exact else REWIND_NS
        return f"{scheme}://{self.knot}/events?cursor={cursor}"

    def _on_frames(self, frames: list[bytes]) -> None:
        for frame in frames:
            self._on_frame(frame)

    def _on_frame(self, frame: bytes) -> None:
        position = self._consumer.intake.handle(self.knot, frame)
        if position is None:
            return
        cursor, self._exact = position
        self._rewind_ns = 0 if self._exact else REWIND_NS
        if self._cursor_ns is None or cursor > self._cursor_ns:
            self._cursor_ns = cursor
            self._dirty = True
        if self._dirty and time.monotonic() - self._saved_at >= CURSOR_SAVE_SECONDS:
            self._write_cursor()

    def _save_cursor(self) -> None:
        """On the reader's way out (a disconnect, a stop): save, and give the
        database connection back."""
        try:
            self._write_cursor()
        finally:
            release_connection()

    def _write_cursor(self) -> None:
        if not self._dirty or self._cursor_ns is None:
            return
        try:
            self._consumer.write_cursor(self._cursor_name, self._cursor_ns)
        except Exception:
            # Losing a cursor write only means a longer replay next time.
            log.exception("knot cursor not saved", extra={"knot": self.knot})
            return
        self._dirty = False
        self._saved_at = time.monotonic()


class KnotConsumer:
    """Follows every wanted knot's event stream, one reader thread per knot."""

    def __init__(
        self,
        intake: KnotIntake,
        *,
        dev: bool,
        backoff: Backoff,
        read_cursor: Callable[[str], int | None],
        write_cursor: Callable[[str, int], None],
        connects_per_second: float,
    ) -> None:
        self.intake = intake
        self.pacer = ConnectPacer(connects_per_second)
        self.tidy_gate = threading.Lock()
        self.dev = dev
        self.backoff = backoff
        self.read_cursor = read_cursor
        self.write_cursor = write_cursor
        self._streams: dict[str, _KnotStream] = {}
        self._refused: set[str] = set()
        self._lock = threading.Lock()

    @property
    def knots(self) -> set[str]:
        with self._lock:
            return set(self._streams)

    def figures(self) -> tuple[int, int, int]:
        """(streams followed, connected now, connections made) for /healthz
        and /metrics."""
        with self._lock:
            followers = [stream.follower for stream in self._streams.values()]
        connected = sum(follower.connected for follower in followers)
        return len(followers), connected, sum(f.connections for f in followers)

    def add_knot(self, knot: str) -> None:
        try:
            vet_host(knot, self.dev)
        except HostRefused as exc:
            if knot not in self._refused:  # once per knot, not per repo record
                self._refused.add(knot)
                log.warning("knot refused", extra={"knot": knot, "reason": str(exc)})
            return
        with self._lock:
            if knot in self._streams:
                return
            stream = _KnotStream(self, knot)
            self._streams[knot] = stream
        log.info("knot wanted", extra={"knot": knot})
        stream.take_cursor()
        stream.thread.start()

    def remove_knot(self, knot: str) -> None:
        with self._lock:
            stream = self._streams.pop(knot, None)
        self._refused.discard(knot)
        if stream is None:
            return
        log.info("knot released", extra={"knot": knot})
        stream.stop.set()
        stream.follower.close()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.stop.set()
            stream.follower.close()
        deadline = time.monotonic() + timeout
        for stream in streams:
            # A stream add_knot registered but has not started yet: its
            # thread, once started, finds its stop already set and ends.
            if stream.thread.ident is not None:
                stream.thread.join(max(deadline - time.monotonic(), 0.1))
