"""The cost of many idle knot subscriptions.

``BENCH_KNOTS`` repos (default 2,000), each on a knot of its own (an idle
knot port from ``connections.IdleKnots``), make a real tack process follow
that many knot event streams. Once all are connected and idle, reports
tack's RSS, threads and open descriptors, and its CPU use over
``BENCH_RUNS`` windows of 10 s (median and spread); and each per knot.
The floor is the same tack following no knot, measured in the same run.
Target on 2 cores: 2,000 idle knots under 250 MB and 3% CPU.

Then every stream is dropped at once, ``BENCH_RUNS`` times, as when tack's
own network blips: reported are the time until all are followed again and
the slowest ``GET /`` meanwhile (one every 10 ms), against the slowest of
as many while all were idle. With a thread per knot, the 2,000 threads
waking together kept the port from answering for 3 to 30 s before
connections took turns (``TACK_KNOT_CONNECTS_PER_SECOND``).
"""

from __future__ import annotations

import os
import time

from _common import RUNS, BenchTack, Spread, report
from connections import IdleKnots, time_banner

from tests.standins import OWNER, REPO, Clock, JetstreamStandin, commit, repo

KNOTS = int(os.environ.get("BENCH_KNOTS", "2000"))
WINDOW = 10.0


def idle_figures(tack: BenchTack) -> tuple[float, int, int, Spread]:
    """(RSS MB, threads, descriptors, CPU % per window) of an idle tack."""
    time.sleep(2.0)  # let start-up allocations settle
    rss, _ = tack.rss_mb()
    pid = tack.proc.proc.pid
    threads = int(_status(pid)["Threads"])
    descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    cpu = []
    for _ in range(RUNS):
        before = _cpu_seconds(pid)
        time.sleep(WINDOW)
        cpu.append((_cpu_seconds(pid) - before) / WINDOW * 100)
    return rss, threads, descriptors, Spread(cpu)


def following(knot_names: list[str]) -> BenchTack:
    jetstream = JetstreamStandin()
    clock = Clock()
    for index, name in enumerate(knot_names):
        jetstream.add(commit(clock, OWNER, REPO, f"r{index}", "create", repo(f"r{index}", name)))
    return BenchTack(jetstream.url)


def main() -> None:
    base = following([])
    base_rss, base_threads, base_fds, base_cpu = idle_figures(base)
    base.stop()
    knots = IdleKnots(KNOTS)
    tack = following(knots.names())
    deadline = time.monotonic() + 180
    while knots.streams < KNOTS:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {knots.streams} of {KNOTS} knots subscribed within 180 s")
        time.sleep(0.2)
    rss, threads, descriptors, cpu = idle_figures(tack)
    idle_worst, back, worst = drop_figures(tack, knots)
    tack.stop()
    print(
        f"floor (no knots): RSS {base_rss:.1f} MB, {base_threads} threads,"
        f" {base_fds} descriptors, CPU % {base_cpu.median:.2f}"
    )
    print(
        f"{KNOTS} idle knots: RSS {rss:.1f} MB ({rss / base_rss:.1f}x the floor),"
        f" {threads} threads, {descriptors} descriptors,"
        f" CPU % {cpu.median:.2f} (median of {RUNS}, spread {cpu.low:.2f}-{cpu.high:.2f});"
        f" per knot {(rss - base_rss) / KNOTS * 1024:.0f} KB,"
        f" {(threads - base_threads) / KNOTS:.2f} threads,"
        f" {(descriptors - base_fds) / KNOTS:.2f} descriptors"
        " (target: under 250 MB and 3% CPU)"
    )
    print(
        f"all {KNOTS} streams dropped at once: followed again after {back:.1f} s;"
        f" slowest GET / meanwhile {worst:.0f} ms, {worst.ratio_to(idle_worst):.0f}x"
        f" the slowest while idle ({idle_worst.median:.1f} ms)"
    )
    report(
        {
            "knots": KNOTS,
            "rss_mb": round(rss, 1),
            "floor_rss_mb": round(base_rss, 1),
            "threads": threads,
            "descriptors": descriptors,
            "idle_cpu_percent": cpu.as_json(),
            "floor_idle_cpu_percent": base_cpu.as_json(),
            "drop_all_back_s": back.as_json(),
            "drop_all_worst_get_ms": worst.as_json(),
            "idle_worst_get_ms": idle_worst.as_json(),
        }
    )


def drop_figures(tack: BenchTack, knots: IdleKnots) -> tuple[Spread, Spread, Spread]:
    """(slowest GET / while idle, seconds until all are back, slowest GET /
    meanwhile) over ``RUNS`` drops of every stream at once."""
    idle_worst, back, worst = [], [], []
    for _ in range(RUNS):
        idle_worst.append(max(time_banner(tack.port, rounds=100)))
        followed = knots.streams
        dropped = time.monotonic()
        knots.drop_all()
        slowest = 0.0
        while knots.streams < followed + KNOTS:
            if time.monotonic() - dropped > 180:
                raise SystemExit(f"only {knots.streams - followed} of {KNOTS} back in 180 s")
            slowest = max(slowest, *time_banner(tack.port, rounds=1, timeout=120))
            time.sleep(0.01)
        back.append(time.monotonic() - dropped)
        worst.append(slowest)
    return Spread(idle_worst), Spread(back), Spread(worst)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
