"""Shell backend throughput: 200 workflows of one `true` step, 4 workers.

Each workflow skips the clone. Latency is per workflow, from its dispatch to
a worker (`running` received on /events) to its `success` received; the
rate is workflows finished per second from the first `pending` to the last
`success`. Each of ``BENCH_RUNS`` runs starts a fresh tack. Target: p50 <= 150 ms.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time

import websocket
from _common import RUNS, Latency, Spread, report, tack_serving_one_repo

from tests.standins import OWNER, push_pipeline

WORKFLOWS = int(os.environ.get("BENCH_WORKFLOWS", "200"))
STEP = "steps:\n  - name: nothing\n    command: 'true'\n"


def one_run(config: str) -> tuple[list[float], float]:
    """WORKFLOWS shell workflows through a fresh tack: (latencies ms, workflows/s)."""
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
        batch = [(n, "shell", STEP) for n in names[first : first + 50]]
        knot.send_pipeline(push_pipeline(knot.name, OWNER, repo_name, batch))
    if not done.wait(300):
        raise SystemExit("not every workflow finished within 300 s")
    tack.stop()
    latencies = [(seen[(n, "success")] - seen[(n, "running")]) * 1000 for n in names]
    elapsed = max(seen[(n, "success")] for n in names) - min(seen[(n, "pending")] for n in names)
    return latencies, WORKFLOWS / elapsed


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "tack.toml")
        with open(config, "w") as handle:
            handle.write(f'[backends.shell]\ntype = "shell"\nworkspace_root = "{tmp}/ws"\n')
        runs = [one_run(config) for _ in range(RUNS)]
    latency = Latency([latencies for latencies, _ in runs])
    rate = Spread([rate for _, rate in runs])
    print(
        f"{WORKFLOWS} shell workflows, 4 workers: dispatch->success {latency}"
        f" (target p50 <= 150 ms), {rate:.1f} workflows/s"
    )
    report({"workflows": WORKFLOWS, **latency.as_json(), "workflows_per_s": rate.as_json()})


if __name__ == "__main__":
    main()
