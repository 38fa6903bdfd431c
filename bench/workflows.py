"""Workflow throughput on the dummy backend, against the tree the profile
that asked for it was taken on.

``BENCH_PIPELINES`` pipelines of ``BENCH_WORKFLOWS`` dummy workflows (one
step each) go through a knot stand-in to a real tack process with 4
workers; the rate is workflows finished per second, from the first frame
sent to the last ``success`` received on /events. The same is measured, in
the same run, on tack as it was at ``BENCH_BASELINE`` (default 3e099a8, the
tree of the issue asking for twice the rate; taken with ``git archive``
and run from its own directory). Each is run ``BENCH_RUNS`` times, the two
alternating (median and spread). Target: >= 2x the baseline.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import websocket
from _common import RUNS, Spread, report

from tests.standins import (
    OWNER,
    REPO,
    Clock,
    JetstreamStandin,
    KnotStandin,
    TackProcess,
    commit,
    push_pipeline,
    repo,
    tack_env,
)

PIPELINES = int(os.environ.get("BENCH_PIPELINES", "50"))
WORKFLOWS = int(os.environ.get("BENCH_WORKFLOWS", "20"))
BASELINE = os.environ.get("BENCH_BASELINE", "3e099a8")
ROOT = Path(__file__).resolve().parent.parent
STEP = "steps:\n  - name: one\n    command: 'true'\n"


def workflows_per_second(tree: Path) -> float:
    """One run against the tack whose package is in ``tree``."""
    jetstream, knot = JetstreamStandin(), KnotStandin()
    jetstream.add(commit(Clock(), OWNER, REPO, "r1", "create", repo("bench", knot.name)))
    with tempfile.TemporaryDirectory() as tmp:
        env = tack_env(Path(tmp), jetstream.url, SPINDLE_SERVER_MAX_JOB_COUNT="4")
        # Run from the tree itself, so ``python -m tack`` imports its package.
        proc = TackProcess(env, Path(tmp) / "tack.log", prefix=["env", f"--chdir={tree}"])
        atexit.register(lambda: proc.proc.poll() is None and proc.proc.kill())
        try:
            port = proc.wait_for_log("listening", timeout=30)["port"]
            while knot.open_connections < 1:
                time.sleep(0.01)
            return _measure(port, knot)
        finally:
            proc.terminate()


def _measure(port: int, knot: KnotStandin) -> float:
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/events")
    total = PIPELINES * WORKFLOWS
    done = threading.Event()
    finished: list[float] = []

    def read() -> None:
        while len(finished) < total:
            event = json.loads(ws.recv())["event"]
            if event.get("status") == "success":
                finished.append(time.perf_counter())
            elif event.get("status") in ("failed", "timeout", "cancelled"):
                raise SystemExit(f"{event['workflow']} {event['status']}: {event.get('error')}")
        done.set()

    threading.Thread(target=read, daemon=True).start()
    records = [
        push_pipeline(
            knot.name,
            OWNER,
            "bench",
            [(f"p{p}w{w}.yml", "dummy", STEP) for w in range(WORKFLOWS)],
        )
        for p in range(PIPELINES)
    ]
    started = time.perf_counter()
    for record in records:
        knot.send_pipeline(record)
    if not done.wait(300):
        raise SystemExit(f"only {len(finished)} of {total} workflows finished within 300 s")
    ws.close()
    return total / (finished[-1] - started)


def baseline_tree(into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BASELINE, "tack"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        old = baseline_tree(Path(tmp))
        # Alternated, so a machine that warms up or slows down over the run
        # weighs on both alike rather than on whichever went first.
        base_runs, now_runs = [], []
        for _ in range(RUNS):
            base_runs.append(workflows_per_second(old))
            now_runs.append(workflows_per_second(ROOT))
        base, now = Spread(base_runs), Spread(now_runs)
    total = PIPELINES * WORKFLOWS
    print(f"baseline ({BASELINE}): {base} workflows/s")
    print(
        f"tack now: {now} workflows/s for {total} dummy workflows, 4 workers;"
        f" {now.ratio_to(base):.2f}x the baseline (target >= 2x)"
    )
    report(
        {
            "workflows": total,
            "baseline": BASELINE,
            "baseline_wps": base.as_json(),
            "wps": now.as_json(),
            "ratio": round(now.ratio_to(base), 2),
        }
    )


if __name__ == "__main__":
    main()
