"""Starting without losing state: a fresh tack, or one whose jetstream cursor
is older than jetstream keeps, reads the records it needs from the owners'
PDSes (PLC and PDS stand-ins shaped from the atproto reference) before it
follows jetstream."""

from __future__ import annotations

import time

from tack import store

from .identities import DocumentHost, Identity
from .spindle_clients import EventsClient
from .standins import (
    MEMBER,
    OWNER,
    REPO,
    JetstreamStandin,
    KnotStandin,
    TackProcess,
    member,
    plc_did,
    push_pipeline,
    repo,
    tack_env,
    wait_until,
)

ALICE = plc_did("alice")


def pds_with_a_member_and_her_repo(knot: KnotStandin) -> DocumentHost:
    """The owner's PDS lists a member record for Alice; Alice's lists her
    repo, on ``knot``, naming this spindle; 150 more owner repos on another
    spindle make the listing take two pages."""
    host = DocumentHost()
    host.register(Identity(OWNER))
    host.register(Identity(ALICE))
    host.records[(OWNER, MEMBER)] = [("m1", member(ALICE))]
    host.records[(ALICE, REPO)] = [("r1", repo("alices-app", knot.name))]
    host.records[(OWNER, REPO)] = [
        (f"other{i}", repo(f"other{i}", "knot.test", spindle="elsewhere.test")) for i in range(150)
    ]
    return host


def start(tmp_path, jetstream, host) -> tuple[TackProcess, int]:
    env = tack_env(tmp_path, jetstream.url, SPINDLE_SERVER_PLC_URL=host.url)
    proc = TackProcess(env, tmp_path / f"tack-{time.monotonic_ns()}.log")
    return proc, proc.wait_for_log("listening")["port"]


def test_a_fresh_tack_runs_a_members_pipeline_written_before_it_started(tmp_path):
    jetstream = JetstreamStandin(replay_without_cursor=False)  # live only: nothing to replay
    knot = KnotStandin()
    host = pds_with_a_member_and_her_repo(knot)
    proc, port = start(tmp_path, jetstream, host)
    try:
        done = proc.wait_for_log("backfill done")
        assert (done["members"], done["repos"], done["deleted"]) == (1, 1, 0)
        assert proc.wait_for_log("backfill started")["reason"] == "no jetstream cursor"
        assert (OWNER, REPO, 100) in host.list_requests  # the second page was read
        wait_until(lambda: knot.open_connections == 1, what="Alice's knot followed")
        client = EventsClient(port).start()
        knot.send_pipeline(push_pipeline(knot.name, ALICE, "alices-app", [("ci.yml", "dummy", "")]))
        wait_until(lambda: client.statuses() == ["pending", "running", "success"], timeout=20)
    finally:
        assert proc.terminate() == 0
        knot.close()


def test_a_stale_cursor_backfills_and_a_record_deleted_meanwhile_is_gone(tmp_path):
    jetstream = JetstreamStandin(replay_without_cursor=False)
    knot = KnotStandin()
    host = pds_with_a_member_and_her_repo(knot)
    db = store.open_database(str(tmp_path / "spindle.db"))
    with db.atomic():
        store.save_cursor("jetstream", (time.time_ns() // 1000) - 3 * 86_400 * 1_000_000)
        store.Repo.insert(
            did=ALICE, rkey="gone", name="deleted-while-down", knot=knot.name,
            spindle="spindle.test", repo_did=None, created_at="2026-01-01T00:00:00Z",
        ).execute()  # fmt: skip
    db.close()
    proc, _ = start(tmp_path, jetstream, host)
    try:
        started = proc.wait_for_log("backfill started")
        assert "72 h old" in started["reason"]
        assert proc.wait_for_log("backfill done")["deleted"] == 1
        wait_until(
            lambda: store_rows(tmp_path, "SELECT rkey FROM repo WHERE did = ?", ALICE) == [("r1",)],
            what="the deleted repo gone, the listed one kept",
        )
    finally:
        assert proc.terminate() == 0
    # A fresh cursor: the next start follows jetstream without a backfill.
    store_rows(
        tmp_path, "UPDATE cursor SET value = ? WHERE name = 'jetstream'", time.time_ns() // 1000
    )
    proc, _ = start(tmp_path, jetstream, host)
    try:
        proc.wait_for_log("tack started")
        time.sleep(0.5)
        assert not [line for line in proc.log_lines() if line["message"] == "backfill started"]
    finally:
        assert proc.terminate() == 0
        knot.close()


def store_rows(tmp_path, sql: str, *params) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(tmp_path / "spindle.db") as db:
        return db.execute(sql, params).fetchall()
