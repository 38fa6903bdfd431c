"""The cost of many idle knot subscriptions.

200 repos, each on its own knot stand-in, make a real tack process follow 200
knot event streams (one reader thread each). Once all are connected and idle,
reports tack's RSS, threads, open descriptors and CPU use over 10 s, and the
same per knot. Target on 2 cores: <= 150 MB at 200 knots (issue: 2,000 idle
knots under 250 MB and 3% CPU; see bench/connections.py for 2,000).
"""

from __future__ import annotations

import os
import time

from _common import BenchTack, report

from tests.standins import OWNER, REPO, Clock, JetstreamStandin, KnotStandin, commit, repo

KNOTS = int(os.environ.get("BENCH_KNOTS", "200"))


def main() -> None:
    jetstream = JetstreamStandin()
    clock = Clock()
    knots = [KnotStandin() for _ in range(KNOTS)]
    for index, knot in enumerate(knots):
        jetstream.add(
            commit(clock, OWNER, REPO, f"r{index}", "create", repo(f"repo{index}", knot.name))
        )
    tack = BenchTack(jetstream.url)
    deadline = time.monotonic() + 120
    while sum(knot.open_connections for knot in knots) < KNOTS:
        if time.monotonic() > deadline:
            raise SystemExit("not every knot was subscribed within 120 s")
        time.sleep(0.1)
    time.sleep(2.0)  # idle: let start-up allocations settle
    rss, peak = tack.rss_mb()
    pid = tack.proc.proc.pid
    threads = int(_status(pid)["Threads"])
    descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    before = _cpu_seconds(pid)
    time.sleep(10.0)
    cpu = (_cpu_seconds(pid) - before) / 10.0 * 100
    print(
        f"{KNOTS} idle knot subscriptions: RSS {rss:.1f} MB (peak {peak:.1f} MB),"
        f" {threads} threads, {descriptors} descriptors, {cpu:.2f}% CPU idle;"
        f" per knot {rss / KNOTS * 1024:.0f} KB, {descriptors / KNOTS:.2f} descriptors"
    )
    tack.stop()
    report(
        {
            "knots": KNOTS,
            "rss_mb": round(rss, 1),
            "peak_rss_mb": round(peak, 1),
            "threads": threads,
            "descriptors": descriptors,
            "idle_cpu_percent": round(cpu, 2),
        }
    )


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
