"""``records.decode`` frame by frame: what each untrusted shape becomes.

Decoding is pure, so these run it directly on the bytes a jetstream sends;
the ingest tests drive the same function through a real stream and store.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tack.records import COLLABORATOR, MEMBER, PULL, REPO, BadRecord, decode

from .standins import HOSTNAME, OWNER, Clock, collaborator, commit, member, repo

TIME = 1_767_225_600_000_000


def frame(event: dict) -> bytes:
    return json.dumps(event).encode()


def repo_commit(record: dict, operation: str = "create") -> dict:
    event = commit(Clock(), OWNER, REPO, "r1", operation, record)
    event["time_us"] = TIME
    return event


def with_record(record: Any) -> dict:
    """A repo commit whose record is exactly ``record`` (no $type added)."""
    event = repo_commit({})
    event["commit"]["record"] = record
    return event


def outcome(raw: bytes) -> tuple:
    """(action, collection, row) for a change; ("bad", reason, time_us) for a bad frame."""
    try:
        change = decode(raw, HOSTNAME)
    except BadRecord as bad:
        return ("bad", bad.reason, bad.time_us)
    return (change.action, change.collection, change.row)


def test_a_served_repo_becomes_an_upsert_row():
    action, collection, row = outcome(frame(repo_commit(repo("demo", "Knot.Test"))))
    assert (action, collection) == ("upsert", REPO)
    assert row == {
        "did": OWNER,
        "rkey": "r1",
        "name": "demo",
        "knot": "knot.test",
        "spindle": HOSTNAME,
        "repo_did": None,
        "created_at": "2026-01-01T00:00:00.123Z",
    }


def test_a_repo_without_a_name_or_of_another_spindle():
    nameless = {"knot": "k.test", "spindle": HOSTNAME, "createdAt": "2026-01-01T00:00:00Z"}
    assert outcome(frame(repo_commit({**nameless, "name": None})))[2]["name"] == ""
    assert outcome(frame(repo_commit(nameless)))[0] == "upsert"
    # Another spindle's (or no spindle's) repo: any copy we hold goes.
    assert outcome(frame(repo_commit(repo("demo", "k.test", spindle="other.test"))))[0] == "delete"
    assert outcome(frame(repo_commit(repo("demo", "k.test", spindle=None))))[0] == "delete"


def test_members_and_collaborators():
    event = commit(Clock(), OWNER, MEMBER, "m1", "create", member("did:plc:alice"))
    assert outcome(frame(event))[2]["subject"] == "did:plc:alice"
    elsewhere = commit(Clock(), OWNER, MEMBER, "m1", "create", member("did:plc:a", "x.test"))
    assert outcome(frame(elsewhere))[0] == "delete"
    uri = f"at://{OWNER}/sh.tangled.repo/r1"
    by_uri = commit(Clock(), OWNER, COLLABORATOR, "c1", "create", collaborator("did:plc:c", uri))
    assert outcome(frame(by_uri))[2]["repo"] == uri
    by_did = commit(Clock(), OWNER, COLLABORATOR, "c1", "create", collaborator("did:plc:c", uri))
    by_did["commit"]["record"]["repo"] = "did:plc:therepo"
    assert outcome(frame(by_did))[2]["repo_did"] == "did:plc:therepo"
    assert outcome(frame(by_did))[2]["repo"] is None


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"name": 42, "knot": "k", "createdAt": "2026-01-01T00:00:00Z"}, "$.name"),
        ({"name": "", "knot": "k", "createdAt": "2026-01-01T00:00:00Z"}, "$.name"),
        ({"name": "x" * 257, "knot": "k", "createdAt": "2026-01-01T00:00:00Z"}, "$.name"),
        ({"name": "é" * 257, "knot": "k", "createdAt": "2026-01-01T00:00:00Z"}, "$.name"),
        ({"name": "n", "createdAt": "2026-01-01T00:00:00Z"}, "knot"),
        ({"name": "n", "knot": "k", "createdAt": "yesterday"}, "$.createdAt"),
        ({"knot": "k", "createdAt": "2026-01-01T00:00:00Z", "repoDid": "nope"}, "$.repoDid"),
        (
            {"$type": "app.bsky.feed.post", "knot": "k", "createdAt": "2026-01-01T00:00:00Z"},
            "$type",
        ),
        ({"$type": None, "knot": "k", "createdAt": "2026-01-01T00:00:00Z"}, "$type"),
    ],
)
def test_a_malformed_record_is_bad_and_still_moves_the_cursor(record, reason):
    kind, said, time_us = outcome(frame(with_record(record)))
    assert kind == "bad" and reason in said and time_us == TIME


def test_a_record_of_the_most_characters_allowed_is_kept():
    # Limits count characters, as the lexicon's maxGraphemes would, not bytes.
    record = {"name": "é" * 256, "knot": "k.test", "spindle": HOSTNAME}
    record["createdAt"] = "2026-01-01T00:00:00Z"
    assert outcome(frame(with_record(record)))[2]["name"] == "é" * 256


@pytest.mark.parametrize(
    ("raw", "reason", "time_us"),
    [
        (b"{not json", "not JSON", None),
        (b"[1, 2]", "not a JSON object", None),
        (b"[" * 5000 + b"]" * 5000, "not JSON", None),
        (frame({"did": OWNER, "time_us": True, "kind": "commit"}), "time_us", None),
        (frame({"did": OWNER, "time_us": 1.5e15, "kind": "commit"}), "time_us", None),
        (frame({"did": OWNER, "time_us": -1, "kind": "commit"}), "time_us", None),
        (frame({"did": "alice", "time_us": TIME, "kind": "commit"}), "did", TIME),
        (frame({"did": "did:" + "a" * 3000 + ":x", "time_us": TIME}), "did", TIME),
        (frame({"did": OWNER, "time_us": TIME, "kind": "commit"}), "commit object", TIME),
        (frame({"did": OWNER, "time_us": TIME, "kind": "commit", "commit": 7}), "commit", TIME),
        (frame({"did": OWNER, "time_us": TIME, "kind": "account", "account": 1}), "account", TIME),
    ],
)
def test_a_malformed_frame_says_why(raw, reason, time_us):
    kind, said, told = outcome(raw)
    assert kind == "bad" and reason in said and told == time_us


def test_a_did_is_judged_the_same_however_often_it_is_seen():
    # DID checks are remembered per value (records._is_did_cached): a bad one
    # stays bad, in whichever field it comes, and a good one stays good.
    bad_author = frame({"did": "alice", "time_us": TIME, "kind": "commit"})
    bad_subject = frame(commit(Clock(), OWNER, MEMBER, "m1", "create", member("alice")))
    bad_collaborator = commit(Clock(), OWNER, COLLABORATOR, "c1", "create", {})
    bad_collaborator["commit"]["record"] = collaborator("alice", "did:plc:therepo")
    good = frame(commit(Clock(), OWNER, MEMBER, "m2", "create", member("did:plc:bob")))
    for _ in range(3):
        assert outcome(bad_author)[:2] == ("bad", "did missing or malformed")
        kind, said, _ = outcome(bad_subject)
        assert kind == "bad" and "$.subject" in said
        kind, said, _ = outcome(frame(bad_collaborator))
        assert kind == "bad" and "$.subject" in said
        assert outcome(good)[2]["subject"] == "did:plc:bob"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"rkey": "../x"}, "rkey"),
        ({"rkey": None}, "rkey"),
        ({"operation": "upsert"}, "operation"),
        ({"record": None}, "record"),
        ({"record": "text"}, "record"),
        ({"record": [1]}, "record"),
    ],
)
def test_a_malformed_commit_says_why(change, reason):
    event = repo_commit(repo("demo", "k.test"))
    event["commit"].update(change)
    kind, said, told = outcome(frame(event))
    assert kind == "bad" and reason in said and told == TIME


def test_what_tack_does_not_read_only_moves_the_cursor():
    other = repo_commit({"text": "hello"})
    other["commit"]["collection"] = "app.bsky.feed.post"
    assert outcome(frame(other)) == ("ignore", None, None)
    # Parts a kind does not read may be anything.
    identity = {"did": OWNER, "time_us": TIME, "kind": "identity", "commit": "junk"}
    assert outcome(frame(identity)) == ("ignore", None, None)
    account = {"did": OWNER, "time_us": TIME, "kind": "account", "commit": [1]}
    account["account"] = {"active": False, "status": "deleted"}
    assert outcome(frame(account))[0] == "delete_account"
    deletion = repo_commit({}, operation="delete")
    assert outcome(frame(deletion)) == ("delete", REPO, None)


def test_a_pull_request_record_is_read_as_plain_json():
    record = {
        "target": {"repo": "did:plc:therepo", "branch": "main"},
        "source": {"branch": "feature"},
        "rounds": [{"patchBlob": {"ref": {"$link": "bafkreiabcdefgh"}}}],
        "createdAt": "2026-01-01T00:00:00Z",
    }
    event = commit(Clock(), OWNER, PULL, "p1", "create", record)
    action, collection, row = outcome(frame(event))
    assert (action, collection, row["source_branch"], row["action"]) == (
        "pull_event",
        PULL,
        "feature",
        "opened",
    )
    event["commit"]["record"] = {**record, "target": "main"}
    assert outcome(frame(event))[:2] == ("bad", "target missing or not an object")
