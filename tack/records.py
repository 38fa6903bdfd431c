"""Jetstream frames to store changes, validated against the lexicons.

Everything here is untrusted input from the network. A frame either becomes a
``Change`` the applier can write as it is, or a ``BadRecord`` carrying the ids
needed to log it and, where the frame said, the time to move the cursor past it.
Decoding is pure (no I/O), so a frame is bad or good the same way every time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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


def decode(frame: str | bytes, hostname: str) -> Change:
    """Turn one jetstream frame into a Change, or raise BadRecord."""
    if len(frame) > MAX_FRAME_BYTES:
        raise BadRecord(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        event = orjson.loads(frame)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        # Any failure to parse is a bad record, including nesting too deep.
        raise BadRecord(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(event, dict):
        raise BadRecord("frame is not a JSON object")

    time_us = event.get("time_us")
    if not isinstance(time_us, int) or isinstance(time_us, bool) or time_us <= 0:
        raise BadRecord("time_us missing or not a positive integer")
    did = event.get("did")
    if not isinstance(did, str) or not is_did(did):
        raise BadRecord("did missing or malformed", time_us=time_us)

    kind = event.get("kind")
    if kind == "commit":
        return _decode_commit(event.get("commit"), did, time_us, hostname)
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


def _decode_commit(commit: Any, did: str, time_us: int, hostname: str) -> Change:
    if not isinstance(commit, dict):
        raise BadRecord("commit event without a commit object", {"did": did}, time_us)
    collection = commit.get("collection")
    if collection not in COLLECTIONS:
        return Change(time_us, "ignore", did)
    rkey = commit.get("rkey")
    ids = {"did": did, "collection": collection, "rkey": rkey}
    if not is_rkey(rkey):
        raise BadRecord("rkey missing or malformed", ids, time_us)

    operation = commit.get("operation")
    if operation == "delete":
        if collection == PULL_STATUS:
            return Change(time_us, "ignore", did)
        return Change(time_us, "delete", did, collection, rkey)
    if operation not in ("create", "update"):
        raise BadRecord(f"unknown operation {operation!r}", ids, time_us)

    record = commit.get("record")
    if not isinstance(record, dict):
        raise BadRecord("create/update without a record object", ids, time_us)
    if record.get("$type", collection) != collection:
        raise BadRecord(f"record $type {record.get('$type')!r} != collection", ids, time_us)
    if collection in PULL_EVENTS:
        return _pull_event(record, commit, did, collection, rkey, operation, time_us, ids)
    try:
        row = _ROW_BUILDERS[collection](record, hostname)
    except ValueError as exc:
        raise BadRecord(str(exc), ids, time_us) from None
    if row is None:
        # A valid record that does not concern this spindle (another spindle's
        # repo or member). It may have concerned us before this update, so the
        # copy we hold, if any, goes.
        return Change(time_us, "delete", did, collection, rkey)
    return Change(time_us, "upsert", did, collection, rkey, {"did": did, "rkey": rkey, **row})


# --- field checks: each returns the clean value or raises ValueError naming the field


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


def _member_row(record: dict, hostname: str) -> dict | None:
    subject = _did_field(record, "subject")
    instance = _string(record, "instance", limit=260).lower()
    created_at = _datetime(record, "createdAt")
    if instance != hostname:
        return None
    return {"subject": subject, "instance": instance, "created_at": created_at}


def _repo_row(record: dict, hostname: str) -> dict | None:
    # Today's records may omit the (cosmetic) name; the repo DID names the repo.
    name = _string(record, "name", required=False, limit=256) or ""
    knot = _string(record, "knot", limit=260).lower()
    spindle = _string(record, "spindle", required=False, limit=260)
    repo_did = _did_field(record, "repoDid", required=False)
    created_at = _datetime(record, "createdAt")
    if spindle is None or spindle.lower() != hostname:
        return None
    return {
        "name": name,
        "knot": knot,
        "spindle": hostname,
        "repo_did": repo_did,
        "created_at": created_at,
    }


def _collaborator_row(record: dict, hostname: str) -> dict:
    subject = _did_field(record, "subject")
    repo = _string(record, "repo", required=False)
    repo_did = _did_field(record, "repoDid", required=False)
    if repo is not None and is_did(repo):
        repo, repo_did = None, repo  # today's shape: the repo named by its DID
    elif repo is not None and not _AT_URI_RE.match(repo):
        raise ValueError("repo is neither a repo DID nor an at-uri")
    if repo is None and repo_did is None:
        raise ValueError("neither repo nor repoDid is set")
    created_at = _datetime(record, "createdAt")
    return {"subject": subject, "repo": repo, "repo_did": repo_did, "created_at": created_at}


_ROW_BUILDERS = {MEMBER: _member_row, REPO: _repo_row, COLLABORATOR: _collaborator_row}


def _pull_event(
    record: dict,
    commit: dict,
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
    revision = commit.get("rev") if isinstance(commit.get("rev"), str) else str(time_us)
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
