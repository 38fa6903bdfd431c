"""The spindle's one port: banner, XRPC, ``/events`` and ``/logs`` websockets.

A threaded HTTP server (a thread per connection, blocking I/O). Websocket
upgrades are handed to wsproto's protocol layer, so tack never frames bytes
itself, and plain requests (XRPC, CI callbacks) share the port.

An /events subscriber's thread only reads (pings, close); one broadcaster
thread writes every subscriber's events without blocking, so the runner and
the other subscribers never wait on a slow one. A subscriber whose socket
takes nothing for SEND_TIMEOUT is dropped. A /logs follower's thread reads
its log file and writes to its own socket.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from websocket import ABNF
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request

from .. import __version__, logs
from ..config import is_hostname
from ..pipelines import is_workflow_name
from ..records import is_rkey
from ..statuses import FINAL, StatusLog
from ..store import Workflow
from ..worklogs import LogBook, read_lines

log = logs.get("server")

PING_EVERY = 30.0
# After sending, a subscriber waits this long before looking again, so a burst
# of events goes out as one write instead of waking every subscriber per event.
# The first event after a quiet spell is still sent at once.
LINGER = 0.005
SEND_TIMEOUT = 10.0
SEND_BUFFER = 256 * 1024
MAX_BODY = 64 * 1024

Route = Callable[["Handler", dict[str, list[str]]], None]


class ClientGone(Exception):
    """The websocket peer closed, or was dropped for not reading."""


class ClientStalled(ClientGone):
    """The peer stopped reading: a send could not finish within SEND_TIMEOUT."""


class ServerWebSocket:
    """The server side of one upgraded connection.

    Writes come from two threads: the connection's own (control frames,
    /logs lines) and the broadcaster (live /events). Every write holds
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

    def send_encoded(self, data: bytes) -> None:
        """Frames already encoded by ``encode_text_frames``; blocks until written."""
        self._send(data)

    def send_nowait(self, data: bytes = b"") -> bool:
        """Write what the socket takes now and keep the rest; True once nothing is left."""
        with self._write_lock:
            self._backlog += data
            while self._backlog:
                try:
                    sent = self._sock.send(self._backlog)
                except BlockingIOError:
                    return False
                except OSError as exc:
                    self.open = False
                    raise ClientGone(f"send failed: {exc}") from None
                del self._backlog[:sent]
            return True

    def ping_if_due(self) -> None:
        if time.monotonic() - self._last_ping >= PING_EVERY:
            self._send_event(Ping())
            self._last_ping = time.monotonic()

    def poll(self, timeout: float = 0.0) -> None:
        """Answer what the peer sent (pings, close), waiting up to ``timeout`` for it;
        raise ClientGone once it closed."""
        while self.open and select.select([self._sock], [], [], timeout)[0]:
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

    def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.open:
            return
        self.open = False
        try:
            self._send_event(CloseConnection(code=code, reason=reason))
            if select.select([self._sock], [], [], 1.0)[0]:
                self._sock.recv(1024)  # the peer's closing handshake, best effort
        except (OSError, ClientGone):
            pass

    def abort(self) -> None:
        """Cut the connection now (a dropped subscriber); its reader wakes and ends."""
        self.open = False
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _send_event(self, event: Any) -> None:
        with self._conn_lock:
            data = self._conn.send(event)
        self._send(data)

    def _send(self, data: bytes) -> None:
        with self._write_lock:
            if self._backlog:
                # Behind a partly written frame: queue after it for the
                # broadcaster to flush, keeping frame boundaries intact.
                self._backlog += data
                return
            self._write_all(memoryview(data))

    def _write_all(self, view: memoryview) -> None:
        """Blocking write with a deadline: a peer that reads nothing for
        SEND_TIMEOUT is stalled, and we stop waiting for it."""
        deadline = time.monotonic() + SEND_TIMEOUT
        while view:
            try:
                view = view[self._sock.send(view) :]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                self.open = False
                raise ClientGone(f"send failed: {exc}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                self.open = False
                raise ClientStalled(f"not reading for {SEND_TIMEOUT:.0f}s")
            select.select([], [self._sock], [], left)


class _Subscription:
    def __init__(self, ws: ServerWebSocket, after: int, client: str) -> None:
        self.ws = ws
        self.after = after
        self.client = client
        self.stuck_since: float | None = None
        self.ended = threading.Event()


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
        self._thread = threading.Thread(target=self._run, name="events-broadcast", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def subscribe(self, ws: ServerWebSocket, after: int, client: str) -> _Subscription:
        subscription = _Subscription(ws, after, client)
        with self._lock:
            self._subscriptions = [*self._subscriptions, subscription]
        self._statuses.nudge()
        return subscription

    def unsubscribe(self, subscription: _Subscription) -> None:
        with self._lock:
            self._subscriptions = [s for s in self._subscriptions if s is not subscription]

    def _run(self) -> None:
        seen = -1
        busy = False
        while not self._stop.is_set():
            if busy:
                self._stop.wait(LINGER)  # let a burst gather into one write
            else:
                self._statuses.wait_beyond(seen, 0.25)
            seen = self._statuses.latest_id
            busy = False
            for subscription in self._subscriptions:
                try:
                    busy |= self._serve(subscription)
                except Exception:
                    log.exception("broadcast failed", extra={"client": subscription.client})
                    self._end(subscription)

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


def _server_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (server to client), so one encoding serves
    every subscriber. websocket-client's frame codec is pure and about twice
    as fast as wsproto's stateful one, which matters at a million log lines."""
    return ABNF(1, 0, 0, 0, opcode, 0, payload).format()


def encode_text_frame(text: str) -> bytes:
    return _server_frame(ABNF.OPCODE_TEXT, text.encode("utf-8"))


def encode_binary_frame(data: bytes) -> bytes:
    return _server_frame(ABNF.OPCODE_BINARY, data)


def encode_text_frames(texts: list[str]) -> bytes:
    return b"".join(encode_text_frame(text) for text in texts)


class Handler(BaseHTTPRequestHandler):
    server: TackHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = f"tack/{__version__}"
    # Headers and body go out in separate writes; with Nagle on, the body of
    # every answer on a kept-alive connection waits for the client's delayed
    # ACK (about 40 ms).
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._dispatch(self.server.app.get_routes)

    def do_POST(self) -> None:
        self._dispatch(self.server.app.post_routes)

    def _dispatch(self, routes: dict[str, Route]) -> None:
        parts = urlsplit(self.path)
        route = routes.get(parts.path)
        if route is None:
            for (method, prefix), prefixed in self.server.app.prefix_routes.items():
                if method == self.command and parts.path.startswith(prefix):
                    route = prefixed
                    break
        if route is None:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": "NotFound", "message": "no such route"})
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
        self.wfile.write(body)

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self.send_body(status, json.dumps(payload).encode(), "application/json", headers)

    def read_json(self, limit: int = MAX_BODY) -> Any:
        """The request body as JSON, or None after answering 4xx."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.send_json(
                HTTPStatus.LENGTH_REQUIRED,
                {"error": "InvalidRequest", "message": "Content-Length required"},
            )
            return None
        if not 0 <= length <= limit:
            self.close_connection = True  # the unread body must not be taken for a request
            self.send_json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": "InvalidRequest", "message": f"body over {limit} bytes"},
            )
            return None
        try:
            return json.loads(self.rfile.read(length))
        except ValueError:
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


class TackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: App


class App:
    """Routes and the state they read."""

    def __init__(
        self,
        hostname: str,
        owner: str,
        statuses: StatusLog,
        logbook: LogBook,
        db: Any,
        stop: threading.Event,
    ) -> None:
        self.hostname = hostname
        self.owner = owner
        self.statuses = statuses
        self.logbook = logbook
        self.db = db
        self.stop = stop
        self.broadcaster = Broadcaster(statuses, stop)
        self.get_routes: dict[str, Route] = {
            "/": self.banner,
            "/xrpc/sh.tangled.owner": self.owner_route,
            "/.well-known/did.json": self.did_document,
            "/events": self.events,
        }
        self.post_routes: dict[str, Route] = {}
        self.prefix_routes: dict[tuple[str, str], Route] = {("GET", "/logs/"): self.logs}

    def release_db(self) -> None:
        """Each connection thread's database handle closes with its request."""
        if not self.db.is_closed():
            self.db.close()

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
        raw_cursor = (query.get("cursor") or ["0"])[0]
        if not raw_cursor.isdigit() or len(raw_cursor) > 20:
            handler.send_json(
                HTTPStatus.BAD_REQUEST,
                {"error": "InvalidRequest", "message": "cursor must be unix ns"},
            )
            return
        cursor = int(raw_cursor)
        ws = handler.upgrade()
        if ws is None:
            return
        after = self.statuses.first_id_after(cursor) if cursor else self.statuses.latest_id
        client = handler.client_address[0]
        log.info("events subscriber connected", extra={"client": client, "cursor": cursor})
        subscription = self.broadcaster.subscribe(ws, after, client)
        # This thread only reads (pings, close); the broadcaster writes events.
        try:
            while not self.stop.is_set() and not subscription.ended.is_set():
                ws.poll(timeout=1.0)
                ws.ping_if_due()
            if not subscription.ended.is_set():
                ws.close(1001, "spindle shutting down")
        except ClientGone as exc:
            if not subscription.ended.is_set():
                log.info("events subscriber gone", extra={"client": client, "reason": str(exc)})
        finally:
            self.broadcaster.unsubscribe(subscription)

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
        self._follow_log(ws, workflow.id)

    def _follow_log(self, ws: ServerWebSocket, workflow_id: int) -> None:
        path = self.logbook.path(workflow_id)
        offset = 0
        statuses_seen = -1
        try:
            while not self.stop.is_set():
                ws.poll()
                version = self.logbook.version
                lines, offset = read_lines(path, offset)
                if lines:
                    ws.send_encoded(encode_text_frames(lines))
                    continue
                # Any workflow's log line wakes every follower; the store is
                # asked about this one's status only when some status moved.
                if statuses_seen != self.statuses.latest_id:
                    statuses_seen = self.statuses.latest_id
                    if Workflow.get_by_id(workflow_id).status in FINAL:
                        # Lines are written before the final status commits, so
                        # one more read after seeing it finds everything.
                        lines, offset = read_lines(path, offset)
                        if lines:
                            ws.send_encoded(encode_text_frames(lines))
                        ws.close(1000, "workflow finished")
                        return
                ws.ping_if_due()
                self.logbook.wait(version, 1.0)
            ws.close(1001, "spindle shutting down")
        except ClientGone:
            pass


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
        self.httpd.server_close()
