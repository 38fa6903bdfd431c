"""Facing the open internet: the security probe's findings, each reproduced.

Connection floods stay on 127.0.0.1 and are bounded in count and time.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import shutil
import socket
import sqlite3
import struct
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import websocket

from tack.net import is_public

from .appview_client import AppviewClient
from .identities import DocumentHost, Identity
from .spindle_clients import EventsClient, read_log
from .standins import OWNER, TackProcess, plc_did, push_pipeline, tack_env, wait_until

STEPS = "steps:\n  - name: One\n    command: echo one\n"
SLOW = "steps:\n  - name: Wait\n    command: wait\ndummy:\n  delay: 30\n"


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        chunks = []
        try:
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def statuses_in(answer: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


@pytest.fixture
def tack(served_knot):
    return served_knot[0]


@pytest.fixture
def served_knot(serve_repo, knot):
    """tack (in-process) serving OWNER's repo ``hello`` on the knot stand-in."""
    return serve_repo(), knot


# --- 1. connections --------------------------------------------------------------------------


def test_silent_connections_are_let_go_and_caps_answer_503(tack):
    port = tack.server.port
    tack.httpd.header_timeout = 0.5
    tack.httpd.max_per_client = 20
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        refused = raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses_in(refused) == [503] and b"too many from this client" in refused
        time.sleep(1.0)  # past the header timeout: the silent ones are closed
        for conn in silent:
            conn.settimeout(2)
            assert conn.recv(1) == b"", "a silent connection was let go"
        answer = raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert statuses_in(answer) == [200]
    finally:
        for conn in silent:
            conn.close()


def _connection_threads() -> int:
    return sum("process_request_thread" in thread.name for thread in threading.enumerate())


def test_silent_connections_hold_no_thread_and_may_all_leave_at_once(tack):
    """A connection gets a thread once it speaks (api/waiting.py). Silent
    ones wait together on one thread, so when hundreds leave at once (some
    with a reset) no crowd of threads wakes to fight over the GIL, and the
    server still answers."""
    port, threads_before = tack.server.port, _connection_threads()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
    wait_until(lambda: tack.httpd.waiting_room.waiting == 300, what="all 300 waiting")
    assert _connection_threads() - threads_before < 5, "silent connections took threads"

    late = silent.pop()  # speaks at last, in pieces: it gets a thread and an answer
    late.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    time.sleep(0.2)
    late.sendall(b"Connection: close\r\n\r\n")
    late.settimeout(5)
    answer = b"".join(iter(lambda: late.recv(65536), b""))
    late.close()
    assert statuses_in(answer) == [200]

    for index, conn in enumerate(silent):
        if index % 2:  # a reset, not a FIN
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    wait_until(lambda: tack.httpd.waiting_room.waiting == 0, what="every leaver let go")
    wait_until(lambda: tack.httpd._per_client.get("127.0.0.1", 0) == 0, what="all closed")
    answer = raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses_in(answer) == [200]


def test_events_subscribers_hold_no_thread_are_answered_and_may_all_leave_at_once(tack, knot):
    """/events subscribers are watched by one listening room (api/listening.py):
    no thread each, their pings answered, events still delivered, and when
    most leave at once (some with a reset) the rest and the port go on."""
    port, threads_before = tack.server.port, _connection_threads()
    room = tack.server.httpd.app.listening
    crowd = [websocket.create_connection(f"ws://127.0.0.1:{port}/events") for _ in range(150)]
    client = EventsClient(port).start()
    wait_until(lambda: room.watching == 151, what="all 151 subscribers watched")
    assert _connection_threads() - threads_before < 5, "subscribers took threads"

    crowd[0].ping(b"are you there")
    crowd[0].settimeout(5)
    opcode, data = crowd[0].recv_data(control_frame=True)
    assert (opcode, data) == (websocket.ABNF.OPCODE_PONG, b"are you there")

    for index, ws in enumerate(crowd):
        if index % 2:  # a reset, not a FIN
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.sock.close()
    wait_until(lambda: room.watching == 1, what="every leaver let go")
    wait_until(lambda: tack.server.httpd.app.broadcaster.subscribers == 1, what="unsubscribed")
    wait_until(lambda: tack.httpd._per_client.get("127.0.0.1", 0) == 1, what="their sockets closed")

    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("a.yml", "dummy", STEPS)]))
    wait_until(lambda: client.statuses() == ["pending", "running", "success"])
    answer = raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses_in(answer) == [200]


def test_log_followers_may_all_leave_at_once(tack, knot):
    """Followers of a running workflow, on /logs and subscribePipelineLogs,
    leave together (some with a reset). Their threads tidy up one at a time
    (api/follow.py), and every one is let go: the port and a new follower
    go on."""
    port, app = tack.server.port, tack.server.httpd.app
    client = EventsClient(port).start()
    rkey = knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "hello", [("slow.yml", "dummy", SLOW)])
    )
    wait_until(lambda: client.statuses("slow.yml")[-1:] == ["running"])
    appview, logs_url = (
        AppviewClient(port),
        f"ws://127.0.0.1:{port}/logs/{knot.name}/{rkey}/slow.yml",
    )
    crowd = [
        appview.subscribe_logs(rkey, ["slow.yml"]).ws
        if index % 2
        else websocket.create_connection(logs_url)
        for index in range(60)
    ]
    wait_until(lambda: app.follower.streams == 60, what="all 60 following")

    for index, ws in enumerate(crowd):
        if index % 3 == 0:  # a reset, not a FIN
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.sock.close()
    wait_until(lambda: app.follower.streams == 0, what="every leaver let go")
    wait_until(lambda: tack.httpd._per_client.get("127.0.0.1", 0) == 1, what="their sockets closed")

    late = websocket.create_connection(logs_url)
    wait_until(lambda: app.follower.streams == 1, what="a new follower followed")
    late.close()
    answer = raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses_in(answer) == [200]


def test_events_subscribers_are_told_the_spindle_is_going_away(make_spindle):
    spindle = make_spindle()
    subscribers = [
        websocket.create_connection(f"ws://127.0.0.1:{spindle.server.port}/events")
        for _ in range(20)
    ]
    wait_until(lambda: spindle.server.httpd.app.listening.watching == 20, what="watched")
    spindle.stop()
    for ws in subscribers:
        ws.settimeout(5)
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert struct.unpack("!H", data[:2])[0] == 1001 and b"shutting down" in data


def test_events_work_on_descriptors_past_1024(tack, knot):
    """select(2) fails for descriptors of 1024 and more; tack polls instead."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"the descriptor limit ({hard}) is below what this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        client = EventsClient(tack.server.port).start()
        knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("a.yml", "dummy", STEPS)]))
        wait_until(lambda: client.statuses() == ["pending", "running", "success"])
        client.ws.ping()
        time.sleep(0.3)
        assert not client.closed.is_set(), "the subscriber's connection is alive"
    finally:
        for fd in filler:
            os.close(fd)


def test_out_of_descriptors_sheds_new_connections_and_serves_the_open_ones(tmp_path, jetstream):
    env = tack_env(tmp_path, jetstream.url)
    tack = TackProcess(env, tmp_path / "tack.log", prefix=["prlimit", "--nofile=128"])
    try:
        port = tack.wait_for_log("listening")["port"]
        kept = socket.create_connection(("127.0.0.1", port), timeout=5)
        flood = []
        for _ in range(200):
            try:
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        time.sleep(1.0)
        cpu_before = _cpu_seconds(tack.proc.pid)
        time.sleep(2.0)
        busy = _cpu_seconds(tack.proc.pid) - cpu_before
        assert busy < 1.0, f"the accept loop spins: {busy:.2f} s of CPU in 2 s"
        kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(64).startswith(b"HTTP/1.1 200"), "an open connection is still served"
        for conn in flood:
            conn.close()
        kept.close()
    finally:
        assert tack.terminate() == 0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- 2. a subscriber that pings and never reads ----------------------------------------------


def test_a_peer_that_does_not_read_its_pongs_costs_the_others_nothing(served_knot):
    spindle, knot = served_knot
    port = spindle.server.port
    greedy = websocket.create_connection(
        f"ws://127.0.0.1:{port}/events",
        sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)],
    )
    stop = threading.Event()

    def ping_forever() -> None:
        payload = b"x" * 125
        while not stop.is_set():
            try:
                greedy.ping(payload)
            except Exception:
                return

    pinger = threading.Thread(target=ping_forever, daemon=True)
    pinger.start()
    try:
        time.sleep(1.0)  # its pongs pile up unread
        honest = EventsClient(port).start()
        sent = time.monotonic()
        knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("a.yml", "dummy", STEPS)]))
        wait_until(lambda: honest.statuses()[:1] == ["pending"], timeout=5)
        assert time.monotonic() - sent < 2.0
    finally:
        stop.set()
        greedy.shutdown()


# --- 3, 6, 11, 12: input that must not hurt ----------------------------------------------------


def test_a_yaml_alias_bomb_fails_the_workflow(served_knot):
    spindle, knot = served_knot
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
    bomb += "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n" + STEPS
    client = EventsClient(spindle.server.port).start()
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("bomb.yml", "dummy", bomb)]))
    wait_until(lambda: client.statuses()[-1:] == ["failed"])
    assert "aliases" in client.frames[-1]["event"]["error"]


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        # A GET body holding a second request is read away, not answered.
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 37\r\n\r\n"
            b"GET /xrpc/sh.tangled.owner HTTP/1.1\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            [200, 200],
        ),
        (b"POST /xrpc/sh.tangled.repo.addSecret HTTP/1.1\r\nContent-Length: 1_2\r\n\r\n", [400]),
        (b"POST /xrpc/sh.tangled.repo.addSecret HTTP/1.1\r\nContent-Length: +12\r\n\r\n", [400]),
        (
            b"POST /xrpc/sh.tangled.repo.addSecret HTTP/1.1\r\n"
            b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}",
            [400],
        ),
        (
            b"POST /xrpc/sh.tangled.repo.addSecret HTTP/1.1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            [501],
        ),
        (b"PUT / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [405]),
        (b"DELETE /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [404]),
    ],
)
def test_request_framing_is_strict(tack, request_bytes, expected):
    answer = raw_request(tack.server.port, request_bytes)
    assert statuses_in(answer) == expected, answer[:300]
    if expected == [405]:
        assert b"Allow: GET, HEAD" in answer


def test_head_answers_without_a_body(tack):
    answer = raw_request(
        tack.server.port, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head and body == b""


@pytest.mark.parametrize("cursor", ["\u0661\u0662\u0663", "99999999999999999999999", "abc", "-5"])
def test_odd_events_cursors_stream_from_now(served_knot, cursor):
    spindle, knot = served_knot
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("old.yml", "dummy", STEPS)]))
    first = EventsClient(spindle.server.port).start()
    wait_until(lambda: first.statuses("old.yml")[-1:] == ["success"])
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{spindle.server.port}/events?cursor={urllib.parse.quote(cursor)}"
    )
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("new.yml", "dummy", STEPS)]))
    frame = json.loads(ws.recv())
    assert frame["event"]["workflow"] == "new.yml", "nothing from before now"
    ws.close()


def test_nested_json_bodies_are_400_and_callbacks_check_the_token_first(tack):
    nested = b"[" * 100_000 + b"]" * 100_000
    request = urllib.request.Request(
        f"http://127.0.0.1:{tack.server.port}/xrpc/sh.tangled.repo.addSecret",
        data=nested[:60_000],
        method="POST",
    )
    status, body = _open(request)
    assert status in (400, 413) and body["error"] == "InvalidRequest"
    for workflow_id in (1, 999_999):
        callback = urllib.request.Request(
            f"http://127.0.0.1:{tack.server.port}/ci/v1/workflows/{workflow_id}/status",
            data=b"[" * 5000 + b"]" * 5000,
            method="POST",
            headers={"Authorization": "Bearer wrong"},
        )
        status, body = _open(callback)
        assert status == 401, "no token: refused before the body or the id is looked at"


def _open(request: urllib.request.Request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


# --- 4, 10: identities -------------------------------------------------------------------------


@pytest.fixture
def plc():
    host = DocumentHost()
    yield host
    host.server.shutdown()


def test_a_did_web_host_that_drips_is_given_up_on_in_time(jetstream, make_spindle):
    class Drip(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(60):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    drip = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=drip.serve_forever, daemon=True).start()
    try:
        spindle = make_spindle()
        issuer = Identity(f"did:web:127.0.0.1%3A{drip.server_address[1]}")
        started = time.monotonic()
        status, _ = _xrpc(spindle, "sh.tangled.repo.listSecrets", issuer.token(None), "?repo=x")
        assert status == 401 and time.monotonic() - started < 8
    finally:
        drip.shutdown()


def test_an_oversized_plc_document_is_refused(jetstream, make_spindle, plc):
    spindle = make_spindle(SPINDLE_SERVER_PLC_URL=plc.url)
    heavy = plc.register(Identity(plc_did("heavy")))
    plc.documents[heavy.did]["padding"] = "x" * 200_000  # over the 64 KiB cap
    status, body = _xrpc(spindle, "sh.tangled.repo.listSecrets", heavy.token(None), "?repo=x")
    assert status == 401 and "could not resolve" in body["message"]


def test_an_issuer_is_validated_whole_before_it_becomes_a_url(jetstream, make_spindle, plc):
    spindle = make_spindle(SPINDLE_SERVER_PLC_URL=plc.url)
    wait_until(spindle.ingester.backfilled.is_set, what="the start-up backfill's attempt")
    plc.requests = 0  # it asked for the owner's document: not what is tested here
    sneaky = Identity("did:plc:x/../../admin")
    status, _ = _xrpc(spindle, "sh.tangled.repo.listSecrets", sneaky.token(None), "?repo=x")
    assert status == 401
    assert plc.requests == 0, "no request was made for it"


def _xrpc(spindle, method: str, token: str, query: str = "", body: bytes | None = None):
    request = urllib.request.Request(
        f"http://127.0.0.1:{spindle.server.port}/xrpc/{method}{query}",
        data=body,
        method="POST" if body is not None else "GET",
        headers={"Authorization": f"Bearer {token}"},
    )
    return _open(request)


def test_nat64_6to4_and_mapped_addresses_are_judged_by_their_ipv4():
    for private in ("64:ff9b::7f00:1", "64:ff9b:1::a00:1", "2002:c0a8:101::", "::ffff:10.0.0.1"):
        assert not is_public(private), private
    for public in ("64:ff9b::808:808", "2002:808:808::", "2606:4700::1111", "8.8.8.8"):
        assert is_public(public), public


# --- 7, 9, 14: what a step can reach --------------------------------------------------------------


def test_a_step_cannot_read_tacks_state(tmp_path, jetstream, knot, clock):
    from .standins import REPO, commit, repo

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed; .ci/run installs it")
    env = tack_env(tmp_path, jetstream.url, TACK_SECRETS_KEY_FILE=str(tmp_path / "state.key"))
    jetstream.add(commit(clock, OWNER, REPO, "r1", "create", repo("hello", knot.name)))
    tack = TackProcess(env, tmp_path / "tack.log")
    try:
        port = tack.wait_for_log("listening")["port"]
        wait_until(lambda: knot.open_connections == 1, timeout=20)
        key = (tmp_path / "state.key").read_text().strip()
        probe = (
            f"cat {env['SPINDLE_SERVER_DB_PATH']} | head -c 16 | od -c | head -1; "
            f"cat {tmp_path / 'state.key'}; "
            f"tr '\\\\0' '\\\\n' < /proc/{tack.proc.pid}/environ | grep SPINDLE; "
            f"ls {env['SPINDLE_SERVER_LOG_DIR']}; echo done"
        )
        raw = f"steps:\n  - name: Probe\n    command: {json.dumps(probe)}\n"
        client = EventsClient(port).start()
        rkey = knot.send_pipeline(
            push_pipeline(knot.name, OWNER, "hello", [("p.yml", "shell", raw)])
        )
        wait_until(lambda: client.statuses()[-1:] in (["success"], ["failed"]), timeout=30)
        lines = [
            line["content"]
            for line in read_log(port, f"/logs/{knot.name}/{rkey}/p.yml").lines
            if line["kind"] == "data"
        ]
        text = "\n".join(lines)
        assert "done" in text
        assert key not in text and "SQLite format" not in text and "S   Q   L" not in text
        assert "SPINDLE_SERVER" not in text
        assert "tack: no sandbox" not in text
    finally:
        assert tack.terminate() == 0


def test_a_workspace_root_another_user_owns_is_refused(
    tmp_path, jetstream, knot, make_spindle, clock
):
    from .standins import REPO, commit, repo

    if os.getuid() != 0:
        pytest.skip("needs root to make a folder owned by another user")
    root = tmp_path / "workspaces"
    root.mkdir(mode=0o777)
    os.chown(root, 65534, 65534)
    spindle = make_spindle(real_knots=True)
    jetstream.add(commit(clock, OWNER, REPO, "r1", "create", repo("hello", knot.name)))
    wait_until(lambda: knot.open_connections == 1)
    client = EventsClient(spindle.server.port).start()
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("s.yml", "shell", STEPS)]))
    wait_until(lambda: client.statuses()[-1:] == ["failed"])
    assert "is not a folder owned by tack's user" in client.frames[-1]["event"]["error"]


# --- 8, 9: secrets stay masked ------------------------------------------------------------------


def test_long_secrets_are_masked_in_base64_lines(served_knot):
    spindle, knot = served_knot
    repo_row = spindle.directory.repo_by_name(OWNER, "hello")
    secret = "s3cr3t-" + "k" * 120
    spindle.secrets.add(repo_row.at_uri, "LONG", secret, OWNER)
    raw = 'steps:\n  - name: Leak\n    command: printf %s "$LONG" | base64\n'
    client = EventsClient(spindle.server.port).start()
    rkey = knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("l.yml", "shell", raw)]))
    wait_until(lambda: client.statuses()[-1:] == ["success"], timeout=20)
    lines = [
        line["content"]
        for line in read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/l.yml").lines
        if line["kind"] == "data"
    ]
    wrapped = base64.encodebytes(secret.encode()).decode().split()
    assert len(wrapped) >= 3
    for piece in wrapped:
        assert piece.rstrip("=") not in "\n".join(lines), "a base64 line of the secret shows"


# --- 15: secrets only for served repos ---------------------------------------------------


def test_secrets_only_for_served_repos_and_at_most_100(jetstream, make_spindle, clock, plc, knot):
    from .standins import REPO, commit, repo

    spindle = make_spindle(SPINDLE_SERVER_PLC_URL=plc.url)
    stranger = plc.register(Identity(plc_did("stranger")))
    owner = plc.register(Identity(OWNER))
    jetstream.add(
        commit(clock, stranger.did, REPO, "s1", "create", repo("theirs", knot.name)),
        commit(clock, OWNER, REPO, "r1", "create", repo("mine", knot.name)),
    )
    wait_until(lambda: spindle.directory.repo_by_name(OWNER, "mine") is not None)
    add = "sh.tangled.repo.addSecret"

    def add_secret(who: Identity, repo_uri: str, key: str) -> tuple[int, dict]:
        body = json.dumps({"repo": repo_uri, "key": key, "value": "value-123"}).encode()
        return _xrpc(spindle, add, who.token(add), body=body)

    status, body = add_secret(stranger, f"at://{stranger.did}/sh.tangled.repo/s1", "K")
    assert (status, body["error"]) == (404, "RepoNotFound")
    mine = f"at://{OWNER}/sh.tangled.repo/r1"
    for index in range(100):
        assert add_secret(owner, mine, f"K{index}")[0] == 200
    status, body = add_secret(owner, mine, "ONE_TOO_MANY")
    assert (status, body["error"]) == (400, "TooManySecrets")
    with sqlite3.connect(spindle.config.db_path) as db:
        assert db.execute("SELECT count(*) FROM secret").fetchone()[0] == 100


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_server_frames_are_what_a_websocket_library_makes(length):
    """tack builds its frame headers itself (a tenth of the library's cost);
    the bytes are websocket-client's, at each length-field boundary."""
    from websocket import ABNF

    from tack.api.sockets import encode_binary_frame, encode_text_frame

    data = (bytes(range(256)) * (length // 256 + 1))[:length]
    text = ("é" * length)[: length // 2]
    assert encode_binary_frame(data) == ABNF(1, 0, 0, 0, ABNF.OPCODE_BINARY, 0, data).format()
    encoded = text.encode()
    assert encode_text_frame(text) == ABNF(1, 0, 0, 0, ABNF.OPCODE_TEXT, 0, encoded).format()
