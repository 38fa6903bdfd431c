"""Dispatch latency: knot frame sent -> its ``pending`` frame received on /events.

1,000 pipelines (one dummy workflow each) go through a knot stand-in to a real
tack process, one at a time. Target on 2 cores: p99 <= 50 ms.
"""

from __future__ import annotations

import os
import threading
import time

from _common import percentile, report, tack_serving_one_repo

from tests.spindle_clients import EventsClient
from tests.standins import (
    OWNER,
    push_pipeline,
)

PIPELINES = int(os.environ.get("BENCH_PIPELINES", "1000"))


def main() -> None:
    tack, knot, repo_name = tack_serving_one_repo()
    client = EventsClient(tack.port)
    seen = threading.Condition()
    pending_at: dict[str, float] = {}

    def read() -> None:
        import json

        while True:
            try:
                frame = json.loads(client.ws.recv())
            except Exception:
                return  # tack stopped
            if frame["event"]["status"] == "pending":
                rkey = frame["event"]["pipeline"].rsplit("/", 1)[1]
                with seen:
                    pending_at[rkey] = time.perf_counter()
                    seen.notify_all()

    threading.Thread(target=read, daemon=True).start()
    latencies = []
    for index in range(PIPELINES):
        record = push_pipeline(
            knot.name, OWNER, repo_name, [(f"w{index}.yml", "dummy", "steps: []")]
        )
        sent = time.perf_counter()
        rkey = knot.send_pipeline(record)
        with seen:
            if not seen.wait_for(lambda rkey=rkey: rkey in pending_at, 10):
                raise SystemExit(f"no pending frame for pipeline {index}")
        latencies.append((pending_at[rkey] - sent) * 1000)
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    if os.environ.get("BENCH_VERBOSE"):
        print(
            "p90",
            percentile(latencies, 0.9),
            "p95",
            percentile(latencies, 0.95),
            "max",
            max(latencies),
        )
        print("slowest indexes", sorted(range(len(latencies)), key=lambda i: -latencies[i])[:15])
    print(f"{PIPELINES} pipelines: dispatch p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    tack.stop()
    report({"pipelines": PIPELINES, "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)})


if __name__ == "__main__":
    main()
