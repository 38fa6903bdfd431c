"""Jetstream frames to store changes, validated against the lexicons.

Everything here is untrusted input from the network. A frame either becomes a
``Change`` the applier can write as it is, or a ``BadRecord`` carrying the ids
needed to log it and, where the frame said, the time to move the cursor past it.
Decoding is pure (no I/O), so a frame is bad or good the same way every time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .config import is_did

MEMBER = "sh.tangled.spindle.member"
REPO = "sh.tangled.repo"
COLLABORATOR = "sh.tangled.repo.collaborator"
COLLECTIONS = (MEMBER, REPO, COLLABORATOR)

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


@dataclass(frozen=True)
class Change:
    """One thing to do to the store. ``action`` is one of:

    - ``upsert``: write ``row`` keyed on (did, rkey) into ``collection``;
    - ``delete``: remove (did, rkey) from ``collection``;
    - ``delete_account``: remove every record ``did`` wrote;
    - ``ignore``: nothing to write, but the cursor still moves.
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
        event = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRecord(f"not JSON: {exc}") from None
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
    rkey = commit.get("rkey")
    ids = {"did": did, "collection": collection, "rkey": rkey}
    if collection not in COLLECTIONS:
        return Change(time_us, "ignore", did)
    if not is_rkey(rkey):
        raise BadRecord("rkey missing or malformed", ids, time_us)

    operation = commit.get("operation")
    if operation == "delete":
        return Change(time_us, "delete", did, collection, rkey)
    if operation not in ("create", "update"):
        raise BadRecord(f"unknown operation {operation!r}", ids, time_us)

    record = commit.get("record")
    if not isinstance(record, dict):
        raise BadRecord("create/update without a record object", ids, time_us)
    if record.get("$type", collection) != collection:
        raise BadRecord(f"record $type {record.get('$type')!r} != collection", ids, time_us)
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
    name = _string(record, "name", limit=256)
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
    if repo is not None and not _AT_URI_RE.match(repo):
        raise ValueError("repo is not an at-uri")
    repo_did = _did_field(record, "repoDid", required=False)
    if repo is None and repo_did is None:
        raise ValueError("neither repo nor repoDid is set")
    created_at = _datetime(record, "createdAt")
    return {"subject": subject, "repo": repo, "repo_did": repo_did, "created_at": created_at}


_ROW_BUILDERS = {MEMBER: _member_row, REPO: _repo_row, COLLABORATOR: _collaborator_row}
