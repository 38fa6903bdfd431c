"""Upgraded connections that only listen, watched together by one thread.

An /events subscriber is written to by the broadcaster; all its own side
ever does is answer pings, send one every ``PING_EVERY`` and notice a close.
That took a thread per subscriber, each waking every second. When hundreds
of subscribers left at once (a proxy restarting, say), hundreds of threads
woke together and fought over the GIL, and tack answered nothing else for
a tenth of a second to half a second. Here one thread does it for all:

- a subscriber whose socket turns readable has what it sent answered
  (``ServerWebSocket.poll``); one that closed, or that the broadcaster cut,
  is handed to its ``gone`` callback;
- every ``SWEEP_EVERY`` the pings that are due go out;
- at shutdown every subscriber gets a close frame (1001) at once, and the
  room waits up to ``CLOSE_WAIT`` for them all to leave, not that long each.
"""

from __future__ import annotations

import selectors
import threading
import time
from collections.abc import Callable

from .sockets import ClientGone, ServerWebSocket
from .waiting import run_room

SWEEP_EVERY = 1.0
CLOSE_WAIT = 1.0

Gone = Callable[[str], None]


class ListeningRoom:
    """One thread answering what many websockets send, until each is gone.

    ``gone(reason)`` is called once per socket, after the room has let it
    go: on the room's thread, or for one that arrives after the stop, on
    the thread that brought it.
    """

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()  # watch() runs on handler threads
        # Each with the descriptor it was registered under: it is
        # unregistered by that number even if the socket is closed by then.
        self._watched: dict[ServerWebSocket, tuple[Gone, int]] = {}
        self._thread = threading.Thread(target=self._run, name="ws-listening", daemon=True)
        self._started = False

    def watch(self, ws: ServerWebSocket, gone: Gone) -> None:
        with self._lock:
            # Checked under the lock _close_all takes its list under: a
            # socket is either in that list or turned away here.
            late = self._stop.is_set()
            if not late:
                descriptor = ws.fileno()
                self._selector.register(descriptor, selectors.EVENT_READ, ws)
                self._watched[ws] = (gone, descriptor)
                if not self._started:
                    self._started = True
                    self._thread.start()
        if late:
            ws.close(1001, "spindle shutting down")
            gone("spindle shutting down")

    @property
    def watching(self) -> int:
        return len(self._watched)

    def join(self, timeout: float) -> None:
        """Wait for the room to have closed every socket (after ``stop``)."""
        if self._started:
            self._thread.join(timeout)

    # --- the room's thread -----------------------------------------------------------

    def _run(self) -> None:
        # A socket registered while select() waits may be seen only at its
        # next call, at most SWEEP_EVERY later: harmless, a new subscriber's
        # first ping is not due for a while.
        run_room(
            "listening room",
            self._selector,
            lambda: not self._stop.is_set(),
            lambda key: self._answer(key.data),
            self._ping_those_due,
            SWEEP_EVERY,
        )
        self._close_all()

    def _answer(self, ws: ServerWebSocket) -> None:
        try:
            ws.poll(0.0)
        except ClientGone as exc:
            self._let_go(ws, str(exc))

    def _ping_those_due(self) -> None:
        for ws in list(self._watched):
            try:
                ws.ping_if_due()
            except ClientGone as exc:
                self._let_go(ws, str(exc))

    def _let_go(self, ws: ServerWebSocket, reason: str) -> None:
        with self._lock:
            watched = self._watched.pop(ws, None)
            if watched is None:
                return
            gone, descriptor = watched
            self._selector.unregister(descriptor)
        ws.abort()
        gone(reason)

    def _close_all(self) -> None:
        """Close frames to everyone at once, then up to CLOSE_WAIT for them to go out."""
        with self._lock:
            watched = list(self._watched)
        for ws in watched:
            ws.start_close(1001, "spindle shutting down")
        deadline = time.monotonic() + CLOSE_WAIT
        unsent = watched
        while unsent and time.monotonic() < deadline:
            unsent = [ws for ws in unsent if not ws.flush_nowait()]
            if unsent:
                time.sleep(0.02)
        for ws in watched:
            self._let_go(ws, "spindle shutting down")
