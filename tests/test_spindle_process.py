"""tack end to end as a real ``python -m tack`` process."""

from __future__ import annotations

import pytest

from .spindle_clients import EventsClient, read_log
from .standins import (
    OWNER,
    REPO,
    Clock,
    KnotStandin,
    TackProcess,
    commit,
    push_pipeline,
    repo,
    tack_env,
    wait_until,
)

STEPS = """
steps:
  - name: Compile
    command: cc -o hello hello.c
  - name: Run
    command: ./hello
"""
SLOW = STEPS + "dummy:\n  delay: 2\n"


@pytest.fixture
def knot():
    standin = KnotStandin()
    yield standin
    standin.close()


def start_tack(tmp_path, jetstream) -> tuple[TackProcess, int]:
    run = len(list(tmp_path.glob("tack-*.log")))
    proc = TackProcess(tack_env(tmp_path, jetstream.url), tmp_path / f"tack-{run}.log")
    port = proc.wait_for_log("listening")["port"]
    return proc, port


def test_records_to_statuses_and_logs_end_to_end(tmp_path, jetstream, knot):
    jetstream.add(commit(Clock(), OWNER, REPO, "r1", "create", repo("hello", knot.name)))
    proc, port = start_tack(tmp_path, jetstream)
    try:
        wait_until(lambda: knot.open_connections == 1, timeout=20, what="knot subscription")
        client = EventsClient(port).start()
        rkey = knot.send_pipeline(
            push_pipeline(knot.name, OWNER, "hello", [("ci.yml", "dummy", STEPS)])
        )
        wait_until(lambda: client.statuses() == ["pending", "running", "success"], timeout=20)
        log = read_log(port, f"/logs/{knot.name}/{rkey}/ci.yml")
        assert log.close_code == 1000
        assert [line["content"] for line in log.lines if line["kind"] == "control"] == [
            "Compile",
            "Compile",
            "Run",
            "Run",
        ]
    finally:
        assert proc.terminate() == 0


def start_slow_workflow(tmp_path, jetstream, knot) -> tuple[TackProcess, EventsClient, str]:
    """A tack process running the slow dummy workflow; (process, /events client, rkey)."""
    jetstream.add(commit(Clock(), OWNER, REPO, "r1", "create", repo("hello", knot.name)))
    proc, port = start_tack(tmp_path, jetstream)
    wait_until(lambda: knot.open_connections == 1, timeout=20)
    client = EventsClient(port).start()
    rkey = knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "hello", [("slow.yml", "dummy", SLOW)])
    )
    wait_until(lambda: client.statuses() == ["pending", "running"], timeout=20)
    return proc, client, rkey


def test_restart_mid_run_fails_the_workflow_once_and_loses_nothing(tmp_path, jetstream, knot):
    proc, _, rkey = start_slow_workflow(tmp_path, jetstream, knot)
    proc.kill()  # kill -9 while the workflow runs

    proc, port = start_tack(tmp_path, jetstream)
    try:
        # The knot replays the pipeline on reconnect; it must not run again.
        wait_until(lambda: len(knot.cursors) == 2, timeout=20, what="knot reconnect")
        after = EventsClient(port).start()  # backfill from the beginning
        wait_until(lambda: after.statuses() == ["pending", "running", "failed"], timeout=20)
        failed = after.frames[-1]["event"]
        assert failed["error"] == "tack restarted while this workflow ran"
        log = read_log(port, f"/logs/{knot.name}/{rkey}/slow.yml")
        assert log.close_code == 1000
        contents = [line["content"] for line in log.lines]
        assert contents[:2] == ["Compile", "dummy: would run: cc -o hello hello.c"]
        assert "tack restarted while this workflow ran" in contents
        knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("next.yml", "dummy", STEPS)]))
        wait_until(
            lambda: after.statuses("next.yml") == ["pending", "running", "success"], timeout=20
        )
        assert after.statuses("slow.yml") == ["pending", "running", "failed"]
    finally:
        assert proc.terminate() == 0


def test_sigterm_mid_run_leaves_no_half_state(tmp_path, jetstream, knot):
    proc, client, _ = start_slow_workflow(tmp_path, jetstream, knot)
    assert proc.terminate() == 0
    wait_until(client.closed.is_set, timeout=5, what="/events closed on shutdown")

    proc, port = start_tack(tmp_path, jetstream)
    try:
        after = EventsClient(port).start()
        wait_until(lambda: after.statuses() == ["pending", "running", "failed"], timeout=20)
    finally:
        assert proc.terminate() == 0
