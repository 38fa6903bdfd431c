"""Local stand-ins for the network peers tack talks to, speaking protocol.md.

These are real websocket servers on 127.0.0.1 (the ``websockets`` library),
not mocks: tack connects to them exactly as it would to jetstream or a knot.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.server import ServerProtocol
from websockets.sync.server import ServerConnection, serve

HOSTNAME = "spindle.test"


def plc_did(name: str) -> str:
    """A well-formed did:plc (24 base32 characters) that reads as ``name``."""
    return "did:plc:" + name.ljust(24, "2")


OWNER = plc_did("owner")
BASE_TIME_US = 1_725_000_000_000_000
MEMBER = "sh.tangled.spindle.member"
REPO = "sh.tangled.repo"
COLLABORATOR = "sh.tangled.repo.collaborator"


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> object:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


# --- jetstream events ----------------------------------------------------------


class Clock:
    """Strictly increasing jetstream time_us values, 1 ms apart."""

    def __init__(self, start: int = BASE_TIME_US) -> None:
        self._counter = itertools.count(start, 1000)

    def __call__(self) -> int:
        return next(self._counter)


def commit(
    clock: Clock, did: str, collection: str, rkey: str, operation: str, record: dict | None = None
) -> dict:
    body: dict = {
        "rev": "3l3qo2vutsw2b",
        "operation": operation,
        "collection": collection,
        "rkey": rkey,
    }
    if operation != "delete":
        body["cid"] = "bafyreibogus"
        body["record"] = {"$type": collection, **(record or {})}
    return {"did": did, "time_us": clock(), "kind": "commit", "commit": body}


def member(subject: str, instance: str = HOSTNAME) -> dict:
    return {"subject": subject, "instance": instance, "createdAt": "2026-01-01T00:00:00Z"}


def repo(name: str, knot: str, spindle: str | None = HOSTNAME, repo_did: str | None = None) -> dict:
    record = {"name": name, "knot": knot, "createdAt": "2026-01-01T00:00:00.123Z"}
    if spindle is not None:
        record["spindle"] = spindle
    if repo_did is not None:
        record["repoDid"] = repo_did
    return record


def collaborator(subject: str, repo_uri: str) -> dict:
    return {"subject": subject, "repo": repo_uri, "createdAt": "2026-01-01T00:00:00Z"}


def account_deleted(clock: Clock, did: str) -> dict:
    return {
        "did": did,
        "time_us": clock(),
        "kind": "account",
        "account": {
            "active": False,
            "did": did,
            "seq": 1,
            "status": "deleted",
            "time": "2026-01-01T00:00:00Z",
        },
    }


@dataclass
class _Frame:
    time_us: int
    collection: str | None  # None: sent whatever the filter (identity, account, garbage)
    payload: str


@dataclass
class Subscription:
    path: str
    cursor: int | None
    wanted: list[str]
    at: float = field(default_factory=time.monotonic)


class _Droppable:
    """Connections serve until the generation they started in is over."""

    _server: Any  # an http.server or a websockets server: both shut down

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def drop(self) -> None:
        """Close every open connection now."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def close(self) -> None:
        self.drop()
        self._server.shutdown()


class _StandinServer(_Droppable):
    """A websocket server on 127.0.0.1 whose connections can be dropped on command."""

    def __init__(self) -> None:
        super().__init__()
        self._server = serve(
            self._handle, "127.0.0.1", 0, compression=None, ping_interval=None, max_size=None
        )
        self.port = self._server.socket.getsockname()[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _handle(self, conn: ServerConnection) -> None:
        raise NotImplementedError


class JetstreamStandin(_StandinServer):
    """Serves prepared events like jetstream's v1 ``/subscribe``.

    Honours ``wantedCollections`` and ``cursor`` (events with time_us >= cursor);
    without a cursor it serves from the start when ``replay_without_cursor``,
    else only events added after the connection (live tail, like jetstream).
    """

    def __init__(self, replay_without_cursor: bool = True) -> None:
        self.replay_without_cursor = replay_without_cursor
        self._frames: list[_Frame] = []
        self.subscriptions: list[Subscription] = []
        self.sent = 0
        super().__init__()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/subscribe"

    def add(self, *events: dict) -> None:
        with self._cond:
            for event in events:
                collection = event.get("commit", {}).get("collection")
                self._frames.append(_Frame(event["time_us"], collection, json.dumps(event)))
            self._cond.notify_all()

    def add_raw(self, payload: str, time_us: int) -> None:
        """A frame sent verbatim to every subscriber (garbage, bad records)."""
        with self._cond:
            self._frames.append(_Frame(time_us, None, payload))
            self._cond.notify_all()

    def _handle(self, conn: ServerConnection) -> None:
        query = parse_qs(urlsplit(conn.request.path).query)
        wanted = query.get("wantedCollections", [])
        cursor = int(query["cursor"][0]) if "cursor" in query else None
        with self._cond:
            self.subscriptions.append(Subscription(conn.request.path, cursor, wanted))
            generation = self._generation
            if cursor is not None:
                index = next(
                    (i for i, f in enumerate(self._frames) if f.time_us >= cursor),
                    len(self._frames),
                )
            else:
                index = 0 if self.replay_without_cursor else len(self._frames)
        while True:
            with self._cond:
                while self._generation == generation and index >= len(self._frames):
                    self._cond.wait(1.0)
                if self._generation != generation:
                    break
                pending = self._frames[index:]
            index += len(pending)
            try:
                for frame in pending:
                    if frame.collection is None or frame.collection in wanted:
                        conn.send(frame.payload)
                        self.sent += 1
            except Exception:
                return
        conn.close()


# --- tack as a real process -----------------------------------------------------


DEFAULT_TOML = """
[backends.dummy]
type = "dummy"

[backends.shell]
type = "shell"
workspace_root = "{tmp}/workspaces"
timeout = 60
kill_grace = 1
"""


def tack_env(tmp: Path, jetstream_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a tack under test, with a tack.toml for the dummy
    and shell backends unless ``TACK_CONFIG`` is given."""
    toml = tmp / "tack.toml"
    if "TACK_CONFIG" not in overrides and not toml.exists():
        toml.write_text(DEFAULT_TOML.format(tmp=tmp))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "SPINDLE_SERVER_HOSTNAME": HOSTNAME,
        "SPINDLE_SERVER_OWNER": OWNER,
        "SPINDLE_SERVER_DB_PATH": str(tmp / "spindle.db"),
        "SPINDLE_SERVER_JETSTREAM_ENDPOINT": jetstream_url,
        "SPINDLE_SERVER_LISTEN_ADDR": "127.0.0.1:0",
        "SPINDLE_SERVER_LOG_DIR": str(tmp / "logs"),
        "SPINDLE_SERVER_DEV": "true",
        # No test reaches the internet: identities resolve only where a test
        # serves them (a backfill at start finds nothing here, at once).
        "SPINDLE_SERVER_PLC_URL": "http://127.0.0.1:9",
        "TACK_RECONNECT_MIN_SECONDS": "0.05",
        "TACK_RECONNECT_MAX_SECONDS": "0.5",
        "TACK_CONFIG": str(toml),
    }
    env.update(overrides)
    return env


class TackProcess:
    """``python -m tack`` in a subprocess, its stderr (JSON logs) kept in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, prefix: list[str] = ()) -> None:
        """``prefix``: a command to run tack under (e.g. ``prlimit --fsize=N``)."""
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tack"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def kill(self) -> None:
        self.proc.kill()
        self.wait()

    def terminate(self, timeout: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def wait_for_log(self, message: str, timeout: float = 20.0) -> dict:
        """The first log line with ``message`` (waiting for it to be written)."""

        def find() -> dict | None:
            return next((line for line in self.log_lines() if line["message"] == message), None)

        return wait_until(find, timeout, what=f"log line {message!r}")

    def log_lines(self) -> list[dict]:
        # Only complete lines: the process may be mid-write.
        text = self.log_path.read_text()
        return [json.loads(raw) for raw in text[: text.rfind("\n") + 1].splitlines()]


# --- reading the store from outside ---------------------------------------------


def db_rows(db_path: Path | str) -> dict[str, list[tuple]]:
    """Every record row, sorted: a whole-state snapshot to compare."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        return {
            table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall())
            for table in ("member", "repo", "collaborator")
        }
    finally:
        conn.close()


def db_cursor(db_path: Path | str, name: str = "jetstream") -> int | None:
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        row = conn.execute("SELECT value FROM cursor WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]
    except sqlite3.OperationalError:
        return None  # schema not created yet
    finally:
        conn.close()


# --- knots -------------------------------------------------------------------------


def tid_now(offset_us: int = 0) -> str:
    from tack import tid

    return tid.encode(time.time_ns() // 1000 + offset_us, 7)


def push_pipeline(
    knot: str,
    owner: str,
    repo_name: str,
    workflows: list[tuple[str, str, str]],
    sha: str = "a" * 40,
) -> dict:
    """A sh.tangled.pipeline record for a push; workflows are (name, engine, raw)."""
    return {
        "triggerMetadata": {
            "kind": "push",
            "repo": {"knot": knot, "did": owner, "repo": repo_name, "defaultBranch": "main"},
            "push": {"ref": "refs/heads/main", "oldSha": "0" * 40, "newSha": sha},
        },
        "workflows": [
            {
                "name": name,
                "engine": engine,
                "raw": raw,
                "clone": {"skip": True, "depth": 1, "submodules": False, "tags": False},
            }
            for name, engine, raw in workflows
        ],
    }


class KnotStandin(_Droppable):
    """A knot on one loopback port, as the real one: ``/events`` (protocol §2)
    replays events newer than the cursor (unix ns, the knot's clock) and then
    streams live ones; every other path serves git repositories over smart
    HTTP through ``git http-backend``, so a workflow's clone URL works.

    The websocket side uses the ``websockets`` library's sans-I/O protocol
    under a threaded HTTP server, since git's smart HTTP needs POST.
    """

    def __init__(
        self, git_root: Path | None = None, current: bool = False, drain_cap: int | None = None
    ) -> None:
        """``current``: speak today's stream (protocol-2026 §5.1): frames carry
        ``created`` (unix ns). ``drain_cap``: after that many replayed frames,
        close with 1013 "drain cap reached, reconnect to continue", as a
        current knot does after 1000 batches."""
        super().__init__()
        self.git_root = git_root
        self.current = current
        self.drain_cap = drain_cap
        self._events: list[tuple[int, str]] = []  # (created ns, frame text)
        self.cursors: list[int | None] = []
        self.open_connections = 0
        self.drain_closes = 0
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == "/events":
                    standin._events_stream(self)
                elif path == "/xrpc/sh.tangled.repo.getDefaultBranch":
                    standin._default_branch(self)
                else:
                    standin._git(self)

            def do_POST(self) -> None:
                standin._git(self)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def name(self) -> str:
        """The knot's name as repo records and pipelines carry it."""
        return f"127.0.0.1:{self.port}"

    def send(self, rkey: str, nsid: str, event: object) -> None:
        with self._cond:
            created = time.time_ns()
            frame = {"rkey": rkey, "nsid": nsid, "event": event}
            if self.current:
                frame["created"] = created
            self._events.append((created, json.dumps(frame)))
            self._cond.notify_all()

    def send_ref_update(
        self,
        repo_did: str,
        new_sha: str,
        *,
        ref: str = "refs/heads/main",
        old_sha: str = "0" * 40,
        owner: str = OWNER,
        committer: str = OWNER,
        changed_files: list[str] | None = None,
        push_options: list[str] | None = None,
        rkey: str | None = None,
    ) -> str:
        """A push as a current knot announces it (protocol-2026 §5.2); its rkey."""
        rkey = rkey or tid_now()
        event: dict = {
            "$type": "",
            "ref": ref,
            "committerDid": committer,
            "ownerDid": owner,
            "repo": repo_did,
            "oldSha": old_sha,
            "newSha": new_sha,
            "meta": None
            if new_sha == "0" * 40
            else {"isDefaultRef": ref == "refs/heads/main", "commitCount": {"byEmail": []}},
        }
        if new_sha != "0" * 40:
            event["changedFiles"] = changed_files or []
        if push_options is not None:
            event["pushOptions"] = push_options
        self.send(rkey, "sh.tangled.git.refUpdate", event)
        return rkey

    def _default_branch(self, handler: BaseHTTPRequestHandler) -> None:
        """``sh.tangled.repo.getDefaultBranch``: the bare repository's HEAD branch."""
        repo = parse_qs(urlsplit(handler.path).query).get("repo", [""])[0]
        head = subprocess.run(
            ["git", "symbolic-ref", "--short", "HEAD"],
            cwd=(self.git_root or Path("/nonexistent")) / repo,
            capture_output=True,
            text=True,
            check=False,
        )
        ok = head.returncode == 0
        body = json.dumps({"name": head.stdout.strip()} if ok else {"error": "RepoNotFound"})
        handler.send_response(200 if ok else 404)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body.encode())

    def send_pipeline(self, record: dict, rkey: str | None = None) -> str:
        rkey = rkey or tid_now()
        self.send(rkey, "sh.tangled.pipeline", record)
        return rkey

    def send_raw(self, frame: str) -> None:
        with self._cond:
            self._events.append((time.time_ns(), frame))
            self._cond.notify_all()

    # --- /events ---------------------------------------------------------------------

    def _events_stream(self, handler: BaseHTTPRequestHandler) -> None:
        protocol = ServerProtocol(max_size=None)
        head = (
            handler.requestline
            + "\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in handler.headers.items())
        )
        protocol.receive_data((head + "\r\n").encode("latin-1"))
        request = protocol.events_received()[0]
        protocol.send_response(protocol.accept(request))
        sock = handler.connection
        sock.sendall(b"".join(protocol.data_to_send()))
        handler.close_connection = True
        query = parse_qs(urlsplit(handler.path).query)
        cursor = int(query["cursor"][0]) if "cursor" in query else None
        with self._cond:
            self.cursors.append(cursor)
            self.open_connections += 1
            generation = self._generation
            index = 0
            if cursor is not None:
                while index < len(self._events) and self._events[index][0] <= cursor:
                    index += 1
            backlog_end = len(self._events)
        try:
            if self.drain_cap is not None and backlog_end - index > self.drain_cap:
                for _, frame in self._events[index : index + self.drain_cap]:
                    protocol.send_text(frame.encode())
                protocol.send_close(1013, "drain cap reached, reconnect to continue")
                sock.sendall(b"".join(protocol.data_to_send()))
                self.drain_closes += 1
                return
            while True:
                with self._cond:
                    while self._generation == generation and index >= len(self._events):
                        self._cond.wait(0.2)
                        if _peer_closed(sock):
                            return
                    if self._generation != generation:
                        protocol.send_close(1001, "dropped")
                        sock.sendall(b"".join(protocol.data_to_send()))
                        return
                    pending = self._events[index:]
                index += len(pending)
                for _, frame in pending:
                    protocol.send_text(frame.encode())
                sock.sendall(b"".join(protocol.data_to_send()))
        except OSError:
            return
        finally:
            with self._cond:
                self.open_connections -= 1

    # --- git smart HTTP ----------------------------------------------------------------

    def _git(self, handler: BaseHTTPRequestHandler) -> None:
        if self.git_root is None:
            handler.send_error(404)
            return
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.git_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": parts.path,
            "QUERY_STRING": parts.query,
            "REQUEST_METHOD": handler.command,
            "CONTENT_TYPE": handler.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_GIT_PROTOCOL": handler.headers.get("Git-Protocol", ""),
            # git gzips request bodies over 1 KiB; http-backend inflates them.
            "HTTP_CONTENT_ENCODING": handler.headers.get("Content-Encoding", ""),
        }
        result = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        )
        head, _, payload = result.stdout.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers.append((key, value.strip()))
        handler.send_response(status)
        for key, value in headers:
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)


def _peer_closed(sock: socket.socket) -> bool:
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def make_git_repo(root: Path, owner: str, name: str, files: dict[str, str]) -> str:
    """A bare repository at ``root/owner/name`` holding one commit of ``files``;
    its sha. A second commit follows, so fetching the first by sha means something."""
    work = root / "_work" / name
    work.mkdir(parents=True)
    git = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    for path, content in files.items():
        (work / path).write_text(content)
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "first"], cwd=work, check=True)
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=work, check=True, capture_output=True, text=True
    ).stdout.strip()
    (work / "LATER").write_text("a later commit\n")
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "second"], cwd=work, check=True)
    bare = root / owner / name
    bare.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    subprocess.run(["git", "config", "uploadpack.allowAnySHA1InWant", "true"], cwd=bare, check=True)
    return sha


class GitRepo:
    """A repository served by a knot stand-in at ``<git_root>/<path>`` (a repo DID
    today, ``owner/name`` before), configured as a knot's is for a spindle's
    partial fetches; commits are made in a work tree and pushed to it."""

    GIT = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com"]

    def __init__(self, git_root: Path, path: str, files: dict[str, str]) -> None:
        self.work = git_root / "_work" / path.replace(":", "_").replace("/", "_")
        self.bare = git_root / path
        self.work.mkdir(parents=True)
        self._git("init", "-q", "-b", "main", ".")
        self.bare.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.bare)], check=True)
        for key in ("uploadpack.allowFilter", "uploadpack.allowAnySHA1InWant"):
            subprocess.run(["git", "config", key, "true"], cwd=self.bare, check=True)
        self._git("remote", "add", "origin", str(self.bare))
        self.first = self.commit(files)

    def _git(self, *args: str) -> str:
        result = subprocess.run(
            [*self.GIT, *args], cwd=self.work, check=True, capture_output=True, text=True
        )
        return result.stdout.strip()

    def commit(
        self, files: dict[str, str | None], branch: str = "main", message: str = "change"
    ) -> str:
        """Write (or, for None, delete) ``files`` on ``branch``, push; the new sha."""
        if self._git("rev-parse", "--all"):  # past the first commit
            exists = bool(self._git("branch", "--list", branch))
            self._git("checkout", "-q", *([] if exists else ["-b"]), branch)
        for name, content in files.items():
            target = self.work / name
            if content is None:
                target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        self._git("add", "-A")
        self._git("commit", "-q", "--allow-empty", "-m", message)
        self._git("push", "-q", "origin", branch)
        return self._git("rev-parse", "HEAD")

    def tag(self, name: str) -> str:
        self._git("tag", name)
        self._git("push", "-q", "origin", name)
        return self._git("rev-parse", "HEAD")

    def format_patch(self, base: str, head: str) -> bytes:
        """``git format-patch`` text of base..head, as a pull request round holds it."""
        result = subprocess.run(
            [*self.GIT, "format-patch", "--stdout", f"{base}..{head}"],
            cwd=self.work,
            check=True,
            capture_output=True,
        )
        return result.stdout


def direct_job(raw: str, engine: str, secrets: dict | None = None, workflow_id: int = 1):
    """A ``Job`` for calling a backend straight (no scheduler): one workflow
    ``ci.yml`` of a push pipeline, its clone skipped."""
    import threading as _threading

    from tack.backends import Job
    from tack.pipelines import tangled_env
    from tack.workflow import parse

    record = push_pipeline("knot.test", OWNER, "hello", [("ci.yml", engine, raw)])
    return Job(
        workflow_id=workflow_id,
        knot="knot.test",
        rkey="3l",
        name="ci.yml",
        engine=engine,
        pipeline_uri="at://x",
        pipeline=record,
        workflow={"name": "ci.yml", "engine": engine, "raw": raw, "clone": {"skip": True}},
        spec=parse(raw),
        env=tangled_env(record, "at://x", True),
        secrets=secrets or {},
        cancel=_threading.Event(),
    )


def run_direct(backend, job, logs_dir: Path):
    """Run ``job`` on ``backend`` with a real workflow log in ``logs_dir``;
    (outcome, the log's text)."""
    from tack.worklogs import LogBook

    book = LogBook(logs_dir)
    log = book.open(job.workflow_id, job.secrets.values())
    outcome = backend.run(job, log)
    log.close()
    return outcome, book.path(job.workflow_id).read_text()


def fake_podman(folder: Path) -> Path:
    """A ``podman`` that does nothing, in ``folder``: for what only looks
    for the runtime on PATH."""
    fake = folder / "podman"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    return fake
