"""Nothing lost, nothing stuck, nothing left running (the fault-injection findings).

Each test reproduces one finding with real processes, files and streams:
deeply nested and far-future frames, a full log directory, workflow files
that break the YAML loader, kill -9 mid-step, two instances on one database,
SIGHUP, start-up failures, a newer schema, a full disk.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from tack import store, tid
from tack.net import open_vetted_socket
from tack.stream import Backoff, ConnectPacer, Follower

from .ci_fakes import self_signed_tls
from .spindle_clients import EventsClient
from .standins import (
    MEMBER,
    OWNER,
    REPO,
    JetstreamStandin,
    KnotStandin,
    TackProcess,
    commit,
    db_cursor,
    db_rows,
    member,
    push_pipeline,
    repo,
    tack_env,
    wait_until,
)

STEPS = "steps:\n  - name: One\n    command: echo one\n"


# --- data loss ---------------------------------------------------------------------------


def test_a_deeply_nested_jetstream_frame_is_one_bad_record(jetstream, make_spindle, clock):
    spindle = make_spindle()
    events = []
    for index in range(300):
        events.append(
            commit(clock, OWNER, MEMBER, f"m{index}", "create", member(f"did:plc:u{index}"))
        )
    for event in events[:150]:
        jetstream.add(event)
    jetstream.add_raw("[" * 100_000 + "]" * 100_000, clock())
    jetstream.add_raw('{"a":' * 50_000 + "1" + "}" * 50_000, clock())
    for event in events[150:]:
        jetstream.add(event)
    wait_until(lambda: len(db_rows(spindle.config.db_path)["member"]) == 300, timeout=20)
    wait_until(lambda: db_cursor(spindle.config.db_path) == events[-1]["time_us"])
    assert spindle.ingester.decoder.bad == 2


def test_a_far_future_time_never_becomes_the_jetstream_cursor(jetstream, make_spindle, clock):
    spindle = make_spindle()
    jetstream.add(commit(clock, OWNER, MEMBER, "m1", "create", member("did:plc:a")))
    bogus = commit(clock, OWNER, MEMBER, "m2", "create", member("did:plc:b"))
    bogus["time_us"] = 4 * 10**18
    jetstream.add_raw(json.dumps(bogus), clock())
    last = commit(clock, OWNER, MEMBER, "m3", "create", member("did:plc:c"))
    jetstream.add(last)
    wait_until(lambda: len(db_rows(spindle.config.db_path)["member"]) == 3)
    wait_until(lambda: db_cursor(spindle.config.db_path) == last["time_us"])


def test_a_far_future_tid_never_becomes_a_knot_cursor(served_knot):
    spindle, knot = served_knot
    year_2096_us = int(time.mktime((2096, 1, 1, 0, 0, 0, 0, 0, 0))) * 10**6
    knot.send(tid.encode(year_2096_us, 3), "sh.tangled.pipeline", {"triggerMetadata": "x"})
    client = EventsClient(spindle.server.port).start()
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("a.yml", "dummy", STEPS)]))
    wait_until(lambda: client.statuses("a.yml")[-1:] == ["success"])
    knot.drop()
    wait_until(lambda: len(knot.cursors) == 2, what="reconnect")
    assert knot.cursors[1] < time.time_ns(), "the cursor stayed at what was really processed"


@pytest.fixture
def served_knot(serve_repo, knot):
    """tack (in-process) serving OWNER's repo ``hello`` on the knot stand-in."""
    return serve_repo(), knot


# --- stuck or left behind --------------------------------------------------------------------


def test_a_full_log_directory_still_ends_the_workflow(served_knot, caplog):
    spindle, knot = served_knot
    # The first workflow's log file is /dev/full: every write fails with ENOSPC.
    os.symlink("/dev/full", spindle.logbook.path(1))
    client = EventsClient(spindle.server.port).start()
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("a.yml", "dummy", STEPS)]))
    wait_until(lambda: client.statuses("a.yml") == ["pending", "running", "success"])
    assert "workflow log not written; the run goes on without it" in caplog.text


@pytest.mark.parametrize(
    "raw",
    [
        "when: 2024-13-45\n" + STEPS,
        "environment:\n  X: " + "[" * 3000 + "]" * 3000 + "\n" + STEPS,
    ],
)
def test_a_workflow_file_the_loader_chokes_on_fails_that_workflow(served_knot, raw):
    spindle, knot = served_knot
    client = EventsClient(spindle.server.port).start()
    knot.send_pipeline(
        push_pipeline(
            knot.name, OWNER, "hello", [("bad.yml", "dummy", raw), ("ok.yml", "dummy", STEPS)]
        )
    )
    wait_until(lambda: client.statuses("bad.yml")[-1:] == ["failed"], timeout=15)
    wait_until(lambda: client.statuses("ok.yml")[-1:] == ["success"])
    failed = [f for f in client.frames if f["event"].get("status") == "failed"]
    assert "invalid YAML" in failed[0]["event"]["error"]


def test_kill_9_mid_step_leaves_nothing_running(tmp_path, jetstream, knot, clock):
    """The step and what it spawned die with tack, or at the latest when tack
    starts again; its workspace goes; the workflow is reported `failed` once."""
    marker = "317.25"  # a sleep only this step runs, to find its processes by
    raw = f"steps:\n  - name: Sleep\n    command: sleep {marker} & sleep {marker}\n"
    jetstream.add(commit(clock, OWNER, REPO, "r1", "create", repo("hello", knot.name)))
    env = tack_env(tmp_path, jetstream.url)
    proc = TackProcess(env, tmp_path / "tack-0.log")
    proc.wait_for_log("listening")
    wait_until(lambda: knot.open_connections == 1, timeout=20)
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("sleep.yml", "shell", raw)]))
    wait_until(lambda: len(_running(marker)) == 2, timeout=20, what="the step's two sleeps")
    workspaces = list((tmp_path / "workspaces").iterdir())
    assert workspaces, "the step runs in a workspace"
    proc.kill()
    proc = TackProcess(env, tmp_path / "tack-1.log")
    try:
        port = proc.wait_for_log("listening")["port"]
        client = EventsClient(port).start()
        wait_until(lambda: client.statuses("sleep.yml") == ["pending", "running", "failed"])
        assert _running(marker) == [], "the killed tack's step still runs"
        assert not any(w.exists() for w in workspaces), "the workspace was removed"
    finally:
        assert proc.terminate() == 0


def _running(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmdline[:1] == [b"sleep"] and marker.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_commits_leave_the_write_ahead_log_to_the_checkpoint_thread(make_spindle, tmp_path):
    """No commit copies the log back into the database (that fsync once held
    up a knot frame's intake every few dozen pipelines); the service's own
    thread does, and the rows are there either way."""
    spindle = make_spindle()
    db, path = spindle.db, Path(spindle.config.db_path)
    assert db.execute_sql("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    db.execute_sql("CREATE TABLE scratch (body BLOB)")
    size_before = path.stat().st_size
    for _ in range(20):  # 2,000 pages of 4 KiB, 100 a commit: twice what SQLite waits for
        with db.atomic():
            db.execute_sql(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100)"
                " INSERT INTO scratch SELECT randomblob(4000) FROM n"
            )
    wal = Path(f"{path}-wal")
    # Had a commit checkpointed, the log would have started over at 1,000 pages.
    assert wal.stat().st_size > 1500 * 4096, "a commit checkpointed the log"
    wait_until(
        lambda: path.stat().st_size >= size_before + 2000 * 4000,
        timeout=10,
        what="the checkpoint thread copying the log into the database",
    )
    assert db.execute_sql("SELECT COUNT(*) FROM scratch").fetchone() == (2000,)


def test_write_transactions_share_one_connection_and_a_failed_one_leaves_nothing(tmp_path):
    """Every thread's write transaction runs on one connection (its page
    cache then stays warm). One that rolls back, or whose COMMIT itself
    fails, must leave that connection clean for the next writer."""
    db = store.open_database(str(tmp_path / "s.db"))
    db.execute_sql("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    db.execute_sql(
        "CREATE TABLE child (parent_id INTEGER REFERENCES parent (id)"
        " DEFERRABLE INITIALLY DEFERRED)"
    )
    used, failures = [], []

    def write(index: int) -> None:
        try:
            with db.atomic():
                used.append(db.connection())
                store.save_cursor(f"c{index}", index)
                if index % 3 == 1:
                    raise RuntimeError("rolled back")
                if index % 3 == 2:  # only COMMIT finds the missing parent
                    db.execute_sql("INSERT INTO child VALUES (?)", (1000 + index,))
        except Exception as exc:
            failures.append(type(exc).__name__)
        finally:
            store.release_connection()

    try:
        threads = [threading.Thread(target=write, args=(index,)) for index in range(9)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len({id(connection) for connection in used}) == 1
        assert sorted(failures) == ["IntegrityError"] * 3 + ["RuntimeError"] * 3
        assert [store.get_cursor(f"c{index}") for index in range(9)] == [
            index if index % 3 == 0 else None for index in range(9)
        ]
        assert db.execute_sql("SELECT COUNT(*) FROM child").fetchone() == (0,)
        assert db.connection() is not used[0]  # outside a transaction: this thread's own
        with db.atomic():  # and the shared one takes the next writer
            store.save_cursor("after", 1)
        assert store.get_cursor("after") == 1
    finally:
        db.close()


def test_a_second_instance_on_the_same_database_exits_2(tmp_path, jetstream):
    env = tack_env(tmp_path, jetstream.url)
    first = TackProcess(env, tmp_path / "first.log")
    try:
        first.wait_for_log("listening")
        second = subprocess.run(
            [sys.executable, "-m", "tack"], env=env, capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert f"in use by another tack (PID {first.proc.pid})" in lines[0]
        assert "SPINDLE_SERVER_DB_PATH" in lines[0]
    finally:
        assert first.terminate() == 0


def test_sighup_stops_tack_in_order(tmp_path, jetstream):
    proc = TackProcess(tack_env(tmp_path, jetstream.url), tmp_path / "tack.log")
    proc.wait_for_log("listening")
    proc.proc.send_signal(signal.SIGHUP)
    assert proc.wait(15) == 0
    messages = [(line["message"], line.get("signal")) for line in proc.log_lines()]
    assert ("signal received", "SIGHUP") in messages
    assert ("tack stopped", None) in messages


# --- start-up and upgrades -------------------------------------------------------------------


def start_once(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tack"], env=env, capture_output=True, text=True, timeout=30
    )


def _busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    "case",
    [
        "port in use",
        "unresolvable host",
        "missing folder",
        "unwritable folder",
        "not sqlite",
        "log dir is a file",
    ],
)
def test_start_up_failures_are_one_line_and_exit_2(tmp_path, jetstream, case):
    env = tack_env(tmp_path, jetstream.url)
    busy = _busy_port()
    expected = {
        "port in use": ("SPINDLE_SERVER_LISTEN_ADDR", "Address already in use"),
        "unresolvable host": ("SPINDLE_SERVER_LISTEN_ADDR", "cannot resolve"),
        "missing folder": ("SPINDLE_SERVER_DB_PATH", "does not exist"),
        "unwritable folder": ("SPINDLE_SERVER_DB_PATH", "spindle.db"),
        "not sqlite": ("SPINDLE_SERVER_DB_PATH", "is not a SQLite database"),
        "log dir is a file": ("SPINDLE_SERVER_LOG_DIR", "is not a directory"),
    }[case]
    if case == "port in use":
        env["SPINDLE_SERVER_LISTEN_ADDR"] = f"127.0.0.1:{busy.getsockname()[1]}"
    elif case == "unresolvable host":
        env["SPINDLE_SERVER_LISTEN_ADDR"] = "no-such-host.invalid:6555"
    elif case == "missing folder":
        env["SPINDLE_SERVER_DB_PATH"] = str(tmp_path / "nope" / "spindle.db")
    elif case == "unwritable folder":
        env["SPINDLE_SERVER_DB_PATH"] = "/sys/spindle.db"  # not even root may create files there
    elif case == "not sqlite":
        Path(env["SPINDLE_SERVER_DB_PATH"]).write_text("these are not the tables you seek\n" * 100)
    elif case == "log dir is a file":
        Path(env["SPINDLE_SERVER_LOG_DIR"]).write_text("a file\n")
    try:
        result = start_once(env)
    finally:
        busy.close()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    setting, words = expected
    assert lines[0].startswith("tack: ") and setting in lines[0] and words in lines[0], lines[0]
    if case in ("port in use", "unresolvable host"):
        assert not Path(env["SPINDLE_SERVER_DB_PATH"]).exists(), "nothing created before the port"


@pytest.mark.parametrize("listen", ["[::1]:0", "[::]:0"])
def test_ipv6_listen_addresses_work(tmp_path, jetstream, listen):
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").exists():
        pytest.skip("this machine has no IPv6 (no /proc/net/if_inet6)")
    env = tack_env(tmp_path, jetstream.url, SPINDLE_SERVER_LISTEN_ADDR=listen)
    proc = TackProcess(env, tmp_path / "tack.log")
    try:
        port = proc.wait_for_log("listening")["port"]
        with socket.create_connection(("::1", port), timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        assert proc.terminate() == 0


def test_a_newer_schema_refuses_to_start(tmp_path, jetstream):
    env = tack_env(tmp_path, jetstream.url)
    first = start_and_stop(env, tmp_path)
    assert first == 0
    with sqlite3.connect(env["SPINDLE_SERVER_DB_PATH"]) as db:
        db.execute("INSERT INTO schema_version (version) VALUES (99)")
    result = start_once(env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "schema (version 99) is newer than this tack's" in lines[0]


def start_and_stop(env: dict, tmp_path: Path) -> int:
    proc = TackProcess(env, tmp_path / "boot.log")
    proc.wait_for_log("listening")
    return proc.terminate()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a disk that fills up for real (ENOSPC)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_said_so(tmp_path, jetstream, clock, small_disk):
    """SQLite reports the disk full, and the log says so instead of peewee's
    "cannot rollback - no transaction is active" that used to hide it."""
    env = tack_env(tmp_path, jetstream.url, SPINDLE_SERVER_DB_PATH=str(small_disk / "spindle.db"))
    long_name = "x" * 1500
    jetstream.add(
        *[
            commit(clock, OWNER, MEMBER, f"m{i}", "create", member(f"did:plc:{long_name}{i}"))
            for i in range(2000)
        ]
    )
    proc = TackProcess(env, tmp_path / "full.log")
    try:
        line = proc.wait_for_log("store busy, retrying the same events", timeout=30)
        assert line["error"].startswith("disk is full"), line
    finally:
        proc.kill()


# --- a peer that went silent ----------------------------------------------------


class _SilentPeer:
    """Accepts websocket connections, completes the handshake with
    ``websockets``' sans-I/O protocol, then never reads or writes again: not
    even a pong. What a knot looks like when its host vanished without a FIN."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._listener.getsockname()[1]}/events"

    def _serve(self) -> None:
        while True:
            conn, _ = self._listener.accept()
            _accept_handshake(conn)
            self._held.append(conn)
            self.connections += 1


def _accept_handshake(conn: socket.socket, then: bytes = b"") -> None:
    """Answer a websocket client's opening handshake, with ``websockets``'
    sans-I/O protocol; ``then`` goes out in the same write as the answer."""
    protocol = ServerProtocol()
    events: list = []
    while not events:
        protocol.receive_data(conn.recv(65536))
        events = protocol.events_received()
    protocol.send_response(protocol.accept(events[0]))
    conn.sendall(b"".join(protocol.data_to_send()) + then)


def _follow(url: str, stop: threading.Event) -> Follower:
    follower = Follower(
        component="test",
        url=lambda: url,
        on_frames=lambda frames: None,
        stop=stop,
        backoff=Backoff(initial=0.05, cap=0.2),
        ping_every=0.3,
        idle_limit=1.0,
    )
    threading.Thread(target=follower.run, daemon=True).start()
    return follower


def test_a_peer_silent_past_the_idle_limit_is_dropped_and_reconnected():
    """The reader sleeps until a ping is due rather than polling; a peer that
    answers nothing is still noticed and left, and the stream reconnects."""
    silent, stop = _SilentPeer(), threading.Event()
    _follow(silent.url, stop)
    try:
        wait_until(lambda: silent.connections >= 3, timeout=10, what="two reconnects")
    finally:
        stop.set()


def test_a_quiet_peer_that_answers_pings_keeps_its_connection():
    quiet, stop = JetstreamStandin(replay_without_cursor=False), threading.Event()
    follower = _follow(quiet.url, stop)
    try:
        wait_until(lambda: follower.connections == 1, what="connected")
        time.sleep(2.5)  # more than twice the idle limit, several pings
        assert follower.connections == 1
        assert len(quiet.subscriptions) == 1
    finally:
        stop.set()
        follower.close()


def test_connection_attempts_take_turns_and_a_stop_ends_the_wait():
    """Twenty followers asking at once pass one turn apart (a turn every
    20 ms: the last passes no sooner than 19 turns after the first asked),
    and one waiting for a far turn leaves as soon as it is stopped."""
    pacer, stop = ConnectPacer(per_second=50), threading.Event()
    passed: list[float] = []
    asked = time.monotonic()

    def attempt() -> None:
        if pacer.wait_turn(stop):
            passed.append(time.monotonic())

    threads = [threading.Thread(target=attempt) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(passed) == 20
    assert max(passed) - asked >= 19 * 0.02 * 0.95

    slow, outcome = ConnectPacer(per_second=1), []
    assert slow.wait_turn(stop)  # the first turn is now
    waiter = threading.Thread(target=lambda: outcome.append(slow.wait_turn(stop)))
    waiter.start()
    time.sleep(0.1)
    stop.set()
    waiter.join(0.5)  # its turn was a second away
    assert outcome == [False]


def test_knot_streams_that_drop_together_come_back_in_turns(jetstream, make_spindle, clock):
    """tack's network blips and every knot stream drops at once. Each comes
    back, resuming from its cursor, and the connections begin at most
    TACK_KNOT_CONNECTS_PER_SECOND apart: with a thread per knot, 2,000
    threads waking together kept the HTTP port from answering for seconds."""
    knots = [KnotStandin() for _ in range(8)]
    try:
        make_spindle(real_knots=True, TACK_KNOT_CONNECTS_PER_SECOND="10")
        for index, knot in enumerate(knots):
            record = repo(f"hello{index}", knot.name)
            jetstream.add(commit(clock, OWNER, REPO, f"r{index}", "create", record))
        wait_until(lambda: all(k.open_connections == 1 for k in knots), what="every knot followed")
        dropped = time.monotonic()
        for knot in knots:
            knot.drop()
        wait_until(lambda: all(len(k.cursors) == 2 for k in knots), timeout=20, what="all back")
        # Eight connections at ten a second: the last begins 0.7 s after the first.
        assert time.monotonic() - dropped >= 0.7 * 0.95
        assert all(k.cursors[1] is not None for k in knots), "each resumed from its cursor"
        wait_until(lambda: all(k.open_connections == 1 for k in knots), what="and stayed")
    finally:
        for knot in knots:
            knot.close()


@pytest.mark.parametrize("opened_by", ["websocket-client", "tack", "tack over TLS"])
def test_every_frame_shape_arrives_whole_and_in_order_however_the_bytes_are_cut(
    opened_by, tmp_path, monkeypatch
):
    """The reader splits the frames in its receive buffer itself (stream.py's
    fast path) and leaves the rest to websocket-client. Payloads at each
    length-field boundary, binary frames, a ping and a fragmented message,
    written in pieces of 1 to 1,500 bytes (headers cut anywhere): each
    message arrives once, whole, in order.

    Knot sockets are opened by tack (``net.open_vetted_socket``), which reads
    ahead during the handshake: the first piece is written with the
    handshake's answer, so it lands in that read-ahead buffer."""
    lengths = [1, 2, 124, 125, 126, 127, 300, 65_535, 65_536, 70_000, 5, 126]
    messages = [bytes([65 + i % 26]) * length for i, length in enumerate(lengths)]
    wire = bytearray()
    for index, payload in enumerate(messages):
        opcode = Opcode.BINARY if index % 3 == 1 else Opcode.TEXT
        wire += Frame(opcode, payload).serialize(mask=False)
        if index == 4:
            wire += Frame(Opcode.PING, b"alive").serialize(mask=False)
    pieces = [b"frag", b"mented-", b"message"]
    wire += Frame(Opcode.TEXT, pieces[0], fin=False).serialize(mask=False)
    wire += Frame(Opcode.CONT, pieces[1], fin=False).serialize(mask=False)
    wire += Frame(Opcode.CONT, pieces[2]).serialize(mask=False)
    wire += Frame(Opcode.TEXT, b"last").serialize(mask=False)
    expected = [*messages, b"".join(pieces), b"last"]

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    scheme, open_socket, tls = "ws", None, None
    if opened_by != "websocket-client":
        open_socket = lambda url: open_vetted_socket(url, dev=True)  # noqa: E731
    if opened_by == "tack over TLS":
        tls, trusted = self_signed_tls(tmp_path)
        monkeypatch.setenv("SSL_CERT_FILE", str(trusted))  # what the client trusts
        scheme = "wss"

    def serve() -> None:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            conn = tls.wrap_socket(conn, server_side=True)
        _accept_handshake(conn, then=bytes(wire[:40]))
        cuts = random.Random(7)
        position = 40
        while position < len(wire):
            size = cuts.choice((1, 2, 3, 5, cuts.randint(1, 1500)))
            conn.sendall(wire[position : position + size])
            position += size
            time.sleep(0.0005)
        time.sleep(30)  # held open; the test stops the reader

    threading.Thread(target=serve, daemon=True).start()
    received: list[bytes] = []
    stop = threading.Event()
    follower = Follower(
        component="test",
        url=lambda: f"{scheme}://127.0.0.1:{port}/subscribe",
        on_frames=received.extend,
        stop=stop,
        backoff=Backoff(initial=0.05, cap=0.2),
        open_socket=open_socket,
    )
    threading.Thread(target=follower.run, daemon=True).start()
    try:
        wait_until(lambda: len(received) >= len(expected), timeout=30, what="every message")
        time.sleep(0.2)  # nothing more, nothing twice
        assert [len(m) for m in received] == [len(m) for m in expected]
        assert received == expected
        assert follower.connections == 1
    finally:
        stop.set()
        follower.close()
        listener.close()


def test_stop_is_not_held_by_a_peer_that_never_answers_the_handshake(make_spindle):
    """A jetstream that accepts the connection and then says nothing: tack's
    stop aborts the handshake instead of waiting out the connect timeout."""
    from tack.stream import CONNECT_TIMEOUT

    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    try:
        url = f"ws://127.0.0.1:{silent.getsockname()[1]}/subscribe"
        spindle = make_spindle(SPINDLE_SERVER_JETSTREAM_ENDPOINT=url)
        wait_until(lambda: accepted, what="tack's connection")
        started = time.monotonic()
        spindle.stop()
        assert time.monotonic() - started < CONNECT_TIMEOUT / 2
    finally:
        silent.close()
        for connection in accepted:
            connection.close()
