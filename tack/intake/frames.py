"""Knot frames and the events inside them, validated.

A knot's ``/events`` frame is ``{"rkey", "nsid", "event", "created"}``
(``created``, unix ns, since 2026; older knots send no ``created`` and stamp
the rkey TID with their clock). Everything here is untrusted: any failure to
parse, however it fails, makes the frame bad (``None`` or ``Rejected``), never
an exception that reaches the stream.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from .. import tid
from ..config import is_did
from ..records import is_rkey
from .legacy import Rejected

PIPELINE = "sh.tangled.pipeline"
REF_UPDATE = "sh.tangled.git.refUpdate"
COLLABORATOR_UPDATE = "sh.tangled.repo.collaboratorUpdate"
MAX_FRAME_BYTES = 2 * 1024 * 1024
# A time from a frame moves a cursor only if it is no further ahead of our
# clock than this: a knot's clock may run a little fast, never years.
MAX_CLOCK_SKEW_NS = 5 * 60 * 1_000_000_000
ZERO_SHA = "0" * 40
SKIP_OPTIONS = frozenset({"skip-ci", "ci-skip"})
_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPO_NAME = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
MAX_CHANGED_FILES = 100_000
MAX_PUSH_OPTIONS = 50


@dataclass(frozen=True)
class KnotFrame:
    rkey: str
    nsid: str
    event: Any
    created_ns: int | None  # the knot's cursor value for this frame, when plausible
    exact: bool  # created_ns is the knot's own ``created``, not a TID's time


def decode_frame(frame: str | bytes) -> KnotFrame | None:
    """The frame's parts, or None when it is not a knot event frame."""
    if len(frame) > MAX_FRAME_BYTES:
        return None
    try:
        payload = json.loads(frame)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    rkey, nsid = payload.get("rkey"), payload.get("nsid")
    if not is_rkey(rkey) or not isinstance(nsid, str) or len(nsid) > 317:
        return None
    created = payload.get("created")
    exact = isinstance(created, int) and not isinstance(created, bool)
    return KnotFrame(rkey, nsid, payload.get("event"), _created_ns(created, rkey), exact)


def _created_ns(created: Any, rkey: str) -> int | None:
    """``created`` when the knot sends it, else the rkey TID's time; None when
    neither is a plausible time (so a bogus value never becomes the cursor)."""
    if isinstance(created, int) and not isinstance(created, bool):
        value = created
    else:
        micros = tid.micros(rkey)
        value = None if micros is None else micros * 1000
    if value is None or value <= 0 or value > time.time_ns() + MAX_CLOCK_SKEW_NS:
        return None
    return value


@dataclass(frozen=True)
class RefUpdate:
    """A push, in either wire shape (protocol-2026 §5.2).

    ``repo_did`` is set for today's shape; Dec 2025 knots name the repo by
    ``owner`` and ``repo_name`` instead.
    """

    ref: str
    old_sha: str
    new_sha: str
    committer: str
    owner: str | None
    repo_did: str | None
    repo_name: str | None
    changed_files: tuple[str, ...]
    push_options: tuple[str, ...]

    @property
    def modern(self) -> bool:
        return self.repo_did is not None

    @property
    def deletion(self) -> bool:
        return self.new_sha == ZERO_SHA

    @property
    def skip_ci(self) -> bool:
        return bool(SKIP_OPTIONS.intersection(self.push_options))


def decode_ref_update(event: Any) -> RefUpdate:
    """Validate a refUpdate event; raise Rejected with the reason."""
    if not isinstance(event, dict):
        raise Rejected("event must be an object")
    ref = _string(event, "ref", 2560)
    if not ref.startswith("refs/"):
        raise Rejected("ref must start with refs/")
    old_sha, new_sha = _sha(event, "oldSha"), _sha(event, "newSha")
    committer = _did(event, "committerDid")
    repo = event.get("repo")
    if isinstance(repo, str) and is_did(repo):
        owner = _did(event, "ownerDid") if event.get("ownerDid") is not None else None
        repo_did, repo_name = repo, None
    else:
        # The Dec 2025 shape: repoDid is the owner, repoName the repository.
        owner, repo_did = _did(event, "repoDid"), None
        repo_name = _string(event, "repoName", 255)
        if not _REPO_NAME.match(repo_name):
            raise Rejected("repoName is not a repository name")
    return RefUpdate(
        ref=ref,
        old_sha=old_sha,
        new_sha=new_sha,
        committer=committer,
        owner=owner,
        repo_did=repo_did,
        repo_name=repo_name,
        changed_files=_strings(event, "changedFiles", MAX_CHANGED_FILES, 4096),
        push_options=_strings(event, "pushOptions", MAX_PUSH_OPTIONS, 1024),
    )


@dataclass(frozen=True)
class CollaboratorUpdate:
    op: str  # add | remove
    subject: str
    repo_did: str


def decode_collaborator_update(event: Any) -> CollaboratorUpdate:
    if not isinstance(event, dict):
        raise Rejected("event must be an object")
    op = event.get("op")
    if op not in ("add", "remove"):
        raise Rejected("op must be add or remove")
    return CollaboratorUpdate(op, _did(event, "subject"), _did(event, "repo"))


def _string(obj: dict, key: str, limit: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise Rejected(f"{key} must be a string of 1 to {limit} characters")
    return value


def _sha(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not _SHA.match(value):
        raise Rejected(f"{key} must be 40 lowercase hex characters")
    return value


def _did(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > 2048 or not is_did(value):
        raise Rejected(f"{key} must be a DID")
    return value


def _strings(obj: dict, key: str, count: int, limit: int) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > count:
        raise Rejected(f"{key} must be a list of at most {count} strings")
    if not all(isinstance(item, str) and len(item) <= limit for item in value):
        raise Rejected(f"{key} must hold strings of at most {limit} characters")
    return tuple(value)
