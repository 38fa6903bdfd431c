"""Accepted connections wait here, without a thread, until their first bytes.

The HTTP server gives each connection a thread of its own, but only once
the connection has something to say. Before that, one thread watches every
waiting connection with a selector:

- a connection whose request starts to arrive goes to a thread of its own;
- one its peer closed, or that said nothing for the server's header
  timeout, is closed here.

Why not a thread from accept on: each silent connection then held a thread
blocked in its first read. When a thousand of them closed together, a
thousand threads woke at once and fought over the GIL, and tack answered
nothing else for 0.2 to 6.6 seconds (bench/connections.py). Here a thousand
closes are a thousand short steps of one thread.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import logs

log = logs.get("server")

# How often the waiting room looks for connections past their deadline when
# nothing else wakes it; a silent connection is let go at most this late.
SWEEP_EVERY = 0.25


def run_room(
    name: str,
    selector: selectors.BaseSelector,
    running: Callable[[], bool],
    on_ready: Callable[[selectors.SelectorKey], None],
    sweep: Callable[[], None],
    every: float,
) -> None:
    """A room's thread: ``on_ready`` for each key the selector finds ready,
    ``sweep`` every ``every`` seconds, while ``running()``.

    One connection's trouble must not leave the others unwatched for ever:
    a step that fails is logged, and the room watches on.
    """
    next_sweep = time.monotonic() + every
    while running():
        try:
            for key, _ in selector.select(every):
                on_ready(key)
            if time.monotonic() >= next_sweep:
                sweep()
                next_sweep = time.monotonic() + every
        except Exception:
            log.exception(f"{name} failed a step; watching on")


class WaitingRoom:
    """One thread and a selector for the connections that have not spoken yet.

    ``ready(sock, address)`` takes a connection whose first bytes arrived
    (still unread); ``gone(sock)`` closes one that left or timed out. Both
    are called on the waiting room's thread.
    """

    def __init__(
        self,
        ready: Callable[[socket.socket, Any], None],
        gone: Callable[[socket.socket], None],
    ) -> None:
        self._ready = ready
        self._gone = gone
        self._selector = selectors.DefaultSelector()
        # admit() runs on the accepting thread; only this room's thread
        # touches the selector, so arrivals are handed over in a deque and
        # the thread is woken through a socket pair.
        self._arrivals: deque[tuple[socket.socket, Any, float]] = deque()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._deadlines: dict[socket.socket, float] = {}
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def admit(self, sock: socket.socket, address: Any, patience: float) -> None:
        """Wait for ``sock``'s first bytes for at most ``patience`` seconds."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="http-waiting", daemon=True)
            self._thread.start()
        self._arrivals.append((sock, address, time.monotonic() + patience))
        with contextlib.suppress(BlockingIOError):  # already woken
            self._wake_writer.send(b"\0")

    @property
    def waiting(self) -> int:
        return len(self._deadlines) + len(self._arrivals)

    def close(self) -> None:
        """Stop watching, and close every connection still waiting."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")
        if self._thread is not None:
            self._thread.join(5.0)
        if self._thread is None or not self._thread.is_alive():
            self._let_everyone_go()

    # --- the room's thread -------------------------------------------------------

    def _run(self) -> None:
        run_room(
            "waiting room",
            self._selector,
            lambda: not self._closed.is_set(),
            self._on_ready,
            self._let_the_silent_go,
            SWEEP_EVERY,
        )

    def _on_ready(self, key: selectors.SelectorKey) -> None:
        if key.data is None:
            self._take_arrivals()
        else:
            self._spoke_or_left(key.fileobj, key.data)

    def _take_arrivals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_reader.recv(4096):
                pass
        while self._arrivals:
            sock, address, deadline = self._arrivals.popleft()
            try:
                self._selector.register(sock, selectors.EVENT_READ, address)
            except (OSError, ValueError):  # closed meanwhile
                self._gone(sock)
                continue
            self._deadlines[sock] = deadline

    def _spoke_or_left(self, sock: Any, address: Any) -> None:
        try:
            first = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # woken for nothing: keep waiting
        except OSError:
            first = b""  # reset by the peer: as good as gone
        self._selector.unregister(sock)
        del self._deadlines[sock]
        if first:
            self._ready(sock, address)
        else:
            self._gone(sock)

    def _let_the_silent_go(self) -> None:
        now = time.monotonic()
        for sock in [s for s, deadline in self._deadlines.items() if deadline <= now]:
            self._selector.unregister(sock)
            del self._deadlines[sock]
            self._gone(sock)

    def _let_everyone_go(self) -> None:
        while self._arrivals:
            self._gone(self._arrivals.popleft()[0])
        for sock in list(self._deadlines):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            self._gone(sock)
        self._deadlines.clear()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()
