"""Shell backend throughput: 200 workflows of one `true` step, 4 workers.

Each workflow skips the clone. Latency is per workflow, from its dispatch to
a worker (`running` received on /events) to its `success` received; the
rate is workflows finished per second from the first `pending` to the last
`success`. Target: p50 <= 150 ms.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time

import websocket
from _common import percentile, report, tack_serving_one_repo

from tests.standins import OWNER, push_pipeline

WORKFLOWS = int(os.environ.get("BENCH_WORKFLOWS", "200"))
STEP = "steps:\n  - name: nothing\n    command: 'true'\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "tack.toml")
        with open(config, "w") as handle:
            handle.write(f'[backends.shell]\ntype = "shell"\nworkspace_root = "{tmp}/ws"\n')
        tack, knot, repo_name = tack_serving_one_repo(
            SPINDLE_SERVER_MAX_JOB_COUNT="4", TACK_CONFIG=config
        )
        ws = websocket.create_connection(f"ws://127.0.0.1:{tack.port}/events")
        seen: dict[tuple[str, str], float] = {}
        done = threading.Event()

        def read() -> None:
            successes = 0
            while successes < WORKFLOWS:
                event = json.loads(ws.recv())["event"]
                seen[(event["workflow"], event["status"])] = time.perf_counter()
                successes += event["status"] == "success"
                if event["status"] in ("failed", "timeout"):
                    raise SystemExit(f"{event['workflow']} {event['status']}: {event.get('error')}")
            done.set()

        threading.Thread(target=read, daemon=True).start()
        names = [f"w{i}.yml" for i in range(WORKFLOWS)]
        for first in range(0, WORKFLOWS, 50):
            knot.send_pipeline(
                push_pipeline(
                    knot.name,
                    OWNER,
                    repo_name,
                    [(n, "shell", STEP) for n in names[first : first + 50]],
                )
            )
        if not done.wait(300):
            raise SystemExit("not every workflow finished within 300 s")
        latencies = [(seen[(n, "success")] - seen[(n, "running")]) * 1000 for n in names]
        elapsed = max(seen[(n, "success")] for n in names) - min(
            seen[(n, "pending")] for n in names
        )
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        rate = WORKFLOWS / elapsed
        print(
            f"{WORKFLOWS} shell workflows, 4 workers: dispatch->success p50 {p50:.0f} ms, "
            f"p99 {p99:.0f} ms, {rate:.1f} workflows/s"
        )
        tack.stop()
        report(
            {
                "workflows": WORKFLOWS,
                "p50_ms": round(p50, 1),
                "p99_ms": round(p99, 1),
                "workflows_per_s": round(rate, 1),
            }
        )


if __name__ == "__main__":
    main()
