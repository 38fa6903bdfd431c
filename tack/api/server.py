"""The spindle's one port: banner, XRPC, ``/events`` and ``/logs`` websockets.

A threaded HTTP server (a thread per connection that speaks, blocking I/O;
the silent ones wait together in waiting.py). Websocket upgrades are handed
to wsproto's protocol layer (sockets.py), so tack never parses frames
itself, and plain requests (XRPC, CI callbacks) share the port.

An /events subscriber holds no thread: one listening room (listening.py)
answers what every subscriber sends (pings, close), and one broadcaster
thread writes every subscriber's events without blocking, so the runner and
the other subscribers never wait on a slow one. With a few live subscribers,
the thread that committed new events writes them itself first, a thread
wake-up sooner. A subscriber whose socket takes nothing for SEND_TIMEOUT is
dropped. A /logs follower's thread reads its log file and writes to its own
socket.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from .. import __version__, logs
from ..config import is_hostname
from ..pipelines import is_workflow_name
from ..records import is_rkey
from ..statuses import StatusLog
from ..store import Workflow, release_connection
from .follow import LogFollower
from .listening import CLOSE_WAIT, SWEEP_EVERY, ListeningRoom
from .sockets import (
    SEND_TIMEOUT,
    ClientGone,
    ServerWebSocket,
    encode_text_frame,
)
from .waiting import WaitingRoom

log = logs.get("server")

# After a pass that sent a burst (BURST events or more), the broadcaster waits
# this long before looking again, so the rest of the burst goes out as one
# write instead of waking every subscriber per event. After a pass of a few
# events it looks again at once: lingering after every pass held the next
# pipeline's ``pending`` up to 5 ms.
LINGER = 0.005
BURST = 16
HEADER_TIMEOUT = 10.0
# The listening room sees the stop within a sweep, then closes within CLOSE_WAIT.
LISTENING_CLOSE_WAIT = SWEEP_EVERY + CLOSE_WAIT + 1.0
MAX_BODY = 64 * 1024
# The thread that commits status events sends them itself to subscribers
# that are live (at most DIRECT_LAG events behind, nothing queued), when
# there are no more than DIRECT_SUBSCRIBERS: waking the broadcaster thread
# took a third of a millisecond of a pipeline's 3 ms from knot frame to
# ``pending``. More subscribers are left to the broadcaster, so no committer
# (a worker holding up its next workflow) loops over a hundred sockets.
# Not during a burst either (while the broadcaster lingers): it gathers a
# burst into one write per subscriber, where every committer would send its own.
DIRECT_SUBSCRIBERS = 4
DIRECT_LAG = 100

Route = Callable[["Handler", dict[str, list[str]]], None]


class _Subscription:
    def __init__(self, ws: ServerWebSocket, after: int, client: str) -> None:
        self.ws = ws
        self.after = after
        self.client = client
        self.stuck_since: float | None = None
        self.ended = threading.Event()
        # Held while this subscriber is served, by the broadcaster thread or
        # a thread sending what it committed: one sender at a time keeps its
        # frames in order and its position exact. Each subscriber its own, so
        # a live one is not held up while another's backfill batch goes out.
        self.sending = threading.Lock()


class Broadcaster:
    """One thread writes live status events to every /events subscriber.

    Writes never block: a subscriber whose socket is full keeps its position
    and at most one batch of unsent bytes, so it costs the others nothing; if
    it takes nothing for SEND_TIMEOUT it is dropped. One thread (rather than
    one per subscriber) means a burst of events costs one pass, not a hundred
    thread wake-ups competing with the workers that produce the events.
    """

    BATCH = 1000

    def __init__(self, statuses: StatusLog, stop: threading.Event) -> None:
        self._statuses = statuses
        self._stop = stop
        self._lock = threading.Lock()
        self._subscriptions: list[_Subscription] = []
        self._lingering = False  # the broadcaster is gathering a burst
        self._sent_directly = False  # a committing thread sent since the last pass
        self._thread = threading.Thread(target=self._run, name="events-broadcast", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def subscribe(self, ws: ServerWebSocket, after: int, client: str) -> _Subscription:
        subscription = _Subscription(ws, after, client)
        with self._lock:
            self._subscriptions = [*self._subscriptions, subscription]
        self._statuses.nudge()
        return subscription

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def unsubscribe(self, subscription: _Subscription) -> None:
        with self._lock:
            self._subscriptions = [s for s in self._subscriptions if s is not subscription]

    def _run(self) -> None:
        seen = -1
        sent = behind = False
        burst = 0
        backlogged: list[_Subscription] = []
        while not self._stop.is_set():
            if behind:
                pass  # a backfill in progress: the next batch at once, no linger
            elif (sent or self._sent_directly) and burst >= BURST:
                self._lingering = True  # a live burst: let the rest of it gather
                self._stop.wait(LINGER)
                self._lingering = False
            elif backlogged:
                # Someone's socket is full (a backfill outrunning its reader):
                # go on as soon as one drains, and look for live events at
                # least every LINGER. Waiting for events alone stalled a
                # backfill a quarter of a second each time its socket filled.
                _wait_writable(backlogged, LINGER)
            else:
                self._statuses.wait_beyond(seen, 0.25)
            burst = self._statuses.latest_id - max(seen, 0)
            seen = self._statuses.latest_id
            sent = behind = self._sent_directly = False
            backlogged = []
            for subscription in self._subscriptions:
                with subscription.sending:
                    more = self._serve_or_end(subscription)
                if more is None:
                    continue
                sent |= more
                # A backfill: a full batch or more still to go (ids are dense).
                # Anything less is a live burst, which lingering gathers.
                lag = seen - subscription.after
                if subscription.ws.has_backlog:
                    backlogged.append(subscription)
                else:
                    behind |= lag >= self.BATCH

    def send_committed(self) -> None:
        """Run by a thread that has just committed status events, outside
        the status lock: send them to the live subscribers now, when there
        are few. Never waits: a subscriber the broadcaster thread is sending
        to gets these from it too (it was woken for them)."""
        subscriptions = self._subscriptions
        if not subscriptions or len(subscriptions) > DIRECT_SUBSCRIBERS or self._lingering:
            return
        latest = self._statuses.latest_id
        for subscription in subscriptions:
            live = latest - subscription.after <= DIRECT_LAG
            if not live or subscription.ws.has_backlog:
                continue
            if subscription.sending.acquire(blocking=False):
                try:
                    if self._serve_or_end(subscription):
                        self._sent_directly = True
                finally:
                    subscription.sending.release()

    def _serve_or_end(self, subscription: _Subscription) -> bool | None:
        """``_serve``; None when it failed and the subscriber was dropped."""
        try:
            return self._serve(subscription)
        except Exception:
            log.exception("broadcast failed", extra={"client": subscription.client})
            self._end(subscription)
            return None

    def _serve(self, subscription: _Subscription) -> bool:
        """Send what this subscriber can take; True if it has more to come."""
        ws = subscription.ws
        try:
            if ws.send_nowait():
                last, encoded = self._statuses.frames_after(subscription.after, self.BATCH)
                if not encoded:
                    subscription.stuck_since = None
                    return False
                subscription.after = last
                if ws.send_nowait(encoded):
                    subscription.stuck_since = None
                    return True
        except ClientGone:
            self._end(subscription)
            return False
        now = time.monotonic()
        if subscription.stuck_since is None:
            subscription.stuck_since = now
        elif now - subscription.stuck_since > SEND_TIMEOUT:
            log.warning(
                "events subscriber dropped",
                extra={
                    "client": subscription.client,
                    "reason": f"not reading for {SEND_TIMEOUT:.0f}s",
                },
            )
            self._end(subscription)
            return False
        return True

    def _end(self, subscription: _Subscription) -> None:
        self.unsubscribe(subscription)
        subscription.ended.set()
        subscription.ws.abort()


def _wait_writable(subscriptions: list[_Subscription], timeout: float) -> None:
    """Wait until one of these subscribers' sockets takes more, or ``timeout``."""
    poller = select.poll()
    for subscription in subscriptions:
        with contextlib.suppress(ValueError, OSError):  # a socket closed meanwhile
            poller.register(subscription.ws.fileno(), select.POLLOUT)
    poller.poll(timeout * 1000)


class Handler(BaseHTTPRequestHandler):
    server: TackHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = f"tack/{__version__}"
    # Headers and body go out in separate writes; with Nagle on, the body of
    # every answer on a kept-alive connection waits for the client's delayed
    # ACK (about 40 ms).
    disable_nagle_algorithm = True
    content_length = 0
    _head_only = False
    _route_label = "none"  # what /metrics counts this request under

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        self.server.app.on_response(self._route_label, int(code))

    def setup(self) -> None:
        # How long a request's head (and a kept-alive connection between
        # requests) may take: a client that connects and says nothing is let go.
        self.timeout = self.server.header_timeout
        super().setup()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._head_only = True
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        if not self._framing_ok():
            return
        parts = urlsplit(self.path)
        self._route_label = self.server.app.route_label(method, parts.path)
        if method == "GET" and self.content_length and not self._discard_body():
            return
        route = self.server.app.route_for(method, parts.path)
        if route is None:
            allowed = self.server.app.methods_for(parts.path)
            self.close_connection = self.close_connection or bool(self.content_length)
            if allowed:
                self.send_json(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    {"error": "MethodNotAllowed", "message": f"use {', '.join(allowed)}"},
                    {"Allow": ", ".join(allowed)},
                )
            else:
                self.send_json(
                    HTTPStatus.NOT_FOUND, {"error": "NotFound", "message": "no such route"}
                )
            return
        try:
            route(self, parse_qs(parts.query))
        except ClientGone:
            pass
        except Exception:
            log.exception("request failed", extra={"path": parts.path})
            if not getattr(self, "_upgraded", False):
                self.send_json(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    {"error": "InternalError", "message": "internal error"},
                )
        finally:
            self.server.app.release_db()

    def _framing_ok(self) -> bool:
        """Where the body ends must be certain, or the rest of the connection
        could be read as another request (request smuggling): one
        Content-Length of plain digits, and no Transfer-Encoding (tack takes
        none); anything else is refused and the connection closed."""
        lengths = self.headers.get_all("Content-Length") or []
        problem = None
        if self.headers.get_all("Transfer-Encoding"):
            problem = (HTTPStatus.NOT_IMPLEMENTED, "Transfer-Encoding is not supported")
        elif len(lengths) > 1:
            problem = (HTTPStatus.BAD_REQUEST, "more than one Content-Length")
        elif lengths and not _is_length(lengths[0]):
            problem = (HTTPStatus.BAD_REQUEST, "Content-Length must be plain digits")
        if problem is not None:
            self.close_connection = True
            self.send_json(problem[0], {"error": "InvalidRequest", "message": problem[1]})
            return False
        self.content_length = int(lengths[0]) if lengths else 0
        return True

    def _discard_body(self) -> bool:
        """A GET with a body: read it away (small) so it is not taken for the
        next request, or refuse and close."""
        if self.content_length > MAX_BODY:
            self.close_connection = True
            self.send_json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": "InvalidRequest", "message": f"body over {MAX_BODY} bytes"},
            )
            return False
        self.rfile.read(self.content_length)
        return True

    # --- helpers for routes ---------------------------------------------------------

    def send_body(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not self._head_only:
            self.wfile.write(body)

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self.send_body(status, json.dumps(payload).encode(), "application/json", headers)

    def read_json(self, limit: int = MAX_BODY) -> Any:
        """The request body as JSON, or None after answering 4xx."""
        raw = self.read_body(limit)
        return None if raw is None else self.parse_json(raw)

    def read_body(self, limit: int = MAX_BODY) -> bytes | None:
        """The request body (at most ``limit`` bytes), or None after answering 4xx."""
        if "Content-Length" not in self.headers:
            self.send_json(
                HTTPStatus.LENGTH_REQUIRED,
                {"error": "InvalidRequest", "message": "Content-Length required"},
            )
            return None
        length = self.content_length
        if length > limit:
            self.close_connection = True  # the unread body must not be taken for a request
            self.send_json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": "InvalidRequest", "message": f"body over {limit} bytes"},
            )
            return None
        return self.rfile.read(length)

    def parse_json(self, raw: bytes) -> Any:
        """``raw`` as JSON, or None after answering 400."""
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # however it fails, it is not our JSON
            self.send_json(
                HTTPStatus.BAD_REQUEST, {"error": "InvalidRequest", "message": "body is not JSON"}
            )
            return None

    def upgrade(self) -> ServerWebSocket | None:
        """Complete the websocket handshake, or answer 400 and return None."""
        if self.headers.get("Upgrade", "").lower() != "websocket":
            self.send_json(
                HTTPStatus.BAD_REQUEST,
                {"error": "InvalidRequest", "message": "websocket upgrade required"},
            )
            return None
        conn = WSConnection(ConnectionType.SERVER)
        head = self.requestline + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        conn.receive_data((head + "\r\n").encode("latin-1"))
        for event in conn.events():
            if isinstance(event, Request):
                self.wfile.write(conn.send(AcceptConnection()))
                self.wfile.flush()
                self._upgraded = True
                self.close_connection = True
                return ServerWebSocket(self.connection, conn)
        self.send_json(
            HTTPStatus.BAD_REQUEST,
            {"error": "InvalidRequest", "message": "bad websocket handshake"},
        )
        return None

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(
            "http", extra={"request": self.requestline[:200], "client": self.client_address[0]}
        )


def _is_length(value: str) -> bool:
    return value.isascii() and value.isdigit() and len(value) <= 12


class TackHTTPServer(ThreadingHTTPServer):
    """A thread per connection, within bounds.

    - a connection gets its thread once its first bytes arrive: until then
      it waits, with every other silent one, in a ``WaitingRoom``;
    - a listen backlog that absorbs bursts;
    - at most ``max_connections`` open at once, and ``max_per_client`` from one
      address: past either, a new connection gets a short 503 and is closed,
      without a thread;
    - at the descriptor limit, new connections are accepted on a reserved
      descriptor and closed at once (shed), instead of the accept loop
      spinning on EMFILE; the connections already open go on being served.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    max_connections = 4096
    max_per_client = 1024
    header_timeout = HEADER_TIMEOUT
    app: App

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the bind, which may fail and close the server at once.
        self.waiting_room = WaitingRoom(ready=self._give_thread, gone=self.shutdown_request)
        self._kept: set[socket.socket] = set()
        super().__init__(*args, **kwargs)

    def server_activate(self) -> None:
        super().server_activate()
        self._guard = threading.Lock()
        self._open: dict[int, str] = {}
        self._per_client: dict[str, int] = {}
        self._reserve: int | None = os.open(os.devnull, os.O_RDONLY)
        self._shed_logged = 0.0

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._shed()
            raise

    def _shed(self) -> None:
        """Out of descriptors: take one pending connection on the reserve and drop it."""
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        with contextlib.suppress(OSError):
            connection, _ = self.socket.accept()
            connection.close()
        with contextlib.suppress(OSError):
            self._reserve = os.open(os.devnull, os.O_RDONLY)
        if time.monotonic() - self._shed_logged > 10:
            self._shed_logged = time.monotonic()
            log.warning("out of file descriptors: new connections are shed")

    def process_request(self, request, client_address) -> None:
        client = client_address[0] if isinstance(client_address, tuple) else "?"
        with self._guard:
            full = len(self._open) >= self.max_connections
            crowded = self._per_client.get(client, 0) >= self.max_per_client
            if not (full or crowded):
                self._open[request.fileno()] = client
                self._per_client[client] = self._per_client.get(client, 0) + 1
        if full or crowded:
            _refuse(request, "too many connections" if full else "too many from this client")
            self.shutdown_request(request)
            return
        self.waiting_room.admit(request, client_address, self.header_timeout)

    def _give_thread(self, request, client_address) -> None:
        """A connection that spoke: a thread of its own (ThreadingMixIn).

        If no thread can be started, the connection is logged and closed, as
        socketserver does when its own ``process_request`` fails: left
        open, it would count against ``max_connections`` for ever.
        """
        try:
            super().process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def server_close(self) -> None:
        # The room first: once ThreadingMixIn closes, no thread may be given.
        self.waiting_room.close()
        super().server_close()

    def keep(self, request: socket.socket) -> None:
        """Leave ``request`` open when its thread is done: something else
        (the listening room) owns it now, and calls ``release`` at its end."""
        with self._guard:
            self._kept.add(request)

    def release(self, request: socket.socket) -> None:
        """Close a connection that ``keep`` kept."""
        with self._guard:
            self._kept.discard(request)
        self.shutdown_request(request)

    def shutdown_request(self, request) -> None:
        with self._guard:
            if request in self._kept:
                return
            client = self._open.pop(request.fileno(), None) if request.fileno() >= 0 else None
            if client is not None:
                left = self._per_client.get(client, 1) - 1
                if left:
                    self._per_client[client] = left
                else:
                    self._per_client.pop(client, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        log.exception("connection failed", extra={"client": str(client_address)[:100]})


def _refuse(request: socket.socket, reason: str) -> None:
    """A short 503 without reading the request: best effort, never blocking."""
    body = json.dumps({"error": "Unavailable", "message": reason}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        request.setblocking(False)
        request.send(head.encode() + body)


class App:
    """Routes and the state they read."""

    def __init__(
        self,
        hostname: str,
        owner: str,
        statuses: StatusLog,
        follower: LogFollower,
        stop: threading.Event,
    ) -> None:
        self.hostname = hostname
        self.owner = owner
        self.statuses = statuses
        self.follower = follower
        self.stop = stop
        self.broadcaster = Broadcaster(statuses, stop)
        self.listening = ListeningRoom(stop)
        statuses.after_commit = self.broadcaster.send_committed
        self.get_routes: dict[str, Route] = {
            "/": self.banner,
            "/xrpc/sh.tangled.owner": self.owner_route,
            "/.well-known/did.json": self.did_document,
            "/events": self.events,
        }
        self.post_routes: dict[str, Route] = {}
        self.prefix_routes: dict[tuple[str, str], Route] = {("GET", "/logs/"): self.logs}
        self.on_response: Callable[[str, int], None] = lambda route, status: None

    def route_label(self, method: str, path: str) -> str:
        """The route a request is counted under: its path when it is a
        route's, the prefix for prefixed ones, "none" for anything else, so
        the label's values stay few whatever clients ask for."""
        exact = {"GET": self.get_routes, "HEAD": self.get_routes, "POST": self.post_routes}
        if path in exact.get(method, {}):
            return path
        for _, prefix in self.prefix_routes:
            if path.startswith(prefix):
                return prefix
        return "none"

    def route_for(self, method: str, path: str) -> Route | None:
        """The route serving ``method`` on ``path`` (HEAD is served as GET)."""
        exact = {"GET": self.get_routes, "POST": self.post_routes}.get(method, {})
        if path in exact:
            return exact[path]
        for (prefix_method, prefix), route in self.prefix_routes.items():
            if prefix_method == method and path.startswith(prefix):
                return route
        return None

    def methods_for(self, path: str) -> list[str]:
        """The methods ``path`` answers (for a 405's Allow header); [] if none."""
        methods = [m for m in ("GET", "POST") if self.route_for(m, path) is not None]
        return [*methods, "HEAD"] if "GET" in methods else methods

    def release_db(self) -> None:
        """Each connection thread's database handle closes with its request
        (and long-lived ones between their queries)."""
        release_connection()

    def banner(self, handler: Handler, query: dict) -> None:
        text = (
            f"This is tack {__version__}, a Tangled spindle (CI) at {self.hostname}.\n"
            "It runs Tangled pipelines on the CI its operator configured.\n"
        )
        handler.send_body(HTTPStatus.OK, text.encode(), "text/plain; charset=utf-8")

    def owner_route(self, handler: Handler, query: dict) -> None:
        handler.send_json(HTTPStatus.OK, {"owner": self.owner})

    def did_document(self, handler: Handler, query: dict) -> None:
        """This spindle's did:web document, naming its ``#tangled_spindle``
        service, so a PDS can proxy calls to it (protocol-2026 §7)."""
        did = "did:web:" + self.hostname.replace(":", "%3A")
        handler.send_json(
            HTTPStatus.OK,
            {
                "@context": ["https://www.w3.org/ns/did/v1"],
                "id": did,
                "service": [
                    {
                        "id": "#tangled_spindle",
                        "type": "TangledSpindle",
                        "serviceEndpoint": f"https://{self.hostname}",
                    }
                ],
            },
        )

    # --- /events ------------------------------------------------------------------------

    def events(self, handler: Handler, query: dict) -> None:
        cursor = _cursor((query.get("cursor") or [""])[0])
        # "Now" is before the handshake completes: the client may act on the
        # open connection at once, and what that causes must reach it.
        after = self.statuses.first_id_after(cursor) if cursor else self.statuses.latest_id
        # A subscriber may stay for days: it holds no database connection.
        self.release_db()
        ws = handler.upgrade()
        if ws is None:
            return
        client = handler.client_address[0]
        log.info("events subscriber connected", extra={"client": client, "cursor": cursor})
        subscription = self.broadcaster.subscribe(ws, after, client)
        # The broadcaster writes its events; the listening room answers what
        # it sends, so this thread ends here and the connection stays open.
        server, connection = handler.server, handler.connection
        server.keep(connection)

        def gone(reason: str) -> None:
            self.broadcaster.unsubscribe(subscription)
            if not (subscription.ended.is_set() or self.stop.is_set()):
                log.info("events subscriber gone", extra={"client": client, "reason": reason})
            server.release(connection)

        self.listening.watch(ws, gone)

    # --- /logs/<knot>/<rkey>/<workflow> ---------------------------------------------------

    def logs(self, handler: Handler, query: dict) -> None:
        parts = [unquote(part) for part in urlsplit(handler.path).path.split("/")]
        if len(parts) != 5 or not (
            is_hostname(parts[2]) and is_rkey(parts[3]) and is_workflow_name(parts[4])
        ):
            handler.send_json(
                HTTPStatus.BAD_REQUEST,
                {"error": "InvalidRequest", "message": "expected /logs/<knot>/<rkey>/<workflow>"},
            )
            return
        knot, rkey, name = parts[2].lower(), parts[3], parts[4]
        workflow = Workflow.get_or_none(
            (Workflow.knot == knot) & (Workflow.rkey == rkey) & (Workflow.name == name)
        )
        ws = handler.upgrade()
        if ws is None:
            return
        if workflow is None:
            # As the official spindle: a clean close, so no client retries forever.
            ws.close(1000, "unknown workflow")
            return
        follow = self.follower.follow(workflow.id, workflow.name)
        with contextlib.suppress(ClientGone):
            self.follower.stream(ws, [follow], _text_frame, "workflow finished")


def _text_frame(line: bytes, _workflow: str) -> bytes:
    """A log line as /logs sends it: the JSON line itself, in a text frame."""
    return encode_text_frame(line.decode("utf-8", errors="replace"))


def _cursor(raw: str) -> int:
    """An /events cursor: unix ns as ASCII digits. Anything else (a Unicode
    digit, a number past int64, garbage) streams from now, as the official
    spindle does."""
    if raw.isascii() and raw.isdigit() and len(raw) <= 19 and int(raw) < 2**63:
        return int(raw)
    return 0


class Server:
    def __init__(self, httpd: TackHTTPServer, app: App) -> None:
        """``httpd`` is already bound (startup.bind_listener): the port is
        held before anything else happens."""
        self.httpd = httpd
        self.httpd.app = app
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.httpd.app.broadcaster.start()
        self._thread.start()
        log.info("listening", extra={"address": self.httpd.server_address[0], "port": self.port})

    def stop(self) -> None:
        self.httpd.shutdown()
        # Subscribers get their close frames (the stop event was set first).
        self.httpd.app.listening.join(LISTENING_CLOSE_WAIT)
        self.httpd.server_close()
