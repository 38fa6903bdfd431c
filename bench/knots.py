"""Memory with many idle knot subscriptions.

200 repos, each on its own knot stand-in, make a real tack process follow 200
knot event streams (one reader thread each). Reports tack's RSS once all are
connected and idle. Target on 2 cores: <= 150 MB at 200 knots.
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
    print(f"{KNOTS} idle knot subscriptions: RSS {rss:.1f} MB (peak {peak:.1f} MB)")
    tack.stop()
    report({"knots": KNOTS, "rss_mb": round(rss, 1), "peak_rss_mb": round(peak, 1)})


if __name__ == "__main__":
    main()
