"""Jetstream frames to store changes, validated against the lexicons.

Everything here is untrusted input from the network. A frame either becomes a
``Change`` the applier can write as it is, or a ``BadRecord`` carrying the ids
needed to log it and, where the frame said, the time to move the cursor past it.
Decoding is pure (no I/O), so a frame is bad or good the same way every time.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import orjson

from .config import is_did

MEMBER = "sh.tangled.spindle.member"
REPO = "sh.tangled.repo"
COLLABORATOR = "sh.tangled.repo.collaborator"
PULL = "sh.tangled.repo.pull"
PULL_STATUS = "sh.tangled.repo.pull.status"
COLLECTIONS = (MEMBER, REPO, COLLABORATOR, PULL, PULL_STATUS)
# A pull request event is a trigger, not only a row: these become "pull_event"
# changes, which queue a pipeline for the pull request worker.
PULL_EVENTS = (PULL, PULL_STATUS)
_COLLECTION_SET = frozenset(COLLECTIONS)
PULL_STATUS_ACTIONS = {
    "sh.tangled.repo.pull.status.open": "reopened",
    "sh.tangled.repo.pull.status.closed": "closed",
    "sh.tangled.repo.pull.status.merged": "merged",
}

# Records are small (a repo record is a few hundred bytes); the limit keeps a
# hostile frame from costing more than a decode.
MAX_FRAME_BYTES = 256 * 1024
MAX_STRING = 2048

_RKEY_RE = re.compile(r"^[A-Za-z0-9._:~-]{1,512}$")


def is_rkey(value: Any) -> bool:
    """An atproto record key: tack's check for every rkey that arrives from outside."""
    return isinstance(value, str) and bool(_RKEY_RE.match(value)) and value not in (".", "..")


_DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:?\d{2})$")
_AT_URI_RE = re.compile(r"^at://[A-Za-z0-9._:%-]+(/[A-Za-z0-9.-]+(/[A-Za-z0-9._:~-]+)?)?$")


class BadRecord(Exception):
    """A frame that can never be applied; skip it and move on."""

    def __init__(self, reason: str, ids: dict[str, Any] | None = None, time_us: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.ids = ids or {}
        self.time_us = time_us


@dataclass(slots=True)
class Change:
    """One thing to do to the store. ``action`` is one of:

    - ``upsert``: write ``row`` keyed on (did, rkey) into ``collection``;
    - ``delete``: remove (did, rkey) from ``collection``;
    - ``delete_account``: remove every record ``did`` wrote;
    - ``ignore``: nothing to write, but the cursor still moves.

    Treat it as immutable. It is not frozen because a frozen dataclass costs
    four times as much to build, and one is built for every event.
    """

    time_us: int
    action: str
    did: str
    collection: str | None = None
    rkey: str | None = None
    row: dict[str, Any] | None = None

    @property
    def ids(self) -> dict[str, Any]:
        ids: dict[str, Any] = {"did": self.did}
        if self.collection:
            ids.update(collection=self.collection, rkey=self.rkey)
        return ids


# --- the shapes: checked in C by msgspec as a frame is parsed, so a frame is
# validated without first becoming dicts. What the protocol leaves loose
# (``kind``, the commit's strings) is typed Any and checked below.


def _text(limit: int = MAX_STRING) -> Any:
    """A non-empty string of at most ``limit`` characters."""
    return Annotated[str, msgspec.Meta(min_length=1, max_length=limit)]


# DIDs and datetimes are matched against their patterns in _decode_commit:
# a direct match costs half of msgspec's pattern constraint, and a DID, seen
# again and again, is matched once while it stays among the recent ones.
_Did = _text()
_Datetime = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class _Commit(msgspec.Struct):
    collection: Any = None
    rkey: Any = None
    operation: Any = None
    rev: Any = None
    record: msgspec.Raw = msgspec.Raw()  # parsed only for our collections


class _Event(msgspec.Struct):
    time_us: Annotated[int, msgspec.Meta(gt=0)]
    did: _Did
    kind: Any = None
    commit: _Commit | None = None
    account: Any = None


class _Record(msgspec.Struct, kw_only=True):
    type: Any = msgspec.field(name="$type", default=msgspec.UNSET)


class _MemberRecord(_Record, kw_only=True):
    subject: _Did
    instance: _text(260)
    createdAt: _Datetime


class _RepoRecord(_Record, kw_only=True):
    knot: _text(260)
    createdAt: _Datetime
    # Today's records may omit the (cosmetic) name; the repo DID names the repo.
    name: _text(256) | None = None
    spindle: _text(260) | None = None
    repoDid: _Did | None = None


class _CollaboratorRecord(_Record, kw_only=True):
    subject: _Did
    createdAt: _Datetime
    repo: _text() | None = None
    repoDid: _Did | None = None


# The fields of each record shape holding a DID, checked by _check_patterns.
_DID_FIELDS = {
    MEMBER: ("subject",),
    REPO: ("repoDid",),
    COLLABORATOR: ("subject", "repoDid"),
}


def _check_patterns(record: _Record, did_fields: tuple[str, ...]) -> None:
    """The pattern checks the shapes leave out (see ``_Did``), worded like
    msgspec's own."""
    if not _DATETIME_RE.match(record.createdAt):
        raise ValueError("Expected an RFC 3339 datetime - at `$.createdAt`")
    for field in did_fields:
        value = getattr(record, field)
        if value is not None and not _is_did_cached(value):
            raise ValueError(f"Expected a DID - at `$.{field}`")


_EVENT = msgspec.json.Decoder(_Event)
_RECORDS = {
    MEMBER: msgspec.json.Decoder(_MemberRecord),
    REPO: msgspec.json.Decoder(_RepoRecord),
    COLLABORATOR: msgspec.json.Decoder(_CollaboratorRecord),
}


def decode(frame: str | bytes, hostname: str) -> Change:
    """Turn one jetstream frame into a Change, or raise BadRecord."""
    if len(frame) > MAX_FRAME_BYTES:
        raise BadRecord(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        event = _EVENT.decode(frame)
    except Exception:
        # Whatever the parser raised (bad JSON, too deep, a field of the
        # wrong type), the shapes refuse the frame: the loose reading says
        # why, or keeps it when only a part its kind never reads was odd.
        return _decode_loose(frame)
    if not _is_did_cached(event.did):
        return _decode_loose(frame)
    if event.kind == "commit":
        if event.commit is None:
            raise BadRecord(
                "commit event without a commit object", {"did": event.did}, event.time_us
            )
        return _decode_commit(event.commit, event.did, event.time_us, hostname)
    if event.kind == "account":
        return _decode_account(event.account, event.did, event.time_us)
    return Change(event.time_us, "ignore", event.did)


@functools.lru_cache(maxsize=4096)
def _is_did_cached(value: str) -> bool:
    """``is_did``, once per value while it stays among the recent ones.

    A spindle's stream comes from the few thousand accounts that use
    Tangled, each writing many events about the same members and repos, and
    the pattern checks were a quarter of decoding. The cache is bounded in
    entries, and each entry in size by the shapes' ``MAX_STRING``.
    """
    return is_did(value)


def _decode_loose(frame: str | bytes) -> Change:
    """A frame the shapes refused, read as plain JSON: which check it fails,
    with its time when it told a valid one (the cursor moves past it), or
    what it means when only a part no kind reads was malformed."""
    try:
        event = orjson.loads(frame)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise BadRecord(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(event, dict):
        raise BadRecord("frame is not a JSON object")
    time_us = event.get("time_us")
    if not isinstance(time_us, int) or isinstance(time_us, bool) or time_us <= 0:
        raise BadRecord("time_us missing or not a positive integer")
    did = event.get("did")
    if not isinstance(did, str) or not is_did(did) or len(did) > MAX_STRING:
        raise BadRecord("did missing or malformed", time_us=time_us)
    kind = event.get("kind")
    if kind == "commit":
        raise BadRecord("commit event without a commit object", {"did": did}, time_us)
    if kind == "account":
        return _decode_account(event.get("account"), did, time_us)
    return Change(time_us, "ignore", did)


def _decode_account(account: Any, did: str, time_us: int) -> Change:
    if not isinstance(account, dict):
        raise BadRecord("account event without an account object", {"did": did}, time_us)
    # Only deletion is final; suspended or deactivated accounts may come back
    # with their records intact, so their rows stay.
    if account.get("active") is False and account.get("status") == "deleted":
        return Change(time_us, "delete_account", did)
    return Change(time_us, "ignore", did)


def _decode_commit(commit: _Commit, did: str, time_us: int, hostname: str) -> Change:
    collection = commit.collection
    if collection not in _COLLECTION_SET:
        return Change(time_us, "ignore", did)
    rkey = commit.rkey
    if not is_rkey(rkey):
        raise _bad_commit("rkey missing or malformed", did, collection, rkey, time_us)

    operation = commit.operation
    if operation == "delete":
        if collection == PULL_STATUS:
            return Change(time_us, "ignore", did)
        return Change(time_us, "delete", did, collection, rkey)
    if operation != "create" and operation != "update":
        raise _bad_commit(f"unknown operation {operation!r}", did, collection, rkey, time_us)
    if not commit.record:
        raise _bad_commit("create/update without a record object", did, collection, rkey, time_us)
    if collection in PULL_EVENTS:
        ids = {"did": did, "collection": collection, "rkey": rkey}
        return _pull_event(commit, did, collection, rkey, operation, time_us, ids)
    try:
        record = _RECORDS[collection].decode(commit.record)
        if record.type is not msgspec.UNSET and record.type != collection:
            raise ValueError(f"record $type {record.type!r} != collection")
        _check_patterns(record, _DID_FIELDS[collection])
        row = _ROW_BUILDERS[collection](record, did, rkey, hostname)
    except (msgspec.ValidationError, ValueError) as exc:
        raise _bad_commit(f"record: {exc}", did, collection, rkey, time_us) from None
    if row is None:
        # A valid record that does not concern this spindle (another spindle's
        # repo or member). It may have concerned us before this update, so the
        # copy we hold, if any, goes.
        return Change(time_us, "delete", did, collection, rkey)
    return Change(time_us, "upsert", did, collection, rkey, row)


def _bad_commit(reason: str, did: str, collection: str, rkey: Any, time_us: int) -> BadRecord:
    return BadRecord(reason, {"did": did, "collection": collection, "rkey": rkey}, time_us)


# --- rows: from a record whose fields the shapes above already checked, keyed
# by the store's column names


def _member_row(record: _MemberRecord, did: str, rkey: str, hostname: str) -> dict | None:
    instance = record.instance.lower()
    if instance != hostname:
        return None
    return {
        "did": did,
        "rkey": rkey,
        "subject": record.subject,
        "instance": instance,
        "created_at": record.createdAt,
    }


def _repo_row(record: _RepoRecord, did: str, rkey: str, hostname: str) -> dict | None:
    spindle = record.spindle
    if spindle is None or (spindle != hostname and spindle.lower() != hostname):
        return None
    return {
        "did": did,
        "rkey": rkey,
        "name": record.name or "",
        "knot": record.knot.lower(),
        "spindle": hostname,
        "repo_did": record.repoDid,
        "created_at": record.createdAt,
    }


def _collaborator_row(record: _CollaboratorRecord, did: str, rkey: str, hostname: str) -> dict:
    repo, repo_did = record.repo, record.repoDid
    if repo is not None and _is_did_cached(repo):
        repo, repo_did = None, repo  # today's shape: the repo named by its DID
    elif repo is not None and not _AT_URI_RE.match(repo):
        raise ValueError("repo is neither a repo DID nor an at-uri")
    if repo is None and repo_did is None:
        raise ValueError("neither repo nor repoDid is set")
    return {
        "did": did,
        "rkey": rkey,
        "subject": record.subject,
        "repo": repo,
        "repo_did": repo_did,
        "created_at": record.createdAt,
    }


_ROW_BUILDERS = {MEMBER: _member_row, REPO: _repo_row, COLLABORATOR: _collaborator_row}


# --- pull requests: nested and rare, so read as plain JSON and checked field
# by field; each check returns the clean value or raises ValueError naming it


def _string(record: dict, field: str, *, required: bool = True, limit: int = MAX_STRING) -> Any:
    value = record.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{field} missing or not a string")
    if not value or len(value) > limit:
        raise ValueError(f"{field} is empty or longer than {limit} characters")
    return value


def _did_field(record: dict, field: str, *, required: bool = True) -> str | None:
    value = _string(record, field, required=required)
    if value is not None and not is_did(value):
        raise ValueError(f"{field} is not a DID")
    return value


def _datetime(record: dict, field: str) -> str:
    value = _string(record, field, limit=64)
    if not _DATETIME_RE.match(value):
        raise ValueError(f"{field} is not an RFC 3339 datetime")
    return value


def _pull_event(
    commit: _Commit,
    did: str,
    collection: str,
    rkey: str,
    operation: str,
    time_us: int,
    ids: dict,
) -> Change:
    """A pull request record, or a status change of one, as a trigger.

    Only branch pull requests within one repo run (protocol-2026 §5.4): a
    fork's or a bare patch's pull request is valid but ignored.
    """
    try:
        record = msgspec.json.decode(commit.record)
    except Exception as exc:  # too deep for a plain reading, say
        raise BadRecord(f"record unreadable: {type(exc).__name__}", ids, time_us) from None
    if not isinstance(record, dict):
        raise BadRecord("create/update without a record object", ids, time_us)
    if record.get("$type", collection) != collection:
        raise BadRecord(f"record $type {record.get('$type')!r} != collection", ids, time_us)
    revision = commit.rev if isinstance(commit.rev, str) else str(time_us)
    key = f"{did}/{collection}/{rkey}@{revision[:64]}"
    try:
        if collection == PULL_STATUS:
            row = _pull_status_row(record, operation)
        else:
            row = _pull_row(record, operation)
    except ValueError as exc:
        raise BadRecord(str(exc), ids, time_us) from None
    if row is None:
        return Change(time_us, "ignore", did)
    return Change(time_us, "pull_event", did, collection, rkey, {**row, "key": key})


def _pull_row(record: dict, operation: str) -> dict | None:
    target = record.get("target")
    source = record.get("source")
    if not isinstance(target, dict):
        raise ValueError("target missing or not an object")
    if not isinstance(source, dict) or source.get("repo") is not None:
        return None  # a patch or a fork: not run here
    rounds = record.get("rounds")
    if not isinstance(rounds, list) or not rounds or len(rounds) > 10_000:
        raise ValueError("rounds must be a non-empty list")
    last = rounds[-1]
    blob = last.get("patchBlob") if isinstance(last, dict) else None
    link = blob.get("ref") if isinstance(blob, dict) else None
    cid = link.get("$link") if isinstance(link, dict) else None
    if not isinstance(cid, str) or not re.match(r"^[a-z0-9]{8,200}$", cid):
        raise ValueError("the last round has no patchBlob with a CID")
    return {
        "target_repo_did": _did_field(target, "repo"),
        "target_branch": _string(target, "branch", limit=255),
        "source_branch": _string(source, "branch", limit=255),
        "patch_blob": cid,
        "created_at": _datetime(record, "createdAt"),
        "action": "opened" if operation == "create" else "synchronize",
    }


def _pull_status_row(record: dict, operation: str) -> dict | None:
    pull = _string(record, "pull")
    match = re.match(r"^at://(did:[a-z]+:[A-Za-z0-9._:%-]+)/sh\.tangled\.repo\.pull/([^/]+)$", pull)
    if not match or not is_rkey(match[2]):
        raise ValueError("pull is not the at-uri of a pull request")
    status = _string(record, "status", limit=256)
    if operation != "create" or status not in PULL_STATUS_ACTIONS:
        return None
    return {"pull_did": match[1], "pull_rkey": match[2], "action": PULL_STATUS_ACTIONS[status]}
