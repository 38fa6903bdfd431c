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

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..statuses import FINAL, StatusLog
from ..store import Workflow, release_connection
from ..worklogs import LogBook, read_raw_lines

if TYPE_CHECKING:
    from .server import ServerWebSocket

# One log line (JSON, no newline) and its workflow's name -> the websocket
# frame to send; None skips a line that is not one of ours.
EncodeLine = Callable[[bytes, str], bytes | None]


@dataclass
class Follow:
    workflow_id: int
    name: str
    path: Path
    offset: int = 0
    done: bool = False


class LogFollower:
    def __init__(self, statuses: StatusLog, logbook: LogBook, stop: threading.Event) -> None:
        self._statuses = statuses
        self._logbook = logbook
        self._stop = stop
        self._streams = 0
        self._count_lock = threading.Lock()

    @property
    def streams(self) -> int:
        """Log streams being served now (for /metrics)."""
        return self._streams

    def follow(self, workflow_id: int, name: str) -> Follow:
        return Follow(workflow_id, name, self._logbook.path(workflow_id))

    def stream(
        self, ws: ServerWebSocket, follows: list[Follow], encode: EncodeLine, end_reason: str
    ) -> None:
        """Send ``follows``' logs until all are final (close 1000 with
        ``end_reason``) or tack stops (1001). A peer that goes away raises
        ``ClientGone`` out of here."""
        with self._count_lock:
            self._streams += 1
        try:
            with self._logbook.watching(f.workflow_id for f in follows) as grew:
                self._stream(ws, follows, encode, end_reason, grew)
        finally:
            with self._count_lock:
                self._streams -= 1

    def _stream(
        self,
        ws: ServerWebSocket,
        follows: list[Follow],
        encode: EncodeLine,
        end_reason: str,
        grew: threading.Event,
    ) -> None:
        statuses_seen = -1
        while not self._stop.is_set():
            ws.poll()
            grew.clear()
            if _send_new_lines(ws, follows, encode):
                continue
            # The store is asked about statuses only when some status moved.
            if statuses_seen != self._statuses.latest_id:
                statuses_seen = self._statuses.latest_id
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
                if all(follow.done for follow in follows):
                    ws.close(1000, end_reason)
                    return
            ws.ping_if_due()
            grew.wait(1.0)
        ws.close(1001, "spindle shutting down")


def _send_new_lines(ws: ServerWebSocket, follows: list[Follow], encode: EncodeLine) -> bool:
    sent = False
    for follow in follows:
        lines, follow.offset = read_raw_lines(follow.path, follow.offset)
        frames = [encode(line, follow.name) for line in lines]
        data = b"".join(frame for frame in frames if frame is not None)
        if data:
            ws.send_encoded(data)
            sent = True
    return sent
