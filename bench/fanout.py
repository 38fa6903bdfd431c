"""/events fan-out: 100 subscribers while 10,000 status events are produced.

Status events come from dummy workflows (pending, running, success each)
sent through a knot stand-in to a real tack process. Subscribers run in
separate client processes so the measuring side is not the bottleneck.
Reports frames delivered per second in total (``BENCH_RUNS`` runs, each
with a fresh tack: median and spread) and tack's peak RSS.
Targets on 2 cores: >= 50,000 frames/s, RSS as low as it goes.
"""

from __future__ import annotations

import multiprocessing
import os
import time

from _common import RUNS, Spread, report, tack_serving_one_repo

from tests.standins import (
    OWNER,
    push_pipeline,
)

SUBSCRIBERS = int(os.environ.get("BENCH_SUBSCRIBERS", "100"))
EVENTS = int(os.environ.get("BENCH_STATUS_EVENTS", "10000"))
CLIENT_PROCESSES = 2


def subscribe(port: int, count: int, expected: int, ready, results) -> None:
    """One client process: ``count`` subscribers, each reading until ``expected`` frames."""
    import threading

    import websocket

    sockets = [
        websocket.create_connection(f"ws://127.0.0.1:{port}/events?cursor=1") for _ in range(count)
    ]
    ready.put(count)
    ends: list[float] = []

    marker = b'"nsid":"sh.tangled.pipeline.status"'

    def drain(ws) -> None:
        # Count frames in the raw byte stream (one marker per frame) instead
        # of decoding each in Python: the measuring side must stay cheap on a
        # machine whose two cores it shares with tack.
        seen, tail = 0, b""
        while seen < expected:
            chunk = tail + ws.sock.recv(1 << 20)
            seen += chunk.count(marker)
            tail = chunk[-(len(marker) - 1) :]
        ends.append(time.perf_counter())

    threads = [threading.Thread(target=drain, args=(ws,)) for ws in sockets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(max(ends))


def one_run() -> tuple[int, int, float, float]:
    """A fresh tack, SUBSCRIBERS subscribers, EVENTS events: (subscribers,
    events, frames/s, peak RSS MB)."""
    tack, knot, repo_name = tack_serving_one_repo(SPINDLE_SERVER_MAX_JOB_COUNT="4")
    workflows = EVENTS // 3
    expected = workflows * 3
    ready, results = multiprocessing.Queue(), multiprocessing.Queue()
    share = SUBSCRIBERS // CLIENT_PROCESSES
    clients = [
        multiprocessing.Process(target=subscribe, args=(tack.port, share, expected, ready, results))
        for _ in range(CLIENT_PROCESSES)
    ]
    for client in clients:
        client.start()
    connected = sum(ready.get(timeout=60) for _ in clients)
    started = time.perf_counter()
    for first in range(0, workflows, 60):
        names = [
            (f"w{i}.yml", "dummy", "steps: []") for i in range(first, min(first + 60, workflows))
        ]
        knot.send_pipeline(push_pipeline(knot.name, OWNER, repo_name, names))
    finished = max(results.get(timeout=300) for _ in clients)
    for client in clients:
        client.join()
    _, peak = tack.rss_mb()
    tack.stop()
    return connected, expected, expected * connected / (finished - started), peak


def main() -> None:
    runs = [one_run() for _ in range(RUNS)]
    connected, expected = runs[0][0], runs[0][1]
    rate, peak = Spread([run[2] for run in runs]), max(run[3] for run in runs)
    print(
        f"{connected} subscribers x {expected} events: {rate} frames/s (target >= 50,000),"
        f" peak RSS {peak:.1f} MB"
    )
    report(
        {
            "subscribers": connected,
            "events": expected,
            "frames_per_s": rate.as_json(),
            "rss_mb": round(peak, 1),
        }
    )


if __name__ == "__main__":
    main()
