"""Ref update intake: a knot's ``sh.tangled.git.refUpdate`` -> ``pending`` on /events.

A real tack process follows a current knot stand-in that serves a real git
repository. After one push has warmed tack's mirror, each of ``BENCH_PUSHES``
new commits is announced and timed until its workflow's ``pending`` frame
arrives. Most of that is git: the floor is the same fetch and reads
(``fetch --depth=1 --filter=blob:none``, ``ls-tree``, ``cat-file``) run
directly against the same knot in a warm mirror, measured in the same run.

Then the workflow fetch of a repository with ``BENCH_FILES`` files: tack's
fetcher, cold (new mirror) and warm (next commit), against a plain shallow
clone of the same commit as the floor.

Each is measured ``BENCH_RUNS`` times (``BENCH_PUSHES`` pushes a run): the
median and spread. Target on 2 cores: p99 <= 300 ms with a warm mirror.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import RUNS, BenchTack, Latency, PendingWatch, Spread, report

from tack.intake.fetch import mirror_config
from tests.standins import (
    OWNER,
    REPO,
    Clock,
    GitRepo,
    JetstreamStandin,
    KnotStandin,
    commit,
    repo,
)

PUSHES = int(os.environ.get("BENCH_PUSHES", "200"))
FILES = int(os.environ.get("BENCH_FILES", "10000"))
REPO_DID = "did:plc:benchrepo"
WORKFLOW = "engine: dummy\nsteps: []\n"


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="tack-bench-"))
    try:
        latency = intake_latency(root)
        fetch = fetch_cost(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(latency | fetch)


def intake_latency(root: Path) -> dict:
    jetstream = JetstreamStandin()
    knot = KnotStandin(git_root=root / "git", current=True)
    git = GitRepo(knot.git_root, REPO_DID, {".tangled/workflows/ci.yml": WORKFLOW})
    shas = [git.commit({"n": str(i)}) for i in range(PUSHES * RUNS + 1)]
    record = repo("bench", knot.name, repo_did=REPO_DID)
    jetstream.add(commit(Clock(), OWNER, REPO, "r1", "create", record))
    tack = BenchTack(jetstream.url)
    while knot.open_connections < 1:
        time.sleep(0.01)
    watch = PendingWatch(tack.port)
    try:
        runs: list[list[float]] = [[] for _ in range(RUNS)]
        for index, sha in enumerate(shas):
            sent = time.perf_counter()
            knot.send_ref_update(REPO_DID, sha, changed_files=["n"])
            arrived = watch.wait_for_sha(sha)
            if index:  # the first push warms the mirror
                runs[(index - 1) // PUSHES].append((arrived - sent) * 1000)
    finally:
        tack.stop()
    latency = Latency(runs)
    floor = Latency([git_floor(knot, shas) for _ in range(RUNS)])
    print(
        f"{PUSHES} pushes a run, warm mirror: refUpdate -> pending {latency}"
        f" (target p99 <= 300 ms); git floor {floor}, p50 ratio {latency.ratio_to(floor):.2f}"
    )
    knot.close()
    jetstream.close()
    return {"pushes": PUSHES, "runs": RUNS, **latency.as_json(), "git_floor": floor.as_json()}


def git_floor(knot: KnotStandin, shas: list[str]) -> list[float]:
    """The git work of one warm intake, done directly: the floor tack stands on."""
    mirror = Path(tempfile.mkdtemp(prefix="tack-floor-"))
    url = f"http://{knot.name}/{REPO_DID}"
    git = ["git", "-c", "gc.auto=0", "-c", "maintenance.auto=false", "-C", str(mirror)]
    subprocess.run(["git", "init", "-q", "--bare", str(mirror)], check=True)
    for key, value in mirror_config(url):
        subprocess.run([*git, "config", key, value], check=True)
    times = []
    for index, sha in enumerate(shas[:50]):
        started = time.perf_counter()
        fetch = [*git, "-c", "fetch.negotiationAlgorithm=noop", "fetch", "-q", "--depth=1"]
        fetch += ["--filter=blob:none", "--no-tags", "origin", sha]
        done = subprocess.run(fetch, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"floor fetch {index} failed: {done.stderr.strip()}")
        listing = subprocess.run(
            [*git, "ls-tree", "-z", sha, ".tangled/workflows/"],
            check=True,
            capture_output=True,
        ).stdout
        oid = listing.split(b"\t")[0].split()[2].decode()
        subprocess.run([*git, "cat-file", "-s", oid], check=True, capture_output=True)
        subprocess.run([*git, "cat-file", "blob", oid], check=True, capture_output=True)
        if index:
            times.append((time.perf_counter() - started) * 1000)
    shutil.rmtree(mirror, ignore_errors=True)
    return times


def fetch_cost(root: Path) -> dict:
    knot = KnotStandin(git_root=root / "big", current=True)
    files = {f"src/dir{i % 100}/file{i}.txt": f"{i}\n" for i in range(FILES)}
    files[".tangled/workflows/ci.yml"] = WORKFLOW
    git = GitRepo(knot.git_root, REPO_DID, files)
    second = git.commit({"src/dir0/file0.txt": "changed\n"})
    runs = [fetch_once(root / f"run{run}", knot, git.first, second) for run in range(RUNS)]
    knot.close()
    cold, warm, clone = (Spread([run[key] for run in runs]) for key in ("cold", "warm", "clone"))
    mirror_kb, clone_kb = runs[0]["mirror_kib"], runs[0]["clone_kib"]
    print(
        f"workflow fetch, {FILES} files: cold {cold:.0f} ms ({mirror_kb:.0f} KiB kept),"
        f" warm {warm:.0f} ms; floor: shallow clone {clone:.0f} ms ({clone_kb:.0f} KiB),"
        f" ratio cold/clone {cold.ratio_to(clone):.2f}"
    )
    return {
        "files": FILES,
        "fetch_cold_ms": cold.as_json(),
        "fetch_warm_ms": warm.as_json(),
        "mirror_kib": round(mirror_kb),
        "shallow_clone_ms": clone.as_json(),
        "shallow_clone_kib": round(clone_kb),
    }


def fetch_once(root: Path, knot: KnotStandin, first: str, second: str) -> dict:
    """A fresh mirror's cold fetch, then a warm one, then a plain shallow clone."""
    from tack.intake.fetch import WorkflowFetcher

    fetcher = WorkflowFetcher(root / "mirrors", dev=True)
    started = time.perf_counter()
    fetcher.workflow_files(knot.name, REPO_DID, first)
    cold = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    fetcher.workflow_files(knot.name, REPO_DID, second)
    warm = (time.perf_counter() - started) * 1000
    mirror_kb = sum(p.stat().st_size for p in (root / "mirrors").rglob("*") if p.is_file()) / 1024
    started = time.perf_counter()
    clone = root / "clone"
    subprocess.run(
        ["git", "clone", "-q", "--depth=1", f"http://{knot.name}/{REPO_DID}", str(clone)],
        check=True,
    )
    full = (time.perf_counter() - started) * 1000
    clone_kb = sum(p.stat().st_size for p in (clone / ".git").rglob("*") if p.is_file()) / 1024
    return {
        "cold": cold,
        "warm": warm,
        "clone": full,
        "mirror_kib": mirror_kb,
        "clone_kib": clone_kb,
    }


if __name__ == "__main__":
    main()
