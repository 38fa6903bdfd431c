"""The server side of a websocket connection, and the frames it sends.

Upgraded connections are handed to wsproto's protocol layer for everything
they receive and for control frames, so tack never parses frames itself.
Data frames, the same for every subscriber, are encoded here once
(``encode_*_frame``) and written as they are.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from typing import Any

from websocket import ABNF
from wsproto import WSConnection
from wsproto.events import CloseConnection, Ping

PING_EVERY = 30.0
SEND_TIMEOUT = 10.0
SEND_BUFFER = 256 * 1024
# Unsent bytes a peer may leave queued before it counts as not reading.
MAX_BACKLOG = 4 * 1024 * 1024


class ClientGone(Exception):
    """The websocket peer closed, or was dropped for not reading."""


class ClientStalled(ClientGone):
    """The peer stopped reading: a send could not finish within SEND_TIMEOUT."""


class ServerWebSocket:
    """The server side of one upgraded connection.

    Writes come from two threads: the one reading the connection (its own
    for /logs, the listening room for /events: control frames, log lines)
    and the broadcaster (live /events). Every write holds
    ``_write_lock``, and bytes the socket could not take yet stay in
    ``_backlog``, so whatever is written next lands after them: frames are
    never interleaved.
    """

    def __init__(self, sock: socket.socket, conn: WSConnection) -> None:
        self._sock = sock
        self._conn = conn
        self._conn_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._backlog = bytearray()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        # tack batches its own writes; Nagle would hold each small frame
        # until the peer's delayed ACK (~40 ms) arrives.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Non-blocking for good: a Python socket with a timeout would wait in
        # send() even when asked not to, and stall the broadcaster.
        sock.setblocking(False)
        self._last_ping = time.monotonic()
        self.open = True

    def fileno(self) -> int:
        return self._sock.fileno()

    def send_encoded(self, data: bytes) -> None:
        """Frames already encoded; blocks until written (up to SEND_TIMEOUT).

        For a connection's own thread (/logs, the log subscription), which no
        other thread writes for: waiting for the socket happens outside the
        write lock, so nothing else ever waits on this peer.
        """
        deadline = time.monotonic() + SEND_TIMEOUT
        pending = data
        while not self.send_nowait(pending):
            pending = b""
            left = deadline - time.monotonic()
            if left <= 0:
                self.open = False
                raise ClientStalled(f"not reading for {SEND_TIMEOUT:.0f}s")
            _wait_for(self._sock, select.POLLOUT, left)

    def send_nowait(self, data: bytes = b"") -> bool:
        """Write what the socket takes now and keep the rest; True once nothing is left.

        Never blocks. A peer that lets more than MAX_BACKLOG pile up (it does
        not read, not even its pongs) is stalled, and dropped.
        """
        with self._write_lock:
            self._backlog += data
            while self._backlog:
                try:
                    sent = self._sock.send(self._backlog)
                except BlockingIOError:
                    if len(self._backlog) > MAX_BACKLOG:
                        self.open = False
                        raise ClientStalled("not reading: too much unsent") from None
                    return False
                except OSError as exc:
                    self.open = False
                    raise ClientGone(f"send failed: {exc}") from None
                del self._backlog[:sent]
            return True

    @property
    def has_backlog(self) -> bool:
        """Bytes are queued: the peer is slow; more is not sent until they go."""
        return bool(self._backlog)

    def ping_if_due(self) -> None:
        if time.monotonic() - self._last_ping >= PING_EVERY:
            self._send_event(Ping())
            self._last_ping = time.monotonic()

    def poll(self, timeout: float = 0.0) -> None:
        """Answer what the peer sent (pings, close), waiting up to ``timeout`` for it;
        raise ClientGone once it closed."""
        while self.open and _wait_for(self._sock, select.POLLIN, timeout):
            timeout = 0.0
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            if not data:
                raise ClientGone("connection closed")
            with self._conn_lock:
                self._conn.receive_data(data)
                events = list(self._conn.events())
            for event in events:
                if isinstance(event, Ping):
                    self._send_event(event.response())
                elif isinstance(event, CloseConnection):
                    self._send_event(event.response())
                    self.open = False
                    raise ClientGone("closed by peer")

    def start_close(self, code: int, reason: str) -> None:
        """Queue the close frame and send what the socket takes now; never
        blocks (``flush_nowait`` sends the rest)."""
        if not self.open:
            return
        with contextlib.suppress(OSError, ClientGone):
            self._send_event(CloseConnection(code=code, reason=reason))
        self.open = False

    def flush_nowait(self) -> bool:
        """Send what is queued that the socket takes now; True once nothing
        is left to send, or nothing more can be."""
        try:
            return self.send_nowait()
        except ClientGone:
            return True

    def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.open:
            return
        self.start_close(code, reason)
        try:
            deadline = time.monotonic() + 1.0
            # Let what is queued (the close frame last) go out, briefly.
            while not self.send_nowait() and time.monotonic() < deadline:
                _wait_for(self._sock, select.POLLOUT, deadline - time.monotonic())
            if _wait_for(self._sock, select.POLLIN, max(deadline - time.monotonic(), 0.05)):
                self._sock.recv(1024)  # the peer's closing handshake, best effort
        except (OSError, ClientGone):
            self.open = False

    def abort(self) -> None:
        """Cut the connection now (a dropped subscriber); whoever reads it
        sees it end."""
        self.open = False
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _send_event(self, event: Any) -> None:
        """Control frames (pong, ping, close) never block: they join the queue
        behind whatever is partly written, and go out as the socket drains
        (the broadcaster's next pass, or this connection's next write)."""
        with self._conn_lock:
            data = self._conn.send(event)
        self.send_nowait(data)


def _wait_for(sock: socket.socket, events: int, timeout: float) -> bool:
    """Wait until ``sock`` is ready for ``events``; poll(2) has no descriptor
    limit, where select(2) fails for descriptors of 1024 and above."""
    poller = select.poll()
    poller.register(sock, events)
    return bool(poller.poll(max(timeout, 0.0) * 1000))


def _server_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (server to client), so one encoding serves
    every subscriber. The header is RFC 6455 §5.2's two to ten bytes: FIN and
    the opcode, then the length in 7, 7+16 or 7+64 bits. Built here, it costs
    a tenth of websocket-client's ``ABNF.format`` (2 us a frame), which was
    the largest part of a million-event backfill and of a log replay."""
    length = len(payload)
    if length < 126:
        return _SHORT_HEADER.pack(0x80 | opcode, length) + payload
    if length < 1 << 16:
        return _MEDIUM_HEADER.pack(0x80 | opcode, 126, length) + payload
    return _LONG_HEADER.pack(0x80 | opcode, 127, length) + payload


_SHORT_HEADER, _MEDIUM_HEADER, _LONG_HEADER = (
    struct.Struct("!BB"),
    struct.Struct("!BBH"),
    struct.Struct("!BBQ"),
)


def encode_utf8_frame(data: bytes) -> bytes:
    """A text frame of text already UTF-8 (a stored status event)."""
    return _server_frame(ABNF.OPCODE_TEXT, data)


def encode_text_frame(text: str) -> bytes:
    return encode_utf8_frame(text.encode("utf-8"))


def encode_binary_frame(data: bytes) -> bytes:
    return _server_frame(ABNF.OPCODE_BINARY, data)
