"""Jetstream ingest throughput: tack's full ingest against two floors.

Serves N jetstream-shaped events (mostly repo upserts, some members,
collaborators and deletes) from the loopback stand-in, which runs in a
process of its own (sharing no GIL with what is measured), then measures in
one run:

- floor (a): websocket-client with its default reads (``skip_utf8_validation``)
  and ``json.loads``: receiving and decoding only;
- floor (b): the same work as tack, done lean on one thread: the
  ``websockets`` client, tack's own record validation, ``executemany``;
- ingest: a real ``python -m tack`` process, from its subscription until the
  cursor of the last event is committed; and that process's peak RSS;
- ingest again with ``BENCH_STORED`` repo records already stored (written
  through tack's own migrations before it starts): ingest must not slow
  with the store (target: >= 0.8 of the empty-store rate).

Targets on a 2-core machine: ingest >= 100,000 events/s and >= 0.8 of floor
(a) (not met yet), RSS <= 100 MB. The last line printed is one JSON object."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import websocket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.standins import (
    COLLABORATOR,
    MEMBER,
    OWNER,
    REPO,
    Clock,
    JetstreamStandin,
    TackProcess,
    collaborator,
    commit,
    db_cursor,
    member,
    repo,
    tack_env,
)

EVENTS = int(os.environ.get("BENCH_EVENTS", "100000"))
STORED = int(os.environ.get("BENCH_STORED", "1000000"))


def make_events(count: int) -> list[dict]:
    clock = Clock()
    events = []
    for i in range(count):
        kind = i % 20
        if kind < 15:
            events.append(
                commit(clock, OWNER, REPO, f"r{i % 5000}", "create", repo(f"repo{i}", "knot.test"))
            )
        elif kind < 17:
            events.append(
                commit(clock, OWNER, MEMBER, f"m{i % 500}", "create", member(f"did:plc:u{i}"))
            )
        elif kind < 19:
            uri = f"at://{OWNER}/sh.tangled.repo/r{i % 5000}"
            events.append(
                commit(
                    clock, OWNER, COLLABORATOR, f"c{i}", "create", collaborator("did:plc:c", uri)
                )
            )
        else:
            events.append(commit(clock, OWNER, REPO, f"r{i % 5000}", "delete"))
    return events


def floor_websocket_client(url: str, count: int) -> float:
    """Floor (a): websocket-client with its default reads and
    ``skip_utf8_validation``, plus ``json.loads``: receiving and decoding only."""
    ws = websocket.create_connection(url, skip_utf8_validation=True)
    started = time.perf_counter()
    for _ in range(count):
        json.loads(ws.recv())
    elapsed = time.perf_counter() - started
    ws.close()
    return count / elapsed


def floor_lean_pipeline(url: str, count: int) -> float:
    """Floor (b): the same work as tack's ingest, done lean: the ``websockets``
    sync client, tack's own record validation (``records.decode``), and the
    rows written with ``executemany`` in batches of 500 with the cursor, on
    one thread, with no queue and no peewee."""
    from websockets.sync.client import connect

    from tack import records

    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "lean.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=wal")
        db.execute("PRAGMA synchronous=normal")
        db.execute(
            "CREATE TABLE record (did, collection, rkey, row, PRIMARY KEY (did, collection, rkey))"
        )
        db.execute("CREATE TABLE cursor (name PRIMARY KEY, value)")
        upsert = "INSERT OR REPLACE INTO record VALUES (?, ?, ?, ?)"
        started = time.perf_counter()
        with connect(url, max_size=None, compression=None) as ws:
            batch: list = []
            for index in range(count):
                change = records.decode(ws.recv(), "spindle.test")
                if change.action == "upsert":
                    batch.append((change.did, change.collection, change.rkey, str(change.row)))
                if len(batch) >= 500 or index == count - 1:
                    db.execute("BEGIN")
                    db.executemany(upsert, batch)
                    db.execute("INSERT OR REPLACE INTO cursor VALUES ('j', ?)", (change.time_us,))
                    db.execute("COMMIT")
                    batch = []
        elapsed = time.perf_counter() - started
        db.close()
    return count / elapsed


def serve_elsewhere(count: int) -> tuple[subprocess.Popen, str]:
    """The jetstream stand-in in a process of its own, so that neither tack nor
    a floor shares a GIL with it; (process, subscribe URL)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(count)], stdout=subprocess.PIPE, text=True
    )
    return proc, proc.stdout.readline().strip()


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def prefill(db_path: Path, rows: int) -> None:
    """``rows`` served repo records, as if ingested long ago."""
    from tack import store

    db = store.open_database(str(db_path))
    with db.atomic():
        db.cursor().executemany(
            "INSERT INTO repo (did, rkey, name, knot, spindle, repo_did, created_at)"
            " VALUES (?, ?, ?, ?, ?, NULL, ?)",
            (
                (OWNER, f"old{i}", f"old{i}", "knot.test", "spindle.test", "2026-01-01T00:00:00Z")
                for i in range(rows)
            ),
        )
    db.close()


def tack_ingest(url: str, last: int, stored: int = 0) -> tuple[float, float]:
    """Events/s of a real tack process, from its jetstream subscription until
    the cursor of the last event is committed; and its peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = tack_env(tmp_path, url, TACK_LOG_LEVEL="info")
        if stored:
            prefill(tmp_path / "spindle.db", stored)
        proc = TackProcess(env, tmp_path / "tack.log")
        proc.wait_for_log("stream connected", timeout=60)
        started = time.perf_counter()
        rss = 0.0
        while db_cursor(tmp_path / "spindle.db") != last:
            rss = max(rss, peak_rss_mb(proc.proc.pid))
            if proc.proc.poll() is not None:
                raise SystemExit(f"tack exited early; see {tmp_path / 'tack.log'}")
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        rss = max(rss, peak_rss_mb(proc.proc.pid))
        proc.terminate()
        return EVENTS / elapsed, rss


def serve(count: int) -> None:
    """Serve ``count`` events to every subscriber as fast as loopback takes them.

    The frames are built once by ``websockets`` and written with one
    ``sendall`` after the library's handshake: a stand-in sending frame by
    frame in Python tops out near 55k events/s, below what the readers
    measured here can take, and would make every figure a measure of itself.
    Events are served from the start whatever the query asks: each run
    subscribes fresh, and every event is in a wanted collection.
    """
    from websockets.frames import Frame, Opcode
    from websockets.sync.server import serve as ws_serve

    blob = b"".join(
        Frame(Opcode.TEXT, json.dumps(event).encode()).serialize(mask=False)
        for event in make_events(count)
    )

    def handler(conn) -> None:
        try:
            conn.socket.sendall(blob)
            for _ in conn:  # until the subscriber closes
                pass
        except Exception:
            return

    with ws_serve(handler, "127.0.0.1", 0, compression=None) as server:
        print(f"ws://127.0.0.1:{server.socket.getsockname()[1]}/subscribe", flush=True)
        server.serve_forever()


def main() -> None:
    events = make_events(EVENTS)
    server, base = serve_elsewhere(EVENTS)
    url = base + "?" + "&".join(f"wantedCollections={c}" for c in (MEMBER, REPO, COLLABORATOR))
    floor_a = floor_websocket_client(url, EVENTS)
    floor_b = floor_lean_pipeline(url, EVENTS)
    print(
        f"floors (stand-in in its own process): (a) websocket-client + json.loads"
        f" {floor_a:,.0f} events/s; (b) lean pipeline (websockets + tack's validation"
        f" + executemany) {floor_b:,.0f} events/s"
    )
    ingest_eps, rss = tack_ingest(base, events[-1]["time_us"])
    print(
        f"tack ingest: {ingest_eps:,.0f} events/s, {ingest_eps / floor_a:.2f} of floor (a),"
        f" {ingest_eps / floor_b:.2f} of floor (b); peak RSS {rss:.1f} MB"
        " (targets: >= 100,000 events/s and >= 0.8 of floor (a))"
    )
    stored_eps, _ = tack_ingest(base, events[-1]["time_us"], STORED)
    print(
        f"tack ingest with {STORED:,} repo records stored: {stored_eps:,.0f} events/s,"
        f" {stored_eps / ingest_eps:.2f} of the empty-store rate (target >= 0.8)"
    )
    server.kill()
    result = {
        "events": EVENTS,
        "floor_a_eps": round(floor_a),
        "floor_b_eps": round(floor_b),
        "ingest_eps": round(ingest_eps),
        "ratio_a": round(ingest_eps / floor_a, 3),
        "ratio_b": round(ingest_eps / floor_b, 3),
        "rss_mb": round(rss, 1),
        "stored": STORED,
        "ingest_stored_eps": round(stored_eps),
        "stored_ratio": round(stored_eps / ingest_eps, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]))
    else:
        main()
