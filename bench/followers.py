"""Log followers of other workflows against one chatty build (issue 13, finding 2).

A real tack runs ``BENCH_FOLLOWERS`` (200) long dummy workflows, each one
step a minute, so they are running but quiet. One shell workflow then prints
``BENCH_LOG_LINES`` lines as fast as ``seq`` gives them, while 0, 10 and
``BENCH_FOLLOWERS`` followers are connected to the quiet workflows: half on
``/logs``, half on ``subscribePipelineLogs``. The writer's rate is its lines
over the time from its first line to its last, as its own log stamps them.

Every follower used to wake on every line of every workflow and re-read its
file; now only a workflow's own followers wake. The floor is the same build
with no follower at all, measured in the same round, before and after the
others: each round measures the floor, 10 and 200 followers and the floor
again, and takes its ratios to the mean of its two floors (one build's rate
drifts by a third on the shared VM within a minute, and the last of a round
bore all of it). Target: 200 followers of other workflows cost the writer at
most 20% (ratio >= 0.8).

Then ``BENCH_DEPARTING`` (1,000) followers of one quiet workflow leave at
once, ``BENCH_RUNS`` times: reported is the slowest ``GET /`` just after,
against the slowest while they follow. Their threads woke together and
stalled the port for 0.26-1.2 s before they took turns tidying up.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path

import websocket
from _common import RUNS, Spread, report, tack_serving_one_repo
from connections import time_banner

from tests.appview_client import AppviewClient
from tests.spindle_clients import EventsClient
from tests.standins import OWNER, push_pipeline, wait_until

FOLLOWERS = int(os.environ.get("BENCH_FOLLOWERS", "200"))
DEPARTING = int(os.environ.get("BENCH_DEPARTING", "1000"))
LINES = int(os.environ.get("BENCH_LOG_LINES", "200000"))
QUIET = "dummy:\n  delay: 60\nsteps:\n" + "".join(
    f"  - name: wait {i}\n    command: 'true'\n" for i in range(30)
)
SETTLE = 2.0
CHATTY = f"steps:\n  - name: print\n    command: seq 1 {LINES}\n"


class Bench:
    def __init__(self) -> None:
        self.tack, self.knot, self.repo_name = tack_serving_one_repo(
            SPINDLE_SERVER_MAX_JOB_COUNT=str(FOLLOWERS + 2),
            TACK_MAX_LOG_BYTES=str(1 << 34),
        )
        self.events = EventsClient(self.tack.port, cursor=None).start()
        self.log_dir = self.tack.db_path.parent / "logs"
        self.builds = 0

    def start_quiet_workflows(self) -> list[tuple[str, str]]:
        """The quiet workflows, running: (pipeline rkey, name) of each, in
        pipelines of 50 (a knot's pipeline holds at most 64)."""
        names = [f"quiet{i}.yml" for i in range(FOLLOWERS)]
        quiet = []
        for first in range(0, FOLLOWERS, 50):
            batch = names[first : first + 50]
            record = push_pipeline(
                self.knot.name, OWNER, self.repo_name, [(n, "dummy", QUIET) for n in batch]
            )
            rkey = self.knot.send_pipeline(record)
            quiet += [(rkey, name) for name in batch]
        wait_until(
            lambda: self._count("running", names) == len(names), 60, "quiet workflows running"
        )
        return quiet

    def chatty_rate(self) -> float:
        """Run the chatty build once; the lines per second its log shows."""
        self.builds += 1
        name = f"chatty{self.builds}.yml"
        before = set(self.log_dir.iterdir())
        self.knot.send_pipeline(
            push_pipeline(self.knot.name, OWNER, self.repo_name, [(name, "shell", CHATTY)])
        )
        wait_until(lambda: self._count("success", [name]) == 1, 120, f"{name} finished")
        # The quiet workflows' logs may show up late too; the chatty one is the big one.
        path = max(set(self.log_dir.iterdir()) - before, key=lambda p: p.stat().st_size)
        return written_rate(path)

    def _count(self, status: str, names: list[str]) -> int:
        """How many of ``names`` reached ``status``; a failed one ends the bench."""
        wanted, count = set(names), 0
        for frame in list(self.events.frames):
            event = frame["event"]
            if event.get("status") in ("failed", "timeout"):
                raise SystemExit(f"{event['workflow']} {event['status']}: {event.get('error')}")
            count += event.get("status") == status and event["workflow"] in wanted
        return count


def written_rate(path: Path) -> float:
    """Data lines over the time between the first and the last one."""
    stamps = []
    with open(path, "rb") as handle:
        for line in handle:
            entry = json.loads(line)
            if entry["kind"] == "data":
                stamps.append(entry["time"])
    if len(stamps) != LINES:
        raise SystemExit(f"{path.name} has {len(stamps)} data lines, not {LINES}")
    first, last = (
        datetime.fromisoformat(s.replace("Z", "+00:00")) for s in (stamps[0], stamps[-1])
    )
    return (len(stamps) - 1) / (last - first).total_seconds()


def connect_followers(port: int, knot: str, quiet: list[tuple[str, str]]) -> list:
    """Half on /logs, half on subscribePipelineLogs, each following one quiet workflow."""
    client = AppviewClient(port)
    followers = []
    for index, (rkey, name) in enumerate(quiet):
        if index % 2:
            followers.append(client.subscribe_logs(rkey, [name]).ws)
        else:
            url = f"ws://127.0.0.1:{port}/logs/{knot}/{rkey}/{name}"
            followers.append(websocket.create_connection(url))
    return followers


def main() -> None:
    bench = Bench()
    try:
        quiet = bench.start_quiet_workflows()
        counts = sorted({0, 10, FOLLOWERS})
        rates: dict[int, list[float]] = {count: [] for count in counts}
        ratios: dict[int, list[float]] = {count: [] for count in counts}
        bench.chatty_rate()  # warm up: the first build pays for imports and the page cache
        for _ in range(RUNS):
            for count in counts:
                followers = connect_followers(bench.tack.port, bench.knot.name, quiet[:count])
                time.sleep(SETTLE)  # what connecting costs (each replays its log) is not following
                rates[count].append(bench.chatty_rate())
                for ws in followers:
                    ws.close()
            rates[0].append(bench.chatty_rate())  # the floor again, after the others
            floor = (rates[0][-1] + rates[0][-2]) / 2
            for count in counts:
                ratios[count].append(rates[count][-1] / floor)
        idle_worst, departure_worst = departures(bench, quiet)
    finally:
        bench.tack.stop()
    result: dict = {"lines": LINES, "runs": RUNS}
    floor = Spread(rates[0])
    print(f"floor (no followers): the build writes {floor} lines/s")
    for count in counts[1:]:
        rate, ratio = Spread(rates[count]), Spread(ratios[count])
        print(
            f"{count} followers of other workflows: {rate} lines/s, of the floor {ratio:.2f}"
            + (" (target >= 0.8)" if count == FOLLOWERS else "")
        )
        result[f"followers_{count}"] = {"lines_per_s": rate.as_json(), "ratio": ratio.as_json()}
    result["floor_lines_per_s"] = floor.as_json()
    print(
        f"{DEPARTING} followers leaving at once: slowest GET / {departure_worst:.0f} ms,"
        f" {departure_worst.ratio_to(idle_worst):.0f}x the slowest while they follow"
        f" ({idle_worst.median:.1f} ms)"
    )
    result["departure_worst_get_ms"] = departure_worst.as_json()
    result["following_worst_get_ms"] = idle_worst.as_json()
    report(result)


def departures(bench: Bench, quiet: list[tuple[str, str]]) -> tuple[Spread, Spread]:
    """(slowest GET / while DEPARTING followers follow, slowest GET / once
    they all leave at once), ``RUNS`` times. Each follower holds a thread;
    leaving together, those threads wake together."""
    following, leaving = [], []
    for _ in range(RUNS):
        crowd = connect_followers(bench.tack.port, bench.knot.name, quiet[:1] * DEPARTING)
        time.sleep(SETTLE)
        following.append(max(time_banner(bench.tack.port, rounds=30)))
        for ws in crowd:
            ws.sock.close()
        leaving.append(max(time_banner(bench.tack.port, rounds=30, timeout=60)))
        time.sleep(SETTLE)
    return Spread(following), Spread(leaving)


if __name__ == "__main__":
    main()
