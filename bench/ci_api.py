"""The ``sh.tangled.ci`` read path at size: queries and the log subscription.

1. ``queryPipelines`` with ``BENCH_STORED`` pipelines (two workflows each) in
   one repo, as the appview asks: the repo page (``kinds=push&limit=30``) and
   a commit list (``commits=`` ten shas); plus ``getPipeline``. Floor: ``GET /``
   on the same kept-alive connection (HTTP and the server's own cost).
   Target on 2 cores: queryPipelines p99 <= 20 ms.
2. ``subscribePipelineLogs`` replaying a finished workflow's log of
   ``BENCH_LINES`` lines, decoded by the client (cbor2). Floor: the same log
   through the older ``/logs`` JSON stream. Target: >= 200,000 lines/s.
3. The delay from a line being written to it reaching a subscriber, for a
   running shell workflow printing timestamps. Target: p99 <= 50 ms.

The store is filled directly through tack's own migrations (building 100,000
pipelines through intake would measure intake), then a real ``python -m
tack`` serves it.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import websocket
from _common import RUNS, BenchTack, Latency, Spread, count_frames, insert_rows, report

from tests.appview_client import AppviewClient, decode_message
from tests.standins import JetstreamStandin

STORED = int(os.environ.get("BENCH_STORED", "100000"))
LINES = int(os.environ.get("BENCH_LINES", "1000000"))
QUERIES = int(os.environ.get("BENCH_QUERIES", "500"))
REPO_DID = "did:plc:benchrepo"
KNOT = "knot.example.com"


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="tack-bench-"))
    try:
        shas = fill_store(root)
        jetstream = JetstreamStandin()
        tack = BenchTack(
            jetstream.url,
            SPINDLE_SERVER_DB_PATH=str(root / "spindle.db"),
            SPINDLE_SERVER_LOG_DIR=str(root / "logs"),
        )
        try:
            result = query_latency(tack.port, shas)
            result |= log_throughput(tack.port)
        finally:
            tack.stop()
            jetstream.close()
        result |= live_delays()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(result)


# --- the store --------------------------------------------------------------------------


def fill_store(root: Path) -> list[str]:
    """STORED pipelines of one repo with two finished workflows each, and one
    workflow whose log has LINES lines; the commit shas, oldest first."""
    from tack import store, tid

    db = store.open_database(str(root / "spindle.db"))
    random.seed(7)
    shas = [f"{random.getrandbits(160):040x}" for _ in range(STORED)]
    start_us = time.time_ns() // 1000 - STORED * 1000
    pipelines, workflows = [], []
    for index, sha in enumerate(shas):
        rkey = tid.encode(start_us + index * 1000, 1)
        kind = "push" if index % 10 else "pull_request"
        record = {
            "triggerMetadata": {
                "kind": kind,
                "repo": {"knot": KNOT, "did": "did:plc:owner", "repo": "r", "repoDid": REPO_DID},
                "push": {"ref": "refs/heads/main", "oldSha": "0" * 40, "newSha": sha},
                "pullRequest": {"sourceSha": sha, "targetBranch": "main", "action": "opened"},
            },
            "workflows": [],
        }
        at = (start_us + index * 1000) * 1000
        pipelines.append(
            (KNOT, rkey, "did:plc:owner", "r", json.dumps(record), at, REPO_DID, kind, sha)
        )
        for name in ("build.yml", "lint.yml"):
            workflows.append((KNOT, rkey, name, "dummy", "success", at, at + 10**9, at, at + 10**9))
    with db.atomic():
        insert_rows(
            db,
            "pipeline",
            "knot, rkey, repo_owner, repo_name, record, accepted_at, repo_did, kind, sha",
            pipelines,
        )
        insert_rows(
            db,
            "workflow",
            "knot, rkey, name, engine, status, created_at, updated_at, started_at, finished_at",
            workflows,
        )
    last = db.execute_sql("SELECT max(id) FROM workflow").fetchone()[0]
    db.close()
    write_log(root / "logs" / f"{last}.jsonl")
    return shas


def write_log(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    control = '{"kind":"control","content":"Build","time":"2026-09-01T10:00:00.000000Z",'
    data = (
        '{"kind":"data","content":"compiling unit %d of the build",'
        '"time":"2026-09-01T10:00:01.000000Z","step_id":0,"stream":"stdout"}\n'
    )
    with open(path, "w") as handle:
        handle.write(control + '"step_id":0,"step_status":"start","step_kind":1}\n')
        handle.writelines(data % i for i in range(LINES - 2))
        handle.write(control + '"step_id":0,"step_status":"end","step_kind":1}\n')


# --- 1. queries -------------------------------------------------------------------------------


def query_latency(port: int, shas: list[str]) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def timed(path: str) -> float:
        started = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        assert response.status == 200, body[:200]
        return elapsed

    page = f"/xrpc/sh.tangled.ci.queryPipelines?repo={REPO_DID}&kinds=push&limit=30"
    newest = AppviewClient(port).pipelines(REPO_DID, limit=1)["pipelines"][0]["id"]
    cases = {
        "banner_floor": lambda i: "/",
        "query_repo_page": lambda i: page,
        "query_commits": lambda i: (
            "/xrpc/sh.tangled.ci.queryPipelines?repo="
            + REPO_DID
            + "".join(f"&commits={sha}" for sha in random.sample(shas, 10))
        ),
        "get_pipeline": lambda i: f"/xrpc/sh.tangled.ci.getPipeline?pipeline={newest}",
    }
    runs: dict[str, list[list[float]]] = {name: [] for name in cases}
    for _ in range(RUNS):  # every case once a run, so a drifting machine moves them together
        for name, path in cases.items():
            for index in range(20):  # warm up
                timed(path(index))
            runs[name].append([timed(path(index)) for index in range(QUERIES)])
    figures = {name: Latency(times) for name, times in runs.items()}
    floor = figures["banner_floor"]
    for name, latency in figures.items():
        print(
            f"{name}: {latency} ({STORED} pipelines stored),"
            f" p99 ratio to the floor {latency.p99.ratio_to(floor.p99):.1f}"
        )
    print("target: queryPipelines p99 <= 20 ms")
    return {"stored": STORED, **{name: latency.as_json() for name, latency in figures.items()}}


# --- 2. the log subscription ------------------------------------------------------------------


def log_throughput(port: int) -> dict:
    client = AppviewClient(port)
    rkey = client.pipelines(REPO_DID, limit=1)["pipelines"][0]["id"]
    runs, floor_runs = [], []
    for _ in range(RUNS):
        started = time.perf_counter()
        count = count_cbor_lines(client, rkey)
        runs.append(count / (time.perf_counter() - started))
        started = time.perf_counter()
        count_json_lines(port, rkey)
        floor_runs.append(LINES / (time.perf_counter() - started))
    rate, floor = Spread(runs), Spread(floor_runs)
    print(
        f"subscribePipelineLogs replay of {LINES} lines: {rate} lines/s; the same log as"
        f" /logs JSON text frames {floor} lines/s, ratio {rate.ratio_to(floor):.2f};"
        f" target >= 200,000 lines/s"
    )
    return {"log_lines_per_s": rate.as_json(), "logs_json_floor_lines_per_s": floor.as_json()}


def count_cbor_lines(client: AppviewClient, rkey: str) -> int:
    stream = client.subscribe_logs(rkey, ["lint.yml"], timeout=120)
    first, last = count_until_close(stream.ws, 0x2)
    decode_message(first)  # what was counted is what the lexicon says
    decode_message(last)
    return LINES


def count_json_lines(port: int, rkey: str) -> int:
    url = f"ws://127.0.0.1:{port}/logs/{KNOT}/{rkey}/lint.yml"
    first, last = count_until_close(websocket.create_connection(url, timeout=120), 0x1)
    json.loads(first)
    json.loads(last)
    return LINES


def count_until_close(ws: websocket.WebSocket, opcode_wanted: int) -> tuple[bytes, bytes]:
    """The stream's frames counted to its close: (first, last) payloads."""
    count, first, last = count_frames(ws.sock, opcode_wanted)
    ws.shutdown()
    assert count == LINES, count
    return first, last


# --- 3. live delay ----------------------------------------------------------------------------


def live_delay() -> list[float]:
    """A shell workflow prints its clock every 20 ms; the subscriber compares."""
    from tests.standins import OWNER, REPO, Clock, GitRepo, KnotStandin, commit, repo

    root = Path(tempfile.mkdtemp(prefix="tack-bench-live-"))
    jetstream = JetstreamStandin()
    knot = KnotStandin(git_root=root / "git", current=True)
    workflow = (
        "engine: shell\nclone:\n  skip: true\nsteps:\n  - name: Tick\n"
        "    command: for i in $(seq 1 300); do date +%s%N; sleep 0.02; done\n"
    )
    git = GitRepo(knot.git_root, REPO_DID, {".tangled/workflows/tick.yml": workflow})
    jetstream.add(
        commit(Clock(), OWNER, REPO, "r1", "create", repo("bench", knot.name, repo_did=REPO_DID))
    )
    tack = BenchTack(jetstream.url)
    try:
        while knot.open_connections < 1:
            time.sleep(0.01)
        knot.send_ref_update(REPO_DID, git.first)
        client = AppviewClient(tack.port)
        deadline = time.monotonic() + 30
        listed: list = []
        while not listed and time.monotonic() < deadline:
            listed = client.pipelines(REPO_DID)["pipelines"]
            time.sleep(0.02)
        stream = client.subscribe_logs(listed[0]["id"])
        delays = []
        while True:
            try:
                message = stream.read_one()
            except EOFError:
                break
            received = time.time_ns()
            content = message.body.get("content", "").strip()
            if message.header["t"] == "#data" and content.isdigit():
                delays.append((received - int(content)) / 1e6)
    finally:
        tack.stop()
        knot.close()
        jetstream.close()
        shutil.rmtree(root, ignore_errors=True)
    return delays[10:]  # those that were live, not replayed at connect


def live_delays() -> dict:
    latency = Latency([live_delay() for _ in range(RUNS)])
    print(f"line written -> subscriber: {latency} (target p99 <= 50 ms)")
    return {"live_delay": latency.as_json()}


if __name__ == "__main__":
    main()
