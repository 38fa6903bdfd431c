"""Knot consumer, intake, scheduler and the wire surfaces, with tack in-process.

Real parts throughout: jetstream and knot stand-ins on loopback, tack's own
threads, HTTP server and SQLite file; the clients are websocket-client.
"""

from __future__ import annotations

import json

import pytest

from tack.net import HostRefused, vet_host

from .spindle_clients import EventsClient, http_get, read_log
from .standins import (
    MEMBER,
    OWNER,
    REPO,
    commit,
    member,
    push_pipeline,
    repo,
    wait_until,
)

BUILD = """
steps:
  - name: Build
    command: make build
  - name: Test
    command: make test
"""
ALICE = "did:plc:alice"


@pytest.fixture
def served(jetstream, knot, make_spindle, clock):
    """A running tack serving OWNER's repo ``myrepo`` on the knot stand-in."""
    spindle = make_spindle(real_knots=True)
    jetstream.add(commit(clock, OWNER, REPO, "r1", "create", repo("myrepo", knot.name)))
    wait_until(lambda: knot.open_connections == 1, what="tack subscribed to the knot")
    return spindle


def events(spindle, cursor: int | None = 1) -> EventsClient:
    return EventsClient(spindle.server.port, cursor).start()


def test_pipeline_runs_and_reports_statuses_and_logs(served, knot):
    client = events(served)
    rkey = knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "myrepo", [("build.yml", "dummy", BUILD)])
    )
    wait_until(lambda: client.statuses() == ["pending", "running", "success"], what="statuses")
    frame = client.frames[0]
    assert frame["nsid"] == "sh.tangled.pipeline.status"
    assert frame["event"]["pipeline"] == f"at://did:web:{knot.name}/sh.tangled.pipeline/{rkey}"
    assert frame["event"]["workflow"] == "build.yml"
    rkeys = [f["rkey"] for f in client.frames]
    assert len(set(rkeys)) == 3 and rkeys == sorted(rkeys)

    log = read_log(served.server.port, f"/logs/{knot.name}/{rkey}/build.yml")
    assert log.close_code == 1000
    kinds = [(line["kind"], line.get("step_status"), line.get("content")) for line in log.lines]
    assert kinds == [
        ("control", "start", "Build"),
        ("data", None, "dummy: would run: make build"),
        ("control", "end", "Build"),
        ("control", "start", "Test"),
        ("data", None, "dummy: would run: make test"),
        ("control", "end", "Test"),
    ]
    assert log.lines[0]["step_command"] == "make build"
    assert log.lines[0]["step_kind"] == 1 and log.lines[1]["stream"] == "stdout"


def test_workflows_of_one_pipeline_each_end(served, knot):
    client = events(served)
    knot.send_pipeline(
        push_pipeline(
            knot.name, OWNER, "myrepo", [("a.yml", "dummy", BUILD), ("b.yml", "dummy", BUILD)]
        )
    )
    wait_until(
        lambda: (
            client.statuses("a.yml")[-1:] == ["success"]
            and client.statuses("b.yml")[-1:] == ["success"]
        )
    )
    assert client.statuses("a.yml") == ["pending", "running", "success"]
    assert client.statuses("b.yml") == ["pending", "running", "success"]


def test_the_same_pipeline_twice_runs_once(served, knot):
    client = events(served)
    record = push_pipeline(knot.name, OWNER, "myrepo", [("build.yml", "dummy", BUILD)])
    rkey = knot.send_pipeline(record)
    knot.send_pipeline(record, rkey=rkey)
    wait_until(lambda: client.statuses() == ["pending", "running", "success"])
    # A knot reconnect replays from the cursor; still nothing runs again.
    knot.drop()
    wait_until(lambda: len(knot.cursors) == 2 and knot.open_connections == 1, what="reconnect")
    marker = knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "myrepo", [("after.yml", "dummy", BUILD)])
    )
    wait_until(lambda: client.statuses("after.yml") == ["pending", "running", "success"])
    assert client.statuses("build.yml") == ["pending", "running", "success"]
    assert all(not f["event"]["pipeline"].endswith(marker) for f in client.frames[:3])


def test_knot_reconnect_resumes_from_processed_cursor(served, knot):
    from tack import tid
    from tack.intake.knots import REWIND_NS

    client = events(served)
    rkey = knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "myrepo", [("build.yml", "dummy", BUILD)])
    )
    wait_until(lambda: client.statuses() == ["pending", "running", "success"])
    knot.drop()
    wait_until(lambda: len(knot.cursors) == 2)
    # An older knot's cursor is the time in the TID of what was processed,
    # resumed with the safety rewind (its TIDs may be slightly out of order).
    assert knot.cursors[1] == tid.micros(rkey) * 1000 - REWIND_NS


def test_repo_owner_who_is_not_a_member_is_rejected(served, knot, jetstream, clock, caplog):
    jetstream.add(commit(clock, ALICE, REPO, "ra", "create", repo("alices", knot.name)))
    # The record must be applied first, or the rejection is "no repo record" instead.
    wait_until(lambda: served.directory.repo_by_name(ALICE, "alices") is not None, what="repo")
    client = events(served)
    rkey = knot.send_pipeline(
        push_pipeline(knot.name, ALICE, "alices", [("build.yml", "dummy", BUILD)])
    )
    wait_until(
        lambda: any(getattr(r, "rkey", None) == rkey for r in caplog.records), what="rejection"
    )
    rejected = next(r for r in caplog.records if getattr(r, "rkey", None) == rkey)
    assert rejected.getMessage() == "knot event rejected"
    assert "not the spindle owner or a member" in rejected.reason

    # Once the owner invites Alice, her pipelines run.
    send_member = commit(clock, OWNER, MEMBER, "m1", "create", member(ALICE))
    jetstream.add(send_member)
    wait_until(lambda: served.directory.is_member(ALICE))
    knot.send_pipeline(push_pipeline(knot.name, ALICE, "alices", [("ok.yml", "dummy", BUILD)]))
    wait_until(lambda: client.statuses("ok.yml") == ["pending", "running", "success"])
    assert client.statuses("build.yml") == []


def test_pipeline_naming_another_knot_is_rejected(served, knot, caplog):
    client = events(served)
    rkey = knot.send_pipeline(
        push_pipeline("other.knot", OWNER, "myrepo", [("build.yml", "dummy", BUILD)])
    )
    wait_until(lambda: any(getattr(r, "rkey", None) == rkey for r in caplog.records))
    rejected = next(r for r in caplog.records if getattr(r, "rkey", None) == rkey)
    assert "came from" in rejected.reason
    good = knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "myrepo", [("ok.yml", "dummy", BUILD)])
    )
    wait_until(lambda: client.statuses("ok.yml") == ["pending", "running", "success"])
    assert all(f["event"]["pipeline"].endswith(good) for f in client.frames)


def test_unknown_engine_fails_with_error_and_log(served, knot):
    client = events(served)
    rkey = knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "myrepo", [("build.yml", "nixery", BUILD)])
    )
    wait_until(lambda: client.statuses() == ["failed"])
    assert client.frames[0]["event"]["error"] == 'unknown engine "nixery"'
    log = read_log(served.server.port, f"/logs/{knot.name}/{rkey}/build.yml")
    assert log.close_code == 1000
    assert [line["kind"] for line in log.lines] == ["control", "data", "control"]
    assert log.lines[1]["content"] == 'unknown engine "nixery"'


def test_invalid_workflow_yaml_fails_that_workflow_only(served, knot):
    client = events(served)
    knot.send_pipeline(
        push_pipeline(
            knot.name,
            OWNER,
            "myrepo",
            [("bad.yml", "dummy", "steps: [unclosed"), ("good.yml", "dummy", BUILD)],
        )
    )
    wait_until(
        lambda: "failed" in client.statuses("bad.yml") and "success" in client.statuses("good.yml")
    )
    failed = next(f for f in client.frames if f["event"]["status"] == "failed")
    assert "invalid YAML" in failed["event"]["error"]


def test_events_backfill_from_a_cursor(served, knot):
    live = events(served)
    for name in ("one.yml", "two.yml"):
        knot.send_pipeline(push_pipeline(knot.name, OWNER, "myrepo", [(name, "dummy", BUILD)]))
        wait_until(lambda name=name: live.statuses(name) == ["pending", "running", "success"])
    created = [_created_ns(f) for f in live.frames]
    assert created == sorted(created) and len(set(created)) == 6
    # Everything strictly after the third event, in order, no gap.
    later = events(served, cursor=created[2])
    wait_until(lambda: len(later.frames) == 3)
    assert [f["rkey"] for f in later.frames] == [f["rkey"] for f in live.frames[3:]]
    # No cursor means from now: nothing old is sent.
    fresh = events(served, cursor=None)
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "myrepo", [("three.yml", "dummy", BUILD)]))
    wait_until(lambda: fresh.statuses() == ["pending", "running", "success"])
    assert fresh.statuses("one.yml") == []


def _created_ns(frame: dict) -> int:
    from datetime import datetime

    stamp = datetime.fromisoformat(frame["event"]["createdAt"].replace("Z", "+00:00"))
    return int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000


@pytest.mark.parametrize("subscribers", [2, 6])
def test_every_subscriber_gets_every_event_once_in_order(served, knot, subscribers):
    """Two subscribers are sent to by the committing threads themselves,
    six by the broadcaster thread alone: either way, with intake and four
    workers committing at once, each gets the same frames, once, in order."""
    clients = [events(served) for _ in range(subscribers)]
    for p in range(5):
        workflows = [(f"p{p}w{w}.yml", "dummy", "steps: []") for w in range(20)]
        knot.send_pipeline(push_pipeline(knot.name, OWNER, "myrepo", workflows))
    for client in clients:
        wait_until(lambda c=client: c.statuses().count("success") == 100, what="all succeed")
    first = [frame["rkey"] for frame in clients[0].frames]
    assert len(first) == len(set(first)) == 300
    created = [_created_ns(frame) for frame in clients[0].frames]
    assert created == sorted(created)
    for client in clients[1:]:
        assert [frame["rkey"] for frame in client.frames] == first


def test_stalled_subscriber_is_dropped_without_holding_up_another(served, knot, caplog):
    stalled = EventsClient(served.server.port, cursor=1, rcvbuf=4096)  # connects, never reads
    healthy = events(served)
    # ~2,400 status frames: far more than the socket buffers between tack and
    # the stalled client hold, so tack's send to it must block.
    pipelines = [[(f"p{p}w{w}.yml", "dummy", "steps: []") for w in range(60)] for p in range(13)]
    for workflows in pipelines:
        knot.send_pipeline(push_pipeline(knot.name, OWNER, "myrepo", workflows))
    total = 13 * 60
    wait_until(lambda: healthy.statuses().count("success") == total, timeout=60, what="all succeed")
    assert len(healthy.frames) == 3 * total
    created = [_created_ns(f) for f in healthy.frames]
    assert created == sorted(created)
    wait_until(
        lambda: any(
            r.getMessage() == "events subscriber dropped" and "not reading" in r.reason
            for r in caplog.records
        ),
        timeout=30,
        what="the stalled subscriber dropped",
    )
    stalled.close()


def test_garbage_from_the_knot_is_skipped_and_the_stream_stays_up(served, knot, caplog):
    client = events(served)
    knot.send_raw("this is not json")
    knot.send_raw(json.dumps([1, 2]))
    knot.send_raw(json.dumps({"rkey": "../../etc", "nsid": "sh.tangled.pipeline", "event": {}}))
    knot.send("3lzzzzzzzzzz2", "sh.tangled.pipeline", {"triggerMetadata": "nope"})
    knot.send("3lzzzzzzzzzz3", "sh.tangled.git.refUpdate", {"ref": "refs/heads/main"})
    knot.send_raw("x" * (3 * 1024 * 1024))  # larger than tack accepts for one message
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "myrepo", [("ok.yml", "dummy", BUILD)]))
    wait_until(lambda: client.statuses("ok.yml") == ["pending", "running", "success"], timeout=20)
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("knot frame skipped: not a {rkey, nsid, event} object") == 3
    assert messages.count("knot event rejected") == 2  # the pipeline and the ref update
    assert messages.count("oversized message dropped") == 1
    assert knot.cursors == [knot.cursors[0]], "the connection stayed up throughout"


def test_removing_the_last_repo_on_a_knot_closes_its_stream(served, knot, jetstream, clock):
    jetstream.add(commit(clock, OWNER, REPO, "r1", "delete"))
    wait_until(lambda: knot.open_connections == 0, what="knot stream closed")
    assert served.knots.knots == set()
    jetstream.add(commit(clock, OWNER, REPO, "r1", "create", repo("myrepo", knot.name)))
    wait_until(lambda: knot.open_connections == 1, what="knot stream reopened")


def test_banner_owner_and_bad_paths(served, knot):
    port = served.server.port
    status, body = http_get(port, "/")
    assert status == 200 and "spindle" in body
    status, body = http_get(port, "/xrpc/sh.tangled.owner")
    assert status == 200 and json.loads(body) == {"owner": OWNER}
    status, _ = http_get(port, "/logs/knot/../etc/passwd")
    assert status == 400
    status, _ = http_get(port, "/logs/only-two/parts")
    assert status == 400
    status, _ = http_get(port, "/events?cursor=yesterday")
    assert status == 400
    status, _ = http_get(port, "/nope")
    assert status == 404
    unknown = read_log(port, f"/logs/{knot.name}/3lzzzzzzzzzz2/missing.yml")
    assert unknown.close_code == 1000 and unknown.close_reason == "unknown workflow"


@pytest.mark.parametrize(
    ("knot_name", "dev", "refused"),
    [
        ("knot.example.com", False, False),
        ("knot.example.com:5555", False, False),
        ("127.0.0.1:5555", False, True),
        ("10.0.0.7", False, True),
        ("[::1]:80", False, True),
        ("localhost:5555", False, True),
        ("printer.local", False, True),
        ("knot.example.com/../x", False, True),
        ("user@knot.example.com", False, True),
        ("127.0.0.1:5555", True, False),
    ],
)
def test_knot_names_are_vetted(knot_name, dev, refused):
    if refused:
        with pytest.raises(HostRefused):
            vet_host(knot_name, dev)
    else:
        vet_host(knot_name, dev)


def test_outside_dev_mode_a_name_resolving_to_a_private_address_is_refused():
    from tack.net import open_vetted_socket

    # "localhost" passes the name check only in dev mode; resolved, it is loopback.
    with pytest.raises(HostRefused, match="non-public"):
        open_vetted_socket("wss://localhost:443/events", dev=False)


def test_logs_follow_a_running_workflow_to_its_end(served, knot):
    client = events(served)
    slow = "steps:\n  - {name: one, command: a}\n  - {name: two, command: b}\ndummy: {delay: 1}\n"
    rkey = knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "myrepo", [("slow.yml", "dummy", slow)])
    )
    wait_until(lambda: client.statuses() == ["pending", "running"])
    log = read_log(served.server.port, f"/logs/{knot.name}/{rkey}/slow.yml")
    assert log.close_code == 1000  # the stream ended with the workflow
    wait_until(lambda: client.statuses() == ["pending", "running", "success"])
    assert [ln["content"] for ln in log.lines if ln["kind"] == "control"] == [
        "one",
        "one",
        "two",
        "two",
    ]


def test_a_log_follower_answers_a_client_leaving_at_once(served, knot):
    """A follower sleeps on its workflows' wake-up and its socket together, so
    a client leaving a quiet workflow's log has its close answered at once,
    well before the follower's idle wake-up would have noticed."""
    import websocket

    from tack.api.follow import IDLE_WAKE_EVERY

    client = events(served)
    quiet = "steps:\n  - {name: wait, command: a}\ndummy: {delay: 30}\n"
    rkey = knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "myrepo", [("quiet.yml", "dummy", quiet)])
    )
    wait_until(lambda: client.statuses() == ["pending", "running"])
    url = f"ws://127.0.0.1:{served.server.port}/logs/{knot.name}/{rkey}/quiet.yml"
    ws = websocket.create_connection(url, timeout=IDLE_WAKE_EVERY / 2)
    # The step's start and its one line: after them the workflow is quiet.
    assert [json.loads(ws.recv())["kind"] for _ in range(2)] == ["control", "data"]
    ws.send_close(websocket.STATUS_NORMAL)
    opcode = None
    while opcode != websocket.ABNF.OPCODE_CLOSE:  # a timeout here is the failure
        opcode, data = ws.recv_data(control_frame=True)
    assert int.from_bytes(data[:2], "big") == websocket.STATUS_NORMAL
    ws.shutdown()
