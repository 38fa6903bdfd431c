"""Container backend overhead, with the image already on the host.

``BENCH_WORKFLOWS`` workflows of one step (``echo``) run straight through
the container backend on podman (network "none" and "bridge"), each timed
from ``run`` to the step's first output line (pull check, network, container
start, exec) and from the step's end to ``run`` returning (container,
network and workspace removed). The floor is ``podman run --rm`` of the
same image running the same ``echo``, measured in the same run. Reported as
p50 and p99 of each, for each network mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import percentile, report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tack.backends import Context, build
from tack.worklogs import LogBook
from tests import containers
from tests.standins import direct_job

WORKFLOWS = int(os.environ.get("BENCH_WORKFLOWS", "30"))
RAW = "steps:\n  - name: hello\n    command: echo hello\n"


class TimedLog:
    """A workflow log that notes when the step's first line and its end came."""

    def __init__(self, log) -> None:
        self._log = log
        self.first_line: float | None = None
        self.step_end: float | None = None

    def data(self, step_id, line, stream="stdout") -> None:
        if line == "hello" and self.first_line is None:
            self.first_line = time.perf_counter()
        self._log.data(step_id, line, stream)

    def end_step(self, step_id, name, kind) -> None:
        if name == "hello":
            self.step_end = time.perf_counter()
        self._log.end_step(step_id, name, kind)

    def __getattr__(self, name):
        return getattr(self._log, name)


def one_workflow(backend, book: LogBook, index: int) -> tuple[float, float]:
    job = direct_job(RAW, "nixery", workflow_id=index)
    log = TimedLog(book.open(index))
    started = time.perf_counter()
    outcome = backend.run(job, log)
    done = time.perf_counter()
    log.close()
    if outcome.status != "success" or log.first_line is None:
        raise SystemExit(f"workflow {index}: {outcome}")
    return (log.first_line - started) * 1000, (done - log.step_end) * 1000


def floor(image: str) -> list[float]:
    times = []
    for _ in range(WORKFLOWS):
        started = time.perf_counter()
        subprocess.run(
            ["podman", "run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024",
             "--ulimit", "nproc=1024:1024", image, "echo", "hello"],
            check=True, capture_output=True,
        )  # fmt: skip
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    reason = containers.problem()
    if reason:
        raise SystemExit(f"cannot measure: {reason}")
    result: dict = {"workflows": WORKFLOWS}
    with tempfile.TemporaryDirectory() as tmp:
        image = containers.import_image(Path(tmp))
        base = floor(image)
        print(
            f"floor (podman run --rm ... echo): p50 {percentile(base, 0.5):.0f} ms,"
            f" p99 {percentile(base, 0.99):.0f} ms"
        )
        result["floor_p50_ms"] = round(percentile(base, 0.5), 1)
        for network in ("none", "bridge"):
            raw = {"type": "container", "runtime": "podman", "image": image,
                   "network": network, "workspace_root": f"{tmp}/ws"}  # fmt: skip
            backend = build("nixery", raw, Context("bench.test", dev=True))
            book = LogBook(Path(tmp) / f"logs-{network}")
            starts, teardowns = zip(
                *(one_workflow(backend, book, i + 1) for i in range(WORKFLOWS)), strict=True
            )
            p50, p99 = percentile(starts, 0.5), percentile(starts, 0.99)
            t50, t99 = percentile(teardowns, 0.5), percentile(teardowns, 0.99)
            print(
                f"network {network}: start -> first step output p50 {p50:.0f} ms, p99 {p99:.0f} ms"
                f" ({p50 / percentile(base, 0.5):.1f}x the floor); teardown p50 {t50:.0f} ms,"
                f" p99 {t99:.0f} ms"
            )
            result[network] = {
                "start_p50_ms": round(p50, 1), "start_p99_ms": round(p99, 1),
                "teardown_p50_ms": round(t50, 1), "teardown_p99_ms": round(t99, 1),
            }  # fmt: skip
        containers.forget(image)
    report(result)


if __name__ == "__main__":
    main()
