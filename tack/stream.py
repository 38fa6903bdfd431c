"""Following a websocket stream forever: connect, hand over frames, reconnect.

Both the jetstream reader and each knot reader are one ``Follower``. The
follower owns the connection and the backoff; the caller owns the meaning of
frames and of the cursor, which it supplies fresh on every (re)connect so a
reconnect resumes from what was actually processed.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import websocket
from tenacity import RetryCallState, Retrying
from websocket._abnf import continuous_frame, frame_buffer

from . import logs, retry

log = logs.get("stream")

CONNECT_TIMEOUT = 10.0
# We ping a quiet peer, and a peer silent for longer than IDLE_LIMIT (not even
# a pong) is presumed dead: TCP alone can take many minutes to say so. recv
# sleeps until the next of these is due, so an idle stream wakes about twice
# a ping interval (the ping, its pong), not on a fixed poll: 2,000 idle knots
# polled every 5 s cost 3% of a core. Stopping does not wait for the sleep:
# ``close`` aborts the socket.
PING_EVERY = 45.0
IDLE_LIMIT = 120.0
HEALTHY_AFTER = 30.0
# No peer may make us buffer more than this for one message: websocket-client
# itself would read any announced length into memory.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
# Reads take up to READ_CHUNK while data keeps coming, and SMALL_READ once a
# read came back short: a blocked recv holds a buffer of the size it asked
# for, and 64 KiB for each of 2,000 idle knots was half of tack's memory.
READ_CHUNK = 64 * 1024
SMALL_READ = 4 * 1024
# Frames whose length fits the 16-bit field (<= 64 KiB) take the fast path.
FAST_FRAME_MAX = 0xFFFF
_FAST_OPCODES = (0x80 | websocket.ABNF.OPCODE_TEXT, 0x80 | websocket.ABNF.OPCODE_BINARY)


class _BoundedFrameBuffer(frame_buffer):
    """websocket-client's frame reader, with its own receive buffer.

    Two changes to the library's: the socket is read in large chunks (the
    library asks for exactly the bytes it misses, three system calls for
    every small frame, which caps ingest), and an over-long frame's payload
    is read in chunks and dropped. Closing the connection on such a frame
    would not help: the peer replays it after every reconnect, and the stream
    would never pass it. Progress survives recv timeouts: the library resumes
    a half-read frame, and the buffer and discard count persist.
    """

    def __init__(self, *args: Any, on_oversized: Callable[[int], None]) -> None:
        super().__init__(*args)
        self._on_oversized = on_oversized
        self._discarding = 0
        self._buffer = bytearray()
        self._pos = 0  # bytes of _buffer already handed out
        self._read_size = SMALL_READ

    def recv_strict(self, bufsize: int) -> bytes:
        if bufsize > MAX_MESSAGE_BYTES or self._discarding:
            self._discard(bufsize)
            return b""
        while len(self._buffer) - self._pos < bufsize:
            self._fill()
        start = self._pos
        self._pos += bufsize
        return bytes(self._buffer[start : self._pos])

    def take_whole_messages(self) -> list[bytes]:
        """The payloads of the complete, unfragmented, unmasked text or binary
        frames at the front of the buffer, up to ``FAST_FRAME_MAX`` bytes
        each; none while a frame is half-read or a fragmented message is open.

        The fast path of ingest: the library builds and validates an object
        per frame and its callers peel them one by one, a third of ingest's
        time. What this does not take (control frames, fragments, masked or
        RSV-flagged frames, big or partial ones) is left for ``recv_data``,
        which reads, checks and answers it as before.
        """
        if self.header is not None:
            return []
        buffer, position, end = self._buffer, self._pos, len(self._buffer)
        messages: list[bytes] = []
        take = messages.append
        # A view copies each payload once (a bytearray slice would copy it
        # twice); it is released before the buffer can be resized.
        with memoryview(buffer) as view:
            while end - position >= 2:
                # FIN set, RSV clear, text (0x1) or binary (0x2); mask bit clear.
                first, length = buffer[position], buffer[position + 1]
                if first not in _FAST_OPCODES or length & 0x80:
                    break
                if length < 126:
                    start = position + 2
                elif length == 126:
                    if end - position < 4:
                        break
                    length = buffer[position + 2] << 8 | buffer[position + 3]
                    start = position + 4
                else:
                    break  # longer than FAST_FRAME_MAX: the library's path
                stop = start + length
                if stop > end:
                    break
                take(view[start:stop].tobytes())
                position = stop
        self._pos = position
        return messages

    def _fill(self) -> None:
        chunk = self.recv(self._read_size)  # raises when the peer closed
        self._read_size = READ_CHUNK if len(chunk) == self._read_size else SMALL_READ
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += chunk

    def _discard(self, bufsize: int) -> None:
        if not self._discarding:
            self._discarding = bufsize
        while self._discarding:
            if self._pos == len(self._buffer):
                self._fill()
            taken = min(self._discarding, len(self._buffer) - self._pos)
            self._pos += taken
            self._discarding -= taken
        self._on_oversized(bufsize)


class _BoundedMessages(continuous_frame):
    """Drops a fragmented message once its fragments add up to too much."""

    def __init__(self, *args: Any, on_oversized: Callable[[int], None]) -> None:
        super().__init__(*args)
        self._on_oversized = on_oversized
        self._dropped = 0

    def add(self, frame: websocket.ABNF) -> None:
        super().add(frame)
        if self.cont_data and (self._dropped or len(self.cont_data[1]) > MAX_MESSAGE_BYTES):
            self._dropped += len(self.cont_data[1])
            self.cont_data[1] = b""
        if frame.fin and self._dropped:
            self._on_oversized(self._dropped)
            self._dropped = 0


class BoundedWebSocket(websocket.WebSocket):
    """websocket-client's socket with a cap on what one message may occupy,
    and a fast path for the small whole messages already read.

    An over-long message arrives as an empty one, after ``on_oversized``.
    """

    def __init__(self, on_oversized: Callable[[int], None]) -> None:
        super().__init__(skip_utf8_validation=True, enable_multithread=True)
        self.frame_buffer = _BoundedFrameBuffer(self._recv, True, on_oversized=on_oversized)
        self.cont_frame = _BoundedMessages(False, True, on_oversized=on_oversized)

    def take_whole_messages(self) -> list[bytes]:
        """Messages already in the receive buffer, without reading the socket
        (``_BoundedFrameBuffer.take_whole_messages``); none while a fragmented
        message is open, whose next frame only the library may take."""
        if self.cont_frame.recving_frames:
            return []
        return self.frame_buffer.take_whole_messages()


@dataclass(frozen=True)
class Backoff:
    initial: float = 1.0
    cap: float = 60.0


class ConnectPacer:
    """Spaces out the connection attempts of many followers: one every
    ``1 / per_second`` seconds at most, whichever follower asks.

    Why: when tack's own network blips, every knot stream drops at once and
    would reconnect at once. 2,000 threads runnable together starve every
    other thread of the GIL: the HTTP port went unanswered for 3 to 30 s. A
    follower waiting for its turn sleeps until then (not runnable, and a stop
    still wakes it), so the attempts arrive a few at a time. A rate, not a
    limit on attempts in flight: a knot that takes the whole connect timeout
    to fail holds no one else up.
    """

    def __init__(self, per_second: float) -> None:
        self._gap = 1.0 / per_second
        self._next = 0.0  # monotonic time of the next free turn
        self._lock = threading.Lock()

    def wait_turn(self, stop: threading.Event) -> bool:
        """Sleep until this caller's turn; False if ``stop`` was set first."""
        with self._lock:
            now = time.monotonic()
            turn = max(now, self._next)
            self._next = turn + self._gap
        return not stop.wait(turn - now) if turn > now else not stop.is_set()


class StreamEnded(Exception):
    """The peer closed the stream or went silent; time to reconnect."""


class Follower:
    """Keeps one websocket stream flowing into ``on_frames`` until ``stop`` is set.

    ``url`` is called before every connection attempt. ``on_frames`` gets the
    text and binary messages as they arrive, as bytes, in order, in runs (all
    that one read brought in), and may block (that is how back-pressure
    reaches the socket); exceptions it raises are logged and the stream
    reconnects.

    Many followers (one per knot) share a ``pacer``, which spaces their
    connection attempts, and a ``tidy_gate``, held while one tidies up after
    its connection dropped: when all drop at once, the woken threads go
    through one at a time instead of all fighting for the interpreter lock.
    """

    def __init__(
        self,
        *,
        component: str,
        url: Callable[[], str],
        on_frames: Callable[[list[bytes]], None],
        stop: threading.Event,
        backoff: Backoff,
        ids: dict[str, Any] | None = None,
        on_connect: Callable[[], None] | None = None,
        open_socket: Callable[[str], socket.socket] | None = None,
        give_up_on: tuple[type[Exception], ...] = (),
        on_disconnect: Callable[[], None] | None = None,
        ping_every: float = PING_EVERY,
        idle_limit: float = IDLE_LIMIT,
        on_idle: Callable[[], None] | None = None,
        pacer: ConnectPacer | None = None,
        tidy_gate: threading.Lock | None = None,
    ) -> None:
        self._log = logs.get(component)
        self._pacer = pacer
        self._tidy_gate = tidy_gate or contextlib.nullcontext()
        self._ping_every = ping_every
        self._idle_limit = idle_limit
        self._on_idle = on_idle
        self._url = url
        self._on_frames = on_frames
        self._stop = stop
        self._backoff = backoff
        self._ids = ids or {}
        self._on_connect = on_connect
        self._open_socket = open_socket
        self._give_up_on = give_up_on
        self._on_disconnect = on_disconnect
        self._ws: websocket.WebSocket | None = None  # the connection, once it is open
        self._opening: websocket.WebSocket | None = None  # one still in its handshake
        self.connections = 0
        self.frames = 0
        self.last_frame_at: float | None = None  # monotonic
        self._session_frames = 0

    def run(self) -> None:
        """Thread body: returns only once ``stop`` is set."""
        while not self._stop.is_set():
            try:
                self._retrying()(self._session)
            except self._give_up_on as exc:
                self._log.warning("stream abandoned", extra={**self._ids, "reason": str(exc)})
                return
            except Exception:
                # The retry policy gives up only when stopping; anything else
                # escaping here is a bug, logged so the thread survives it.
                if not self._stop.is_set():
                    self._log.exception("stream follower failed", extra=self._ids)
            # Even after a healthy session, wait the shortest delay before
            # reconnecting, so a peer that keeps dropping us is not hammered;
            # jittered, so streams that dropped together (tack's network
            # blipped) do not all wake in the same instant.
            self._stop.wait(self._backoff.initial * (1 + random.random()))

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def close(self) -> None:
        """Abort the current connection (used when a knot is released, and at
        stop), or the one being opened: a peer that never finishes the
        handshake must not hold a stop for the connect timeout."""
        ws = self._ws or self._opening
        raw = ws.sock if ws is not None else None
        if raw is not None:  # shut down, not closed: the reading thread closes it
            with contextlib.suppress(OSError):  # already gone: nothing to wake
                raw.shutdown(socket.SHUT_RDWR)

    def _retrying(self) -> Retrying:
        return retry.until_stopped(
            self._stop,
            retry_if=lambda exc: not isinstance(exc, self._give_up_on),
            initial=self._backoff.initial,
            cap=self._backoff.cap,
            before_sleep=self._log_retry,
        )

    def _log_oversized(self, size: int) -> None:
        self._log.warning(
            "oversized message dropped",
            extra={**self._ids, "size": size, "limit": MAX_MESSAGE_BYTES},
        )

    def _log_retry(self, state: RetryCallState) -> None:
        delay = state.next_action.sleep if state.next_action else 0
        self._log.warning(
            "stream unavailable, reconnecting",
            extra={
                **self._ids,
                "attempt": state.attempt_number,
                "error": retry.last_error(state),
                "retry_in_s": round(delay, 2),
            },
        )

    def _session(self) -> None:
        """One connection. Returns if it was healthy, raises if it was not.

        Raising sends tenacity into backoff; returning resets it, so a healthy
        connection that drops is retried promptly. Healthy means it delivered
        frames or stayed up for HEALTHY_AFTER seconds (quiet knots are normal).
        """
        if self._pacer is not None and not self._pacer.wait_turn(self._stop):
            return  # stopping
        url = self._url()
        options: dict[str, Any] = {}
        if self._open_socket is not None:
            # The caller vets and connects the address itself (and does TLS),
            # so what was checked is exactly what we talk to.
            options["socket"] = self._open_socket(url)
        ws = BoundedWebSocket(on_oversized=self._log_oversized)
        self._opening = ws
        try:
            ws.connect(url, timeout=CONNECT_TIMEOUT, **options)
        except BaseException:
            ws.shutdown()  # its socket, if it got one, is not left open
            raise
        finally:
            self._opening = None
        self._ws = ws
        self.connections += 1
        started = time.monotonic()
        self._session_frames = 0
        self._log.info("stream connected", extra={**self._ids, "url": _short(url)})
        if self._on_connect:
            self._on_connect()
        try:
            self._pump(ws)
            reason = "stopping"
        except (StreamEnded, websocket.WebSocketException, OSError) as exc:
            reason = _describe(exc)
        finally:
            with self._tidy_gate:  # one dropped stream at a time (see the class)
                self._ws = None
                # Closed, not only shut down: websocket-client's abort() leaves the
                # descriptor open (and does nothing once it saw the peer's close),
                # which leaked one socket per reconnect, half-open in CLOSE-WAIT.
                ws.shutdown()
                if self._on_disconnect:
                    self._on_disconnect()
        if self._stop.is_set():
            return
        healthy = self._session_frames > 0 or time.monotonic() - started >= HEALTHY_AFTER
        if not healthy:
            raise StreamEnded(reason)
        self._log.info("stream ended", extra={**self._ids, "reason": reason})

    def _pump(self, ws: BoundedWebSocket) -> None:
        ping_every, idle_limit = self._ping_every, self._idle_limit
        last_heard = last_ping = time.monotonic()
        ws.settimeout(ping_every)
        while not self._stop.is_set():
            try:
                opcode, data = ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                # Only here, not per frame (settimeout is two system calls):
                # waking early, because frames moved last_heard on, is harmless.
                if self._on_idle:
                    self._on_idle()
                now = time.monotonic()
                if now - last_heard > idle_limit:
                    raise StreamEnded(f"silent for {idle_limit:.0f}s") from None
                if now - last_ping >= ping_every:
                    ws.ping()
                    last_ping = now
                due = min(last_ping + ping_every, last_heard + idle_limit)
                ws.settimeout(max(due - now, 0.05))
                continue
            last_heard = time.monotonic()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise StreamEnded(_close_reason(data))
            if opcode not in _MESSAGE_OPCODES:
                continue  # ping/pong: only proof of life
            # The rest of what that read brought in, in order, in one hand-over.
            messages = [data] if data else []  # empty: oversized, dropped and logged
            messages += ws.take_whole_messages()
            if not messages:
                continue
            self.last_frame_at = last_heard  # an event, not a pong
            self.frames += len(messages)
            self._session_frames += len(messages)
            self._on_frames(messages)


_MESSAGE_OPCODES = (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY)


def _close_reason(data: bytes) -> str:
    """A close frame's code and reason, for the log: a knot closes with 1013
    "drain cap reached, reconnect to continue" when a replay is long, which
    is a request to reconnect, not a failure."""
    if len(data) < 2:
        return "closed by peer"
    code = int.from_bytes(data[:2], "big")
    reason = data[2:125].decode("utf-8", errors="replace")
    return f"closed by peer: {code} {reason}".strip()


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    return f"{type(exc).__name__}: {exc}"[:300]


def _short(url: str) -> str:
    """The URL up to the cursor: the jetstream collection list is the same every time."""
    return url.split("&wantedCollections")[0]
