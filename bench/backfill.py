"""/events backfill at size, and live subscribers during it (issue 13, finding 5).

The store holds ``BENCH_EVENTS`` (1,000,000) status events, written directly
(making them through workflows would measure workflows). Against a real tack:

1. ``first_id_after`` (where a cursor's backfill starts), timed in this
   process on the same file, against a primary-key lookup (the floor).
2. Backfill: a subscriber with ``cursor=1`` reads every stored event, frames
   counted by walking their headers. Floor: the same frames read straight
   out of SQLite here, with nothing sent. Target: >= 200,000 frames/s.
3. Live during backfill: pipelines arrive at ``BENCH_RATE`` a second from a
   knot stand-in, each timed from the knot's frame to its ``pending`` on a
   live subscriber, first with nothing else going on (the floor), then while
   another process backfills the million events again and again. Target:
   live p99 <= 20 ms during a backfill.

Each figure is measured ``BENCH_RUNS`` times: median and spread.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import websocket
from _common import (
    RUNS,
    PendingWatch,
    Spread,
    count_frames,
    insert_rows,
    percentile,
    report,
    tack_serving_one_repo,
)

from tests.standins import OWNER, push_pipeline

EVENTS = int(os.environ.get("BENCH_EVENTS", "1000000"))
RATE = float(os.environ.get("BENCH_RATE", "20"))
LIVE = int(os.environ.get("BENCH_LIVE_PIPELINES", "200"))
LOOKUPS = 2000


def fill_store(path: Path) -> tuple[int, int]:
    """EVENTS status events as tack writes them; (first, last) created ns."""
    from tack import store, tid

    db = store.open_database(str(path))
    start_us = time.time_ns() // 1000 - EVENTS * 10
    rows = []
    for index in range(EVENTS):
        created_us = start_us + index * 10
        rkey = tid.encode(created_us, 7)
        event = {
            "$type": "sh.tangled.pipeline.status",
            "pipeline": f"at://did:web:knot.example.com/sh.tangled.pipeline/{rkey}",
            "workflow": f"w{index % 20}.yml",
            "status": ("pending", "running", "success")[index % 3],
            "createdAt": "2026-09-01T10:00:00.000000Z",
        }
        frame = {"rkey": rkey, "nsid": "sh.tangled.pipeline.status", "event": event}
        rows.append((rkey, created_us * 1000, index % 1000 + 1, event["status"], json.dumps(frame)))
    # Events point at their workflow (a foreign key): a thousand finished
    # workflows of a thousand pipelines carry them.
    owners = [(f"p{n:04d}", n * 1000) for n in range(1, 1001)]
    knot = "knot.example.com"
    with db.atomic():
        insert_rows(
            db,
            "pipeline",
            "knot, rkey, repo_owner, repo_name, record, accepted_at, kind",
            [(knot, rkey, "did:plc:owner", "r", "{}", at, "push") for rkey, at in owners],
        )
        insert_rows(
            db,
            "workflow",
            "knot, rkey, name, engine, status, created_at, updated_at",
            [(knot, rkey, "w.yml", "dummy", "success", at, at) for rkey, at in owners],
        )
        insert_rows(db, "status_event", "rkey, created, workflow_id, status, frame", rows)
    db.close()
    return rows[0][1], rows[-1][1]


# --- 1. where a cursor starts --------------------------------------------------------------


def cursor_lookup(path: Path, first_ns: int, last_ns: int) -> dict:
    from tack import store
    from tack.statuses import StatusLog
    from tack.store import StatusEvent

    db = store.open_database(str(path))
    statuses = StatusLog(db)
    cursors = [random.randrange(first_ns, last_ns) for _ in range(LOOKUPS)]
    ids = [random.randrange(1, EVENTS) for _ in range(LOOKUPS)]

    def timed(call, values) -> list[float]:
        times = []
        for value in values:
            started = time.perf_counter()
            call(value)
            times.append((time.perf_counter() - started) * 1e6)
        return times

    def by_id(event_id: int) -> int:
        return StatusEvent.select(StatusEvent.id).where(StatusEvent.id == event_id).scalar()

    runs, floors = [], []
    for _ in range(RUNS):
        runs.append(percentile(timed(statuses.first_id_after, cursors), 0.99))
        floors.append(percentile(timed(by_id, ids), 0.99))
    db.close()
    cost, floor = Spread(runs), Spread(floors)
    print(
        f"first_id_after with {EVENTS:,} events: p99 {cost:.0f} us;"
        f" floor (a primary-key lookup) p99 {floor:.0f} us, ratio {cost.ratio_to(floor):.1f}"
    )
    return {"first_id_after_p99_us": cost.as_json(), "lookup_floor_p99_us": floor.as_json()}


# --- 2. backfill -----------------------------------------------------------------------------


def backfill_once(port: int) -> float:
    """One subscriber reads every stored event; frames a second."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/events?cursor=1", timeout=120)
    started = time.perf_counter()
    count, first, last = count_frames(ws.sock, 0x1, until=EVENTS)
    elapsed = time.perf_counter() - started
    ws.close()
    json.loads(first), json.loads(last)  # what was counted is what tack sends
    return count / elapsed


def store_read_once(path: Path) -> float:
    """The same frames read out of SQLite and nothing else; rows a second."""
    db = sqlite3.connect(path)
    started = time.perf_counter()
    cursor = db.execute("SELECT id, frame FROM status_event ORDER BY id")
    count = 0
    while rows := cursor.fetchmany(1000):
        count += len(rows)
    elapsed = time.perf_counter() - started
    db.close()
    return count / elapsed


def backfill_rate(port: int, path: Path) -> dict:
    rates, floors = [], []
    for _ in range(RUNS):
        floors.append(store_read_once(path))
        rates.append(backfill_once(port))
    rate, floor = Spread(rates), Spread(floors)
    print(
        f"backfill of {EVENTS:,} events to one subscriber: {rate} frames/s"
        f" (target >= 200,000); floor (the same rows read from SQLite, nothing sent)"
        f" {floor} rows/s, ratio {rate.ratio_to(floor):.2f}"
    )
    return {"backfill_frames_per_s": rate.as_json(), "store_read_rows_per_s": floor.as_json()}


# --- 3. live subscribers during a backfill ---------------------------------------------------


def keep_backfilling(port: int, stop, done) -> None:
    """A separate process: backfills from the start, again and again."""
    while not stop.is_set():
        backfill_once(port)
        done.value += 1


def paced_dispatch(tack, knot, repo_name: str, watch: PendingWatch) -> list[float]:
    sent_at: dict[str, float] = {}
    start = time.perf_counter()
    for index in range(LIVE):
        record = push_pipeline(
            knot.name, OWNER, repo_name, [(f"live{index}.yml", "dummy", "steps: []")]
        )
        delay = start + index / RATE - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent_at[knot.send_pipeline(record)] = time.perf_counter()
    return [(watch.wait_for(rkey) - sent) * 1000 for rkey, sent in sent_at.items()]


def live_during_backfill(tack, knot, repo_name: str) -> dict:
    watch = PendingWatch(tack.port)
    quiet, busy, backfills = [], [], 0
    for _ in range(RUNS):
        quiet.append(percentile(paced_dispatch(tack, knot, repo_name, watch), 0.99))
        stop, done = multiprocessing.Event(), multiprocessing.Value("i", 0)
        backfiller = multiprocessing.Process(target=keep_backfilling, args=(tack.port, stop, done))
        backfiller.start()
        time.sleep(0.5)  # the backfill is under way
        busy.append(percentile(paced_dispatch(tack, knot, repo_name, watch), 0.99))
        stop.set()
        backfiller.join(timeout=120)
        backfills += done.value
    during, floor = Spread(busy), Spread(quiet)
    print(
        f"{LIVE} pipelines at {RATE:.0f}/s, knot frame -> pending on a live subscriber:"
        f" p99 {floor:.1f} ms alone; p99 {during:.1f} ms during backfills of {EVENTS:,} events"
        f" ({backfills} completed meanwhile), ratio {during.ratio_to(floor):.1f}"
        f" (target <= 20 ms)"
    )
    return {"live_p99_ms": during.as_json(), "live_floor_p99_ms": floor.as_json()}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="tack-bench-backfill-"))
    try:
        path = root / "spindle.db"
        first_ns, last_ns = fill_store(path)
        result: dict = {"events": EVENTS, "runs": RUNS}
        result |= cursor_lookup(path, first_ns, last_ns)
        tack, knot, repo_name = tack_serving_one_repo(
            SPINDLE_SERVER_DB_PATH=str(path), SPINDLE_SERVER_MAX_JOB_COUNT="4"
        )
        try:
            result |= backfill_rate(tack.port, path)
            result |= live_during_backfill(tack, knot, repo_name)
        finally:
            tack.stop()
            knot.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(result)


if __name__ == "__main__":
    main()
