"""Jetstream ingest against a real stand-in server and a real SQLite file."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tack import store
from tack.jetstream import BATCH_MAX, REWIND_US
from tack.records import Change
from tack.stream import READ_CHUNK

from .standins import (
    COLLABORATOR,
    HOSTNAME,
    MEMBER,
    OWNER,
    REPO,
    Clock,
    JetstreamStandin,
    account_deleted,
    collaborator,
    commit,
    db_cursor,
    db_rows,
    member,
    plc_did,
    repo,
    wait_until,
)

ALICE = "did:plc:alice"
BOB = "did:plc:bob"


def caught_up(spindle, events: list[dict]):
    """Wait until the applier has committed the last event's cursor."""
    last = max(e["time_us"] for e in events)
    wait_until(lambda: spindle.ingester.applier.cursor == last, what=f"cursor {last}")


def send_and_wait(jetstream: JetstreamStandin, spindle, *events: dict) -> None:
    jetstream.add(*events)
    caught_up(spindle, list(events))


# --- every collection x operation -------------------------------------------------


def test_member_create_update_delete(jetstream, make_spindle, clock):
    spindle = make_spindle()
    directory = spindle.directory
    send_and_wait(jetstream, spindle, commit(clock, OWNER, MEMBER, "m1", "create", member(ALICE)))
    assert directory.is_member(ALICE)

    # An update that points the invitation at another spindle withdraws it here.
    send_and_wait(
        jetstream,
        spindle,
        commit(clock, OWNER, MEMBER, "m1", "update", member(ALICE, "other.example")),
    )
    assert not directory.is_member(ALICE)

    send_and_wait(jetstream, spindle, commit(clock, OWNER, MEMBER, "m1", "update", member(BOB)))
    assert directory.is_member(BOB) and not directory.is_member(ALICE)

    send_and_wait(jetstream, spindle, commit(clock, OWNER, MEMBER, "m1", "delete"))
    assert not directory.is_member(BOB)
    assert db_rows(spindle.config.db_path)["member"] == []


def test_member_invited_by_someone_else_does_not_count(jetstream, make_spindle, clock):
    spindle = make_spindle()
    send_and_wait(jetstream, spindle, commit(clock, ALICE, MEMBER, "m1", "create", member(BOB)))
    assert not spindle.directory.is_member(BOB)
    assert spindle.directory.is_member(OWNER)


def test_repo_create_update_delete_and_knot_reconcile(jetstream, make_spindle, clock):
    spindle = make_spindle()
    knots = spindle.knots
    send_and_wait(
        jetstream, spindle, commit(clock, OWNER, REPO, "r1", "create", repo("tack", "knot-a.test"))
    )
    row = spindle.directory.repo_by_name(OWNER, "tack")
    assert (row.knot, row.spindle) == ("knot-a.test", HOSTNAME)
    assert knots.knots == {"knot-a.test"}

    send_and_wait(
        jetstream,
        spindle,
        commit(
            clock,
            OWNER,
            REPO,
            "r1",
            "update",
            repo("tack", "knot-b.test", repo_did="did:plc:repo1"),
        ),
    )
    assert spindle.directory.repo_by_did("did:plc:repo1").knot == "knot-b.test"
    assert knots.knots == {"knot-b.test"}

    # Moving the repo to another spindle removes it from ours.
    send_and_wait(
        jetstream,
        spindle,
        commit(clock, OWNER, REPO, "r1", "update", repo("tack", "knot-b.test", spindle="ci.other")),
    )
    assert spindle.directory.repo_by_name(OWNER, "tack") is None
    assert knots.knots == set()

    send_and_wait(
        jetstream, spindle, commit(clock, OWNER, REPO, "r1", "update", repo("tack", "knot-c.test"))
    )
    assert knots.knots == {"knot-c.test"}
    send_and_wait(jetstream, spindle, commit(clock, OWNER, REPO, "r1", "delete"))
    assert spindle.directory.repo_by_name(OWNER, "tack") is None
    assert knots.knots == set()


def test_repo_of_non_member_wants_no_knot_until_invited(jetstream, make_spindle, clock):
    spindle = make_spindle()
    send_and_wait(
        jetstream, spindle, commit(clock, ALICE, REPO, "r1", "create", repo("x", "knot-a.test"))
    )
    assert spindle.directory.repo_by_name(ALICE, "x") is not None
    assert spindle.knots.knots == set()

    send_and_wait(jetstream, spindle, commit(clock, OWNER, MEMBER, "m1", "create", member(ALICE)))
    assert spindle.knots.knots == {"knot-a.test"}
    send_and_wait(jetstream, spindle, commit(clock, OWNER, MEMBER, "m1", "delete"))
    assert spindle.knots.knots == set()


def test_collaborator_create_update_delete(jetstream, make_spindle, clock):
    spindle = make_spindle()
    send_and_wait(
        jetstream, spindle, commit(clock, OWNER, REPO, "r1", "create", repo("tack", "knot-a.test"))
    )
    the_repo = spindle.directory.repo_by_name(OWNER, "tack")
    uri = f"at://{OWNER}/sh.tangled.repo/r1"
    send_and_wait(
        jetstream,
        spindle,
        commit(clock, OWNER, COLLABORATOR, "c1", "create", collaborator(ALICE, uri)),
    )
    assert spindle.directory.is_collaborator(the_repo, ALICE)

    send_and_wait(
        jetstream,
        spindle,
        commit(clock, OWNER, COLLABORATOR, "c1", "update", collaborator(BOB, uri)),
    )
    assert spindle.directory.is_collaborator(the_repo, BOB)
    assert not spindle.directory.is_collaborator(the_repo, ALICE)

    send_and_wait(jetstream, spindle, commit(clock, OWNER, COLLABORATOR, "c1", "delete"))
    assert not spindle.directory.is_collaborator(the_repo, BOB)


def test_collaborator_granted_by_non_owner_does_not_count(jetstream, make_spindle, clock):
    spindle = make_spindle()
    send_and_wait(
        jetstream,
        spindle,
        commit(clock, OWNER, REPO, "r1", "create", repo("tack", "knot-a.test")),
        commit(
            clock,
            BOB,
            COLLABORATOR,
            "c1",
            "create",
            collaborator(ALICE, f"at://{OWNER}/sh.tangled.repo/r1"),
        ),
    )
    the_repo = spindle.directory.repo_by_name(OWNER, "tack")
    assert not spindle.directory.is_collaborator(the_repo, ALICE)


def test_account_deletion_removes_that_dids_rows(jetstream, make_spindle, clock):
    spindle = make_spindle()
    send_and_wait(
        jetstream,
        spindle,
        commit(clock, OWNER, MEMBER, "m1", "create", member(ALICE)),
        commit(clock, ALICE, REPO, "r1", "create", repo("a", "knot-a.test")),
        commit(
            clock,
            ALICE,
            COLLABORATOR,
            "c1",
            "create",
            collaborator(BOB, f"at://{ALICE}/sh.tangled.repo/r1"),
        ),
        commit(clock, BOB, REPO, "r2", "create", repo("b", "knot-b.test")),
    )
    assert spindle.knots.knots == {"knot-a.test"}
    send_and_wait(jetstream, spindle, account_deleted(clock, ALICE))
    rows = db_rows(spindle.config.db_path)
    assert [r[0] for r in rows["repo"]] == [BOB]
    assert rows["collaborator"] == []
    assert spindle.knots.knots == set()


def test_collaborator_records_by_strangers_are_not_kept(jetstream, make_spindle, clock):
    """Only a repo's owner grants, and only the owner's and members' repos are
    served: anyone else's collaborator records are not stored at all."""
    spindle = make_spindle()
    stranger = "did:plc:stranger"
    send_and_wait(
        jetstream,
        spindle,
        *[
            commit(
                clock,
                stranger,
                COLLABORATOR,
                f"c{i}",
                "create",
                collaborator(ALICE, f"at://{stranger}/sh.tangled.repo/r{i}"),
            )
            for i in range(20)
        ],
        commit(clock, OWNER, MEMBER, "m1", "create", member(ALICE)),
        commit(
            clock,
            ALICE,
            COLLABORATOR,
            "c1",
            "create",
            collaborator(BOB, f"at://{ALICE}/sh.tangled.repo/r1"),
        ),
    )
    rows = db_rows(spindle.config.db_path)["collaborator"]
    assert [(r[0], r[1]) for r in rows] == [(ALICE, "c1")]


def test_identity_events_and_other_collections_are_ignored(jetstream, make_spindle, clock):
    spindle = make_spindle()
    identity = {
        "did": ALICE,
        "time_us": clock(),
        "kind": "identity",
        "identity": {"did": ALICE, "handle": "alice.test", "seq": 1},
    }
    other = commit(clock, ALICE, "app.bsky.feed.post", "p1", "create", {"text": "hi"})
    jetstream.add(identity)
    jetstream.add_raw(json.dumps(other), other["time_us"])  # sent despite the filter
    caught_up(spindle, [identity, other])
    assert db_rows(spindle.config.db_path) == {"member": [], "repo": [], "collaborator": []}
    assert spindle.ingester.decoder.bad == 0


def test_subscription_asks_for_exactly_our_collections(jetstream, make_spindle, clock):
    spindle = make_spindle()
    send_and_wait(jetstream, spindle, commit(clock, OWNER, MEMBER, "m1", "create", member(ALICE)))
    assert jetstream.subscriptions[0].wanted == [
        MEMBER,
        REPO,
        COLLABORATOR,
        "sh.tangled.repo.pull",
        "sh.tangled.repo.pull.status",
    ]
    assert jetstream.subscriptions[0].cursor is None  # first start: no cursor yet


# --- replay, rewind, bad records ----------------------------------------------------


def _mixed_stream(clock: Clock, count: int) -> list[dict]:
    """A deterministic stream whose end state depends on order."""
    events = []
    for i in range(count):
        rkey = f"r{i % 50}"
        step = i % 7
        if step == 3:
            events.append(commit(clock, OWNER, REPO, rkey, "delete"))
        elif step == 5:
            events.append(
                commit(
                    clock, OWNER, MEMBER, f"m{i % 20}", "create", member(f"did:plc:user{i % 30}")
                )
            )
        elif step == 6:
            events.append(
                commit(
                    clock,
                    OWNER,
                    COLLABORATOR,
                    f"c{i % 10}",
                    "create",
                    collaborator(f"did:plc:user{i}", f"at://{OWNER}/sh.tangled.repo/{rkey}"),
                )
            )
        else:
            events.append(
                commit(
                    clock, OWNER, REPO, rkey, "create", repo(f"repo{i % 50}", f"knot{i % 4}.test")
                )
            )
    return events


def test_replaying_the_stream_is_idempotent(jetstream, make_spindle, clock):
    spindle = make_spindle()
    events = _mixed_stream(clock, 300)
    send_and_wait(jetstream, spindle, *events)
    once = db_rows(spindle.config.db_path)
    spindle.ingester.applier.cursor = None  # force the next connection to replay everything
    jetstream.drop()
    wait_until(lambda: len(jetstream.subscriptions) == 2, what="reconnect")
    wait_until(lambda: spindle.ingester.applier.applied >= 600, what="replay applied")
    assert db_rows(spindle.config.db_path) == once


def _sockets_to(port: int) -> list[str]:
    """The TCP states (/proc/net/tcp, hex codes) of this host's connections to ``port``."""
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].rsplit(":", 1)[1], 16) == port:
            states.append(fields[3])
    return states


def test_reconnects_close_the_old_socket(jetstream, make_spindle, clock):
    spindle = make_spindle()
    send_and_wait(jetstream, spindle, *_mixed_stream(clock, 10))
    for connections in range(2, 5):
        jetstream.drop()
        wait_until(lambda n=connections: len(jetstream.subscriptions) == n, what="reconnect")

    def held() -> list[str]:
        # TIME_WAIT (06) holds no descriptor; CLOSE_WAIT (08) is a socket tack never closed.
        return [state for state in _sockets_to(jetstream.port) if state != "06"]

    wait_until(lambda: held() == ["01"], timeout=5, what="one live socket and no other")


def test_reconnect_resumes_five_seconds_before_the_saved_cursor(jetstream, make_spindle, clock):
    spindle = make_spindle()
    events = _mixed_stream(clock, 50)
    send_and_wait(jetstream, spindle, *events)
    saved = db_cursor(spindle.config.db_path)
    assert saved == events[-1]["time_us"]
    jetstream.drop()
    wait_until(lambda: len(jetstream.subscriptions) == 2, what="reconnect")
    assert jetstream.subscriptions[1].cursor == saved - REWIND_US
    # and the stream keeps flowing after the reconnect
    later = commit(clock, OWNER, MEMBER, "late", "create", member(BOB))
    send_and_wait(jetstream, spindle, later)
    assert spindle.directory.is_member(BOB)


def test_bad_record_between_two_good_ones_is_skipped(jetstream, make_spindle, clock, caplog):
    spindle = make_spindle()
    good1 = commit(clock, OWNER, MEMBER, "m1", "create", member(ALICE))
    bad = commit(
        clock,
        OWNER,
        REPO,
        "r1",
        "create",
        {"name": 42, "knot": "k.test", "createdAt": "2026-01-01T00:00:00Z"},
    )
    good2 = commit(clock, OWNER, MEMBER, "m2", "create", member(BOB))
    jetstream.add(good1, bad, good2)
    caught_up(spindle, [good1, bad, good2])
    assert spindle.directory.is_member(ALICE) and spindle.directory.is_member(BOB)
    assert db_cursor(spindle.config.db_path) == good2["time_us"]
    assert spindle.ingester.decoder.bad == 1
    skipped = [r for r in caplog.records if r.getMessage() == "bad record skipped"]
    assert [(r.did, r.collection, r.rkey) for r in skipped] == [(OWNER, REPO, "r1")]
    assert "name" in skipped[0].reason


def test_bad_record_last_still_moves_the_cursor(jetstream, make_spindle, clock):
    spindle = make_spindle()
    good = commit(clock, OWNER, MEMBER, "m1", "create", member(ALICE))
    bad = commit(
        clock,
        OWNER,
        MEMBER,
        "m2",
        "create",
        {"subject": "not-a-did", "instance": HOSTNAME, "createdAt": "2026-01-01T00:00:00Z"},
    )
    jetstream.add(good, bad)
    caught_up(spindle, [good, bad])
    assert db_cursor(spindle.config.db_path) == bad["time_us"]


@pytest.mark.parametrize(
    "payload",
    [
        "not json at all",
        "[1, 2, 3]",
        '{"kind": "commit"}',
        "x" * 300_000,
        '{"did": "did:plc:a", "time_us": "soon", "kind": "commit"}',
    ],
    ids=["text", "array", "no-time", "oversized", "time-as-string"],
)
def test_garbage_frames_do_not_stop_ingest(jetstream, make_spindle, clock, payload):
    spindle = make_spindle()
    before = commit(clock, OWNER, MEMBER, "m1", "create", member(ALICE))
    jetstream.add(before)
    jetstream.add_raw(payload, clock())
    after = commit(clock, OWNER, MEMBER, "m2", "create", member(BOB))
    jetstream.add(after)
    caught_up(spindle, [after])
    assert spindle.directory.is_member(ALICE) and spindle.directory.is_member(BOB)
    assert spindle.ingester.decoder.bad == 1


# --- transient failures and back-pressure ------------------------------------------


def hold_write_lock(
    db_path: str, seconds: float, release: threading.Event | None = None
) -> threading.Thread:
    """Another connection takes SQLite's write lock and keeps it ``seconds``,
    or until ``release`` is set when one is given."""
    locked = threading.Event()
    release = release or threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db_path, timeout=10, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(seconds)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    locked.wait(5)
    return thread


def test_locked_database_is_retried_in_place_in_order(jetstream, make_spindle, clock, caplog):
    spindle = make_spindle()
    holder = hold_write_lock(spindle.config.db_path, seconds=store.BUSY_TIMEOUT_MS / 1000 + 1.5)
    # Order matters: applied out of order or with one skipped, the end state differs.
    events = [
        commit(clock, OWNER, REPO, "r1", "create", repo("tack", "knot-a.test")),
        commit(clock, OWNER, REPO, "r1", "update", repo("tack", "knot-b.test")),
        commit(clock, OWNER, REPO, "r1", "delete"),
        commit(clock, OWNER, REPO, "r1", "create", repo("tack", "knot-c.test")),
        commit(clock, OWNER, MEMBER, "m1", "create", member(ALICE)),
    ]
    for event in events:
        jetstream.add(event)
        time.sleep(0.05)
    time.sleep(0.5)
    assert db_cursor(spindle.config.db_path) is None, "nothing may land while the lock is held"
    holder.join()
    caught_up(spindle, events)
    assert spindle.directory.repo_by_name(OWNER, "tack").knot == "knot-c.test"
    assert spindle.directory.is_member(ALICE)
    assert spindle.knots.knots == {"knot-c.test"}
    assert any(r.getMessage() == "store busy, retrying the same events" for r in caplog.records)
    assert spindle.ingester.decoder.bad == 0


def test_full_queue_pushes_back_on_the_reader(jetstream, make_spindle, clock):
    spindle = make_spindle(SPINDLE_SERVER_QUEUE_SIZE="5")
    # Let the schema exist and the stream settle, then stall the applier.
    send_and_wait(jetstream, spindle, commit(clock, OWNER, MEMBER, "m0", "create", member(ALICE)))
    release = threading.Event()
    holder = hold_write_lock(spindle.config.db_path, seconds=60, release=release)
    events = [
        commit(clock, OWNER, MEMBER, f"m{i}", "create", member(f"did:plc:u{i}"))
        for i in range(1, 2001)
    ]
    received_before = spindle.ingester.reader.frames
    jetstream.add(*events)
    # A queue of five frames holds one run (of up to five).
    wait_until(lambda: spindle.ingester.frames.full(), what="the queue to fill")
    time.sleep(0.5)
    stalled_at = spindle.ingester.reader.frames - received_before
    time.sleep(1.0)
    # The queue is full and the reader is parked on it: at most the queue,
    # one batch inside the applier and what the reader's last read brought in.
    assert spindle.ingester.frames.full()
    assert 1 <= sum(len(run) for run in spindle.ingester.frames.queue) <= 5
    assert spindle.ingester.reader.frames - received_before == stalled_at
    one_read = READ_CHUNK // min(len(json.dumps(event)) for event in events) + 1
    assert stalled_at <= 5 + min(5, BATCH_MAX) + one_read
    release.set()
    holder.join()
    caught_up(spindle, events)
    assert len(db_rows(spindle.config.db_path)["member"]) == 2001


def test_schema_is_versioned_and_reopening_keeps_data(tmp_path: Path):
    path = str(tmp_path / "s.db")
    db = store.open_database(path)
    row = {
        "did": OWNER,
        "rkey": "r",
        "name": "n",
        "knot": "k",
        "spindle": HOSTNAME,
        "repo_did": None,
        "created_at": "2026-01-01T00:00:00Z",
    }
    with db.atomic():
        store.apply_changes([Change(1, "upsert", OWNER, REPO, "r", row)])
    store.save_cursor("jetstream", 42)
    db.close()
    db = store.open_database(path)
    assert store.migrate(db) == store.MIGRATIONS[-1][0]
    assert store.get_cursor("jetstream") == 42
    assert store.Directory(HOSTNAME, OWNER).wanted_knots() == {"k"}
    versions = [v for (v,) in db.execute_sql("SELECT version FROM schema_version")]
    assert versions == [m[0] for m in store.MIGRATIONS]
    db.close()


def _repo_change(time_us: int, action: str, rkey: str, name: str = "n") -> Change:
    row = {
        "did": OWNER,
        "rkey": rkey,
        "name": name,
        "knot": "k",
        "spindle": HOSTNAME,
        "repo_did": None,
        "created_at": "2026-01-01T00:00:00Z",
    }
    return Change(time_us, action, OWNER, REPO, rkey, row if action == "upsert" else None)


def test_a_batch_written_at_once_ends_as_if_written_in_order(tmp_path: Path):
    """apply_changes collapses a batch per record and writes each collection
    with a few multi-row statements; the rows must end as sequential writes
    would leave them, across more rows than one statement takes."""
    db = store.open_database(str(tmp_path / "s.db"))
    many = store.ROWS_PER_STATEMENT * 2 + 7
    changes = [_repo_change(i, "upsert", f"bulk{i}") for i in range(many)]
    changes += [
        _repo_change(1, "upsert", "kept", "first"),
        _repo_change(2, "delete", "kept"),
        _repo_change(3, "upsert", "kept", "last"),  # deleted, then written again
        _repo_change(4, "upsert", "gone"),
        _repo_change(5, "delete", "gone"),  # written, then deleted
        _repo_change(6, "upsert", "renamed", "old"),
        _repo_change(7, "upsert", "renamed", "new"),
    ]
    changes += [_repo_change(8, "delete", f"bulk{i}") for i in range(0, many, 2)]
    with db.atomic():
        store.apply_changes(changes)
    names = dict(db.execute_sql("SELECT rkey, name FROM repo").fetchall())
    assert names.pop("kept") == "last"
    assert names.pop("renamed") == "new"
    assert "gone" not in names
    assert set(names) == {f"bulk{i}" for i in range(1, many, 2)}
    db.close()


def test_a_record_written_again_unchanged_is_left_alone(tmp_path: Path):
    """A replay or a backfill brings records back as they are stored: such
    an upsert changes no row (no index rewritten, no knot trigger fired),
    while a changed record still lands."""
    db = store.open_database(str(tmp_path / "s.db"))

    def rows_written(changes: list[Change]) -> int:
        with db.atomic():
            before = db.execute_sql("SELECT total_changes()").fetchone()[0]
            store.apply_changes(changes)
            return db.execute_sql("SELECT total_changes()").fetchone()[0] - before

    first = [_repo_change(1, "upsert", f"r{i}") for i in range(3)]
    assert rows_written(first) == 3
    assert rows_written(first) == 0
    assert rows_written([_repo_change(2, "upsert", "r1", name="renamed")]) == 1
    names = dict(db.execute_sql("SELECT rkey, name FROM repo").fetchall())
    assert names == {"r0": "n", "r1": "renamed", "r2": "n"}
    db.close()


def test_a_collaborator_counts_when_its_author_is_invited_in_the_same_batch(tmp_path: Path):
    db = store.open_database(str(tmp_path / "s.db"))
    directory = store.Directory(HOSTNAME, OWNER)
    invited, stranger = plc_did("invited"), plc_did("stranger")
    grant = {
        "subject": plc_did("helper"),
        "repo": None,
        "repo_did": plc_did("repo"),
        "created_at": "2026-01-01T00:00:00Z",
    }
    member_row = {"subject": invited, "instance": HOSTNAME, "created_at": "2026-01-01T00:00:00Z"}
    changes = [
        Change(1, "upsert", invited, COLLABORATOR, "c1", {"did": invited, "rkey": "c1", **grant}),
        Change(2, "upsert", OWNER, MEMBER, "m1", {"did": OWNER, "rkey": "m1", **member_row}),
        Change(3, "upsert", stranger, COLLABORATOR, "c2", {"did": stranger, "rkey": "c2", **grant}),
    ]
    with db.atomic():
        store.apply_changes(changes, may_grant=directory.is_member)
    kept = db.execute_sql("SELECT did FROM collaborator").fetchall()
    assert kept == [(invited,)]
    db.close()
