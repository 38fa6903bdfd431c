"""Backfill: the records tack needs, read from their authors' PDSes.

jetstream keeps about a day of events. A tack starting with no cursor, or
with one older than that (``TACK_JETSTREAM_RETENTION_HOURS``), would know no
members, repos or collaborators until each is written again, and would
reject every pipeline. So before following jetstream, the reader thread
lists the current records (``com.atproto.repo.listRecords``, paged): the
owner's ``sh.tangled.spindle.member`` records, then the ``sh.tangled.repo``
and ``sh.tangled.repo.collaborator`` records of the owner and of every
member. They become the same ``Change``s jetstream frames become and go
through the applier's queue ahead of any jetstream event, so the one writer
applies them in order and jetstream's events land on top. A record tack
holds that a complete listing no longer has was deleted meanwhile: it goes.

Everything a PDS answers is untrusted: each record is validated like a
jetstream frame, pages and sizes are bounded, every request has a deadline,
and addresses are vetted. A PDS that cannot be read is logged and skipped
(those records then arrive as they are written); nothing it listed is
deleted then.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from .. import logs, records, store
from ..net import vetted_get_json
from ..records import BadRecord, Change

log = logs.get("backfill")

PAGE = 100
MAX_PAGES = 100  # 10,000 records of one collection by one author
PAGE_BYTES = 4 * 1024 * 1024
TIMEOUT = 10.0
# jetstream waits for the backfill: it gives up on what is left after this.
DEADLINE = 120.0
ATTEMPTS = 3
RETRY_SECONDS = (0.5, 2.0)


class Unreadable(Exception):
    """A PDS (or an identity) that could not be read; the reason says why."""


@dataclass
class Learned:
    """What a backfill found, for its log line."""

    members: int = 0
    repos: int = 0
    collaborators: int = 0
    deleted: int = 0
    skipped: list[str] = field(default_factory=list)  # "<did> <collection>: reason"


def needed(cursor_us: int | None, retention_hours: float) -> str | None:
    """Why a backfill is needed now, or None."""
    if cursor_us is None:
        return "no jetstream cursor"
    age_hours = (time.time() - cursor_us / 1e6) / 3600
    if age_hours > retention_hours:
        kept = f"jetstream keeps ~{retention_hours:g} h"
        return f"the jetstream cursor is {age_hours:.0f} h old ({kept})"
    return None


class Backfill:
    def __init__(
        self,
        directory: store.Directory,
        pds_of: Callable[[str], str],
        dev: bool,
        stop: threading.Event,
    ) -> None:
        self._directory = directory
        self._pds_of = pds_of
        self._dev = dev
        self._stop = stop
        self._pds: dict[str, str | Unreadable] = {}  # per run: each DID resolved once
        self._deadline = 0.0

    def changes(self, learned: Learned) -> Iterator[Change]:
        """The changes that bring the store to what the PDSes hold now."""
        self._pds.clear()
        self._deadline = time.monotonic() + DEADLINE
        owner = self._directory.owner
        members = list(self._listing(owner, records.MEMBER, learned))
        if isinstance(self._pds.get(owner), Unreadable):
            return  # no members, and no owner's repos, without the owner's PDS
        yield from members
        invited = {c.row["subject"] for c in members if c.action == "upsert" and c.row is not None}
        learned.members = len(invited)
        for did in [owner, *sorted(invited - {owner})]:
            for collection in (records.REPO, records.COLLABORATOR):
                for change in self._listing(did, collection, learned):
                    if change.action == "upsert":
                        if collection == records.REPO:
                            learned.repos += 1
                        else:
                            learned.collaborators += 1
                    yield change

    def _listing(self, did: str, collection: str, learned: Learned) -> Iterator[Change]:
        """One author's records of one collection, then deletes of the ones
        tack holds that the (complete) listing lacks."""
        try:
            listed = list(self._records(did, collection))
        except Unreadable as exc:
            learned.skipped.append(f"{did} {collection}: {exc}")
            return
        now_us = time.time_ns() // 1000
        present: set[str] = set()
        for rkey, value in listed:
            change = _change(did, collection, rkey, value, now_us, self._directory.hostname)
            if change is not None:
                present.add(rkey)
                yield change
        for rkey in store.stored_rkeys(collection, did) - present:
            learned.deleted += 1
            yield Change(now_us, "delete", did, collection, rkey)

    def _pds_for(self, did: str) -> str:
        if did not in self._pds:
            try:
                self._pds[did] = self._pds_of(did)
            except Exception as exc:
                reason = f"no PDS: {type(exc).__name__}: {str(exc)[:200]}"
                self._pds[did] = Unreadable(reason)
        found = self._pds[did]
        if isinstance(found, Unreadable):
            raise found
        return found

    def _records(self, did: str, collection: str) -> Iterator[tuple[str, Any]]:
        if time.monotonic() > self._deadline:
            raise Unreadable(f"the backfill's {DEADLINE:g} s are over")
        pds = self._pds_for(did)
        cursor = None
        for _ in range(MAX_PAGES):
            query = {"repo": did, "collection": collection, "limit": PAGE}
            if cursor:
                query["cursor"] = cursor
            url = f"{pds}/xrpc/com.atproto.repo.listRecords?{urlencode(query, quote_via=quote)}"
            page = self._get(url)
            entries = page.get("records")
            if not isinstance(entries, list):
                raise Unreadable("listRecords answered without a records list")
            for entry in entries:
                rkey = _rkey_of(entry, did, collection)
                if rkey is not None:
                    yield rkey, entry.get("value")
            cursor = page.get("cursor")
            if not entries or not isinstance(cursor, str) or not cursor:
                return
        raise Unreadable(f"more than {MAX_PAGES * PAGE} records")

    def _get(self, url: str) -> dict[str, Any]:
        for attempt in range(ATTEMPTS):
            try:
                return vetted_get_json(url, self._dev, TIMEOUT, PAGE_BYTES)
            except Exception as exc:
                if attempt == ATTEMPTS - 1 or self._stop.is_set():
                    raise Unreadable(f"{type(exc).__name__}: {str(exc)[:200]}") from None
                self._stop.wait(RETRY_SECONDS[attempt])
        raise Unreadable("unreachable")


def _rkey_of(entry: Any, did: str, collection: str) -> str | None:
    """The rkey of a listed record whose URI is really this author's and
    collection's; None for anything else."""
    if not isinstance(entry, dict) or not isinstance(entry.get("uri"), str):
        return None
    prefix = f"at://{did}/{collection}/"
    uri = entry["uri"]
    rkey = uri[len(prefix) :] if uri.startswith(prefix) else None
    return rkey if records.is_rkey(rkey) else None


def _change(
    did: str, collection: str, rkey: str, value: Any, now_us: int, hostname: str
) -> Change | None:
    """A listed record as the change its jetstream create would make."""
    frame = {
        "did": did,
        "time_us": now_us,
        "kind": "commit",
        "commit": {"operation": "create", "collection": collection, "rkey": rkey, "record": value},
    }
    try:
        return records.decode(orjson.dumps(frame), hostname)
    except (BadRecord, TypeError, ValueError):
        return None
