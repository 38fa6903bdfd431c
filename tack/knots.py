"""The knot side of tack: which knot event streams to follow.

The jetstream applier decides *which* knots are wanted; whoever implements
``KnotSubscriptions`` decides *how* to follow them. The split keeps invariant 2
of the design: the applier never waits on the network, so both methods must
return at once and do their connecting on threads of their own.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from . import logs
from .config import is_hostname
from .stream import Backoff, Follower

if TYPE_CHECKING:
    from .intake import Intake

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

# Knot cursors are the knot's own clock (from the TIDs of what we processed);
# resume this far back so events stamped slightly out of order are not lost.
# Replays cost nothing: accepted pipelines are deduplicated on (knot, rkey).
REWIND_NS = 60 * 1_000_000_000
# Save the cursor at most this often per knot (and always on disconnect).
CURSOR_SAVE_SECONDS = 1.0


class KnotRefused(Exception):
    """A knot tack will not connect to (bad name, private address): permanent."""


def vet_knot(knot: str, dev: bool) -> None:
    """Raise KnotRefused unless ``knot`` is a ``hostname[:port]`` we may contact."""
    if not is_hostname(knot):
        raise KnotRefused("not a hostname[:port]")
    if dev:
        return
    host = knot.rsplit(":", 1)[0] if ":" in knot else knot
    if _is_ip_literal(host):
        raise KnotRefused("IP literals are refused outside dev mode")
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        raise KnotRefused("local names are refused outside dev mode")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def open_vetted_socket(url: str, dev: bool, timeout: float = 10.0) -> socket.socket:
    """Resolve, refuse non-public addresses (outside dev), connect, and do TLS
    (for ``wss://`` and ``https://``). Knot streams and did:web fetches use it.

    Connecting to the very address that was checked closes the gap a second
    DNS lookup (rebinding) would open.
    """
    parts = urlsplit(url)
    host, secure = parts.hostname or "", parts.scheme in ("wss", "https")
    port = parts.port or (443 if secure else 80)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [info for info in infos if dev or ipaddress.ip_address(info[4][0]).is_global]
    if not addresses:
        raise KnotRefused(f"{host} resolves only to non-public addresses")
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:  # as create_connection: each in turn
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        try:
            if secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return sock
    assert error is not None
    raise error


class _KnotStream:
    """One knot: a follower thread feeding intake, and that knot's cursor."""

    def __init__(self, consumer: KnotConsumer, knot: str) -> None:
        self.knot = knot
        self._consumer = consumer
        self._cursor_name = f"knot:{knot}"
        self._cursor_ns: int | None = None
        self._saved_at = 0.0
        self._dirty = False
        self.stop = threading.Event()
        self.follower = Follower(
            component="knots",
            url=self._url,
            on_frame=self._on_frame,
            stop=self.stop,
            backoff=consumer.backoff,
            ids={"knot": knot},
            open_socket=lambda url: open_vetted_socket(url, consumer.dev),
            give_up_on=(KnotRefused,),
            on_disconnect=self._save_cursor,
        )
        self.thread = threading.Thread(target=self._run, name=f"knot-{knot}", daemon=True)

    def _run(self) -> None:
        self.follower.run()
        self._save_cursor()

    def _url(self) -> str:
        if self._cursor_ns is None:
            self._cursor_ns = self._consumer.read_cursor(self._cursor_name)
            if self._cursor_ns is None:
                # A knot new to us: from now (the knot would otherwise replay
                # its whole history), kept so a restart resumes from here.
                self._cursor_ns = time.time_ns()
                self._dirty = True
                self._save_cursor()
        scheme = "ws" if self._consumer.dev else "wss"
        return f"{scheme}://{self.knot}/events?cursor={max(self._cursor_ns - REWIND_NS, 0)}"

    def _on_frame(self, frame: str | bytes) -> None:
        knot_micros = self._consumer.intake.handle(self.knot, frame)
        if knot_micros is None:
            return
        cursor = knot_micros * 1000
        if self._cursor_ns is None or cursor > self._cursor_ns:
            self._cursor_ns = cursor
            self._dirty = True
        if self._dirty and time.monotonic() - self._saved_at >= CURSOR_SAVE_SECONDS:
            self._save_cursor()

    def _save_cursor(self) -> None:
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
        intake: Intake,
        *,
        dev: bool,
        backoff: Backoff,
        read_cursor: Callable[[str], int | None],
        write_cursor: Callable[[str, int], None],
    ) -> None:
        self.intake = intake
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

    def add_knot(self, knot: str) -> None:
        try:
            vet_knot(knot, self.dev)
        except KnotRefused as exc:
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
            stream.thread.join(max(deadline - time.monotonic(), 0.1))
