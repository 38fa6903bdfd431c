"""Jetstream ingest throughput: tack's full ingest against the raw floor.

Serves N jetstream-shaped events (mostly repo upserts, some members,
collaborators and deletes) from the loopback stand-in, then measures in one run:

- raw floor: a websocket-client consumer that only receives and JSON-decodes;
- ingest: a real ``python -m tack`` process, from its subscription until the
  cursor of the last event is committed; and that process's peak RSS.

- ingest again with ``BENCH_STORED`` repo records already stored (written
  through tack's own migrations before it starts): ingest must not slow
  with the store (target: >= 0.8 of the empty-store rate).

Targets on a 2-core machine: ingest >= 10,000 events/s, ratio >= 0.5, RSS <= 100 MB.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import json
import os
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


def raw_floor(url: str, count: int) -> float:
    """Events per second for a consumer that only receives and decodes."""
    ws = websocket.create_connection(url, skip_utf8_validation=True)
    started = time.perf_counter()
    for _ in range(count):
        json.loads(ws.recv())
    elapsed = time.perf_counter() - started
    ws.close()
    return count / elapsed


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


def tack_ingest(
    url: str, standin: JetstreamStandin, last: int, stored: int = 0
) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = tack_env(tmp_path, url, TACK_LOG_LEVEL="warning")
        if stored:
            prefill(tmp_path / "spindle.db", stored)
        before = len(standin.subscriptions)
        proc = TackProcess(env, tmp_path / "tack.log")
        while len(standin.subscriptions) == before:
            time.sleep(0.005)
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


def main() -> None:
    events = make_events(EVENTS)
    standin = JetstreamStandin()
    standin.add(*events)
    url = (
        standin.url + "?" + "&".join(f"wantedCollections={c}" for c in (MEMBER, REPO, COLLABORATOR))
    )
    raw_eps = raw_floor(url, EVENTS)
    print(f"raw floor: {raw_eps:,.0f} events/s")
    ingest_eps, rss = tack_ingest(standin.url, standin, events[-1]["time_us"])
    print(f"tack ingest: {ingest_eps:,.0f} events/s, peak RSS {rss:.1f} MB")
    stored_eps, _ = tack_ingest(standin.url, standin, events[-1]["time_us"], STORED)
    print(
        f"tack ingest with {STORED:,} repo records stored: {stored_eps:,.0f} events/s,"
        f" {stored_eps / ingest_eps:.2f} of the empty-store rate (target >= 0.8)"
    )
    standin.close()
    result = {
        "events": EVENTS,
        "raw_eps": round(raw_eps),
        "ingest_eps": round(ingest_eps),
        "ratio": round(ingest_eps / raw_eps, 3),
        "rss_mb": round(rss, 1),
        "stored": STORED,
        "ingest_stored_eps": round(stored_eps),
        "stored_ratio": round(stored_eps / ingest_eps, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
