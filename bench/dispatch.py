"""Dispatch latency: knot frame sent -> its ``pending`` frame received on /events.

Two scenarios against a real tack process fed by a knot stand-in, each run
``BENCH_RUNS`` times (median and spread of each run's p50 and p99):

- one at a time: ``BENCH_PIPELINES`` pipelines (one dummy workflow each),
  each sent once the one before is pending, 4 workers;
- paced: pipelines arriving at ``BENCH_RATE`` a second whatever happens,
  ``BENCH_WORKERS`` workers (default 200): every new pipeline used to wake
  every idle worker.

The floor is the same round trip through the knot stand-in and a websocket
client with nothing in between: a frame echoed straight back, measured in
the same run. Targets on 2 cores: p50 <= 3 ms in both scenarios.
"""

from __future__ import annotations

import os
import time

import websocket
from _common import RUNS, Latency, PendingWatch, report, tack_serving_one_repo

from tests.standins import OWNER, KnotStandin, push_pipeline

PIPELINES = int(os.environ.get("BENCH_PIPELINES", "1000"))
RATE = float(os.environ.get("BENCH_RATE", "50"))
PACED = int(os.environ.get("BENCH_PACED", "500"))
WORKERS = os.environ.get("BENCH_WORKERS", "200")


def _pipeline(knot: KnotStandin, repo_name: str, index: int) -> dict:
    return push_pipeline(knot.name, OWNER, repo_name, [(f"w{index}.yml", "dummy", "steps: []")])


def one_at_a_time() -> list[float]:
    tack, knot, repo_name = tack_serving_one_repo()
    try:
        watch = PendingWatch(tack.port)
        latencies = []
        for index in range(PIPELINES):
            record = _pipeline(knot, repo_name, index)
            sent = time.perf_counter()
            rkey = knot.send_pipeline(record)
            latencies.append((watch.wait_for(rkey) - sent) * 1000)
        return latencies
    finally:
        tack.stop()


def paced() -> list[float]:
    tack, knot, repo_name = tack_serving_one_repo(SPINDLE_SERVER_MAX_JOB_COUNT=WORKERS)
    try:
        watch = PendingWatch(tack.port)
        sent_at: dict[str, float] = {}
        start = time.perf_counter()
        for index in range(PACED):
            record = _pipeline(knot, repo_name, index)
            delay = start + index / RATE - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            sent_at[knot.send_pipeline(record)] = sent
        return [(watch.wait_for(rkey) - sent) * 1000 for rkey, sent in sent_at.items()]
    finally:
        tack.stop()


def floor() -> list[float]:
    """A frame from the knot stand-in to a websocket client and nothing else:
    what any dispatch costs before tack does anything."""
    knot = KnotStandin()
    ws = websocket.create_connection(f"ws://{knot.name}/events")
    try:
        latencies = []
        for index in range(min(PIPELINES, 300)):
            record = _pipeline(knot, "floor", index)
            sent = time.perf_counter()
            knot.send_pipeline(record)
            ws.recv()
            latencies.append((time.perf_counter() - sent) * 1000)
        return latencies
    finally:
        ws.close()


def main() -> None:
    floor_runs = Latency([floor() for _ in range(RUNS)])
    single = Latency([one_at_a_time() for _ in range(RUNS)])
    busy = Latency([paced() for _ in range(RUNS)])
    print(f"floor (knot stand-in -> client, nothing between): {floor_runs}")
    print(
        f"{PIPELINES} pipelines one at a time, 4 workers: {single};"
        f" p50 {single.ratio_to(floor_runs):.1f}x the floor (target p50 <= 3 ms)"
    )
    print(
        f"{PACED} pipelines at {RATE:.0f}/s, {WORKERS} workers: {busy};"
        f" p50 {busy.ratio_to(floor_runs):.1f}x the floor (target p50 <= 3 ms)"
    )
    report(
        {
            "floor": floor_runs.as_json(),
            "one_at_a_time": single.as_json(),
            "paced": busy.as_json(),
            "runs": RUNS,
        }
    )


if __name__ == "__main__":
    main()
