"""Following workflow logs over a websocket: what ``/logs`` and
``subscribePipelineLogs`` share.

Each selected workflow's log is replayed from its start and then followed;
lines of several workflows go out in the order they are read. A follower
wakes only when one of its own workflows' logs grows or one of them ends
(``LogBook.watching``), and holds no database connection while it waits.
Lines are written before a final status commits, so a workflow seen final
is drained by one more read, and the stream closes (1000) once every
selected workflow is final and sent.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..statuses import FINAL, StatusLog
from ..store import Workflow, release_connection
from ..worklogs import LogBook, LogReader, Wakeup
from .sockets import ClientGone

if TYPE_CHECKING:
    from .sockets import ServerWebSocket

# How often a follower reads its logs and the statuses without being woken.
FULL_PASS_EVERY = 30.0
# How long a follower sleeps when neither its logs nor its client stir: time
# to send a ping. Stopping tack wakes every follower (``LogBook.wake_all``).
IDLE_WAKE_EVERY = 5.0

# One log line (JSON, no newline) and its workflow's name -> the websocket
# frame to send; None skips a line that is not one of ours.
EncodeLine = Callable[[bytes, str], bytes | None]


@dataclass
class Follow:
    workflow_id: int
    name: str
    log: LogReader
    done: bool = False


class LogFollower:
    def __init__(self, statuses: StatusLog, logbook: LogBook, stop: threading.Event) -> None:
        self._statuses = statuses
        self._logbook = logbook
        self._stop = stop
        self._streams = 0
        self._count_lock = threading.Lock()
        self._departures = threading.Lock()  # see ``stream``

    @property
    def streams(self) -> int:
        """Log streams being served now (for /metrics)."""
        return self._streams

    def follow(self, workflow_id: int, name: str) -> Follow:
        return Follow(workflow_id, name, LogReader(self._logbook.path(workflow_id)))

    def stream(
        self, ws: ServerWebSocket, follows: list[Follow], encode: EncodeLine, end_reason: str
    ) -> None:
        """Send ``follows``' logs until all are final (close 1000 with
        ``end_reason``) or tack stops (1001). A peer that goes away raises
        ``ClientGone`` out of here."""
        with self._count_lock:
            self._streams += 1
        departing = False
        try:
            with self._logbook.watching(f.workflow_id for f in follows) as grew:
                try:
                    self._stream(ws, follows, encode, end_reason, grew)
                except ClientGone:
                    # Clients that leave together (an appview restarting)
                    # wake their threads together; they tidy up one at a
                    # time. All at once, 1,000 of them fighting over the
                    # interpreter lock kept the port from answering for
                    # 0.26 to 1.2 s; one at a time, 0.05 to 0.34 s.
                    self._departures.acquire()
                    departing = True
                    raise
        finally:
            for follow in follows:
                follow.log.close()
            with self._count_lock:
                self._streams -= 1
            if departing:
                ws.abort()
                self._departures.release()

    def _stream(
        self,
        ws: ServerWebSocket,
        follows: list[Follow],
        encode: EncodeLine,
        end_reason: str,
        grew: Wakeup,
    ) -> None:
        statuses_seen = -1
        woken = True  # the first pass replays what is there and asks about statuses
        next_full_pass = 0.0
        while not self._stop.is_set():
            ws.poll()
            # Only a ring of our own (a line written to, or the end of, one of
            # our workflows) reads the logs and asks the store; the client
            # stirring or the idle wake-up does neither, so a follower of a
            # quiet workflow costs a chatty build nothing. A full pass now
            # and then is the safety net for a missed ring.
            if woken or time.monotonic() >= next_full_pass:
                next_full_pass = time.monotonic() + FULL_PASS_EVERY
                grew.clear()
                if _send_new_lines(ws, follows, encode):
                    continue
                if statuses_seen != self._statuses.latest_id:
                    statuses_seen = self._statuses.latest_id
                    if self._send_finals(ws, follows, encode):
                        ws.close(1000, end_reason)
                        return
            ws.ping_if_due()
            woken = _wait(ws, grew, IDLE_WAKE_EVERY)
        ws.close(1001, "spindle shutting down")

    @staticmethod
    def _send_finals(ws: ServerWebSocket, follows: list[Follow], encode: EncodeLine) -> bool:
        """Drain and mark done the workflows now final; True once all are."""
        finals = {
            follow.workflow_id: Workflow.get_by_id(follow.workflow_id).status in FINAL
            for follow in follows
            if not follow.done
        }
        release_connection()  # none held while waiting
        for follow in follows:
            if finals.get(follow.workflow_id):
                _send_new_lines(ws, [follow], encode)
                follow.done = True
        return all(follow.done for follow in follows)


def _wait(ws: ServerWebSocket, wakeup: Wakeup, timeout: float) -> bool:
    """Sleep until the wake-up rings, the client sends something (a close is
    answered at once) or ``timeout``; True if it rang."""
    poller = select.poll()
    poller.register(ws.fileno(), select.POLLIN)
    poller.register(wakeup.fileno(), select.POLLIN)
    ready = poller.poll(timeout * 1000)
    return any(fd == wakeup.fileno() for fd, _ in ready)


def _send_new_lines(ws: ServerWebSocket, follows: list[Follow], encode: EncodeLine) -> bool:
    sent = False
    for follow in follows:
        lines = follow.log.read_lines()
        frames = [encode(line, follow.name) for line in lines]
        data = b"".join(frame for frame in frames if frame is not None)
        if data:
            ws.send_encoded(data)
            sent = True
    return sent
