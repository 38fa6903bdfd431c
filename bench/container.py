"""Container backend overhead, with the image already on the host.

``BENCH_WORKFLOWS`` workflows of one step (``echo``) run straight through
the container backend on podman (network "none" and "bridge"), each timed
from ``run`` to the step's first output line (pull check, network, container
start, exec) and from the step's end to ``run`` returning (container,
network and workspace removed). The floor is ``podman run --rm`` of the
same image running the same ``echo``, measured in the same run. The floor and both modes are
measured in turn ``BENCH_RUNS`` times: the median and spread of each run's
p50 and p99.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RUNS, Latency, report

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
    result: dict = {"workflows": WORKFLOWS, "runs": RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        image = containers.import_image(Path(tmp))
        backends = {
            network: build(
                "nixery",
                {"type": "container", "runtime": "podman", "image": image,
                 "network": network, "workspace_root": f"{tmp}/ws"},
                Context("bench.test", dev=True),
            )
            for network in ("none", "bridge")
        }  # fmt: skip
        floors: list[list[float]] = []
        starts: dict[str, list[list[float]]] = {network: [] for network in backends}
        teardowns: dict[str, list[list[float]]] = {network: [] for network in backends}
        workflow_id = 0
        for run in range(RUNS):  # the floor and both modes in turn, each run
            floors.append(floor(image))
            for network, backend in backends.items():
                book = LogBook(Path(tmp) / f"logs-{network}-{run}")
                timed = []
                for _ in range(WORKFLOWS):
                    workflow_id += 1
                    timed.append(one_workflow(backend, book, workflow_id))
                starts[network].append([start for start, _ in timed])
                teardowns[network].append([teardown for _, teardown in timed])
        base = Latency(floors)
        print(f"floor (podman run --rm ... echo): {base}")
        result["floor"] = base.as_json()
        for network in backends:
            start, teardown = Latency(starts[network]), Latency(teardowns[network])
            print(
                f"network {network}: start -> first step output {start}"
                f" ({start.ratio_to(base):.1f}x the floor); teardown {teardown}"
            )
            result[network] = {"start": start.as_json(), "teardown": teardown.as_json()}
        containers.forget(image)
    report(result)


if __name__ == "__main__":
    main()
