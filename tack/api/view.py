"""Pipelines as the appview sees them: ``sh.tangled.ci.pipeline`` objects.

A pipeline's view is built from its row (id, repo DID, commit, the trigger
from its record, when it was created) and its workflows' rows (status, when
they started and finished, the error). Workflows not yet announced show as
``pending``; times are RFC 3339 at second precision, as the official
spindle writes them. Pages come newest first, by the row's insertion order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..pipelines import ci_trigger
from ..statuses import NEW, PENDING
from ..store import database

_COLUMNS = "rowid, knot, rkey, record, accepted_at, repo_did, sha"


@dataclass
class PipelineView:
    seq: int  # the row's insertion order: the page cursor
    knot: str
    view: dict[str, Any]


def rfc3339_seconds(ns: int) -> str:
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def query(
    repo_did: str, commits: list[str], kinds: list[str], limit: int, before: int | None
) -> tuple[list[PipelineView], int]:
    """A page of ``repo_did``'s pipelines, newest first, and how many match
    from the cursor on; with ``commits``, only the newest pipeline of each."""
    where, args = ["repo_did = ?"], [repo_did]
    if kinds:
        where.append(f"kind IN ({_marks(kinds)})")
        args += kinds
    if commits:
        # One pipeline per commit: the newest among those matching the rest.
        newest = f"SELECT max(rowid) FROM pipeline WHERE {' AND '.join(where)} AND sha IN "
        newest += f"({_marks(commits)}) GROUP BY sha"
        where, args = [f"rowid IN ({newest})"], [*args, *commits]
    if before is not None:
        where.append("rowid < ?")
        args.append(before)
    condition = " AND ".join(where)
    total = database.execute_sql(f"SELECT count(*) FROM pipeline WHERE {condition}", args)
    rows = database.execute_sql(
        f"SELECT {_COLUMNS} FROM pipeline WHERE {condition} ORDER BY rowid DESC LIMIT ?",
        [*args, limit],
    ).fetchall()
    return _views(rows), total.fetchone()[0]


def by_id(rkey: str) -> PipelineView | None:
    rows = database.execute_sql(
        f"SELECT {_COLUMNS} FROM pipeline WHERE rkey = ? ORDER BY rowid DESC LIMIT 1", [rkey]
    ).fetchall()
    views = _views(rows)
    return views[0] if views else None


def _marks(values: list) -> str:
    return ", ".join("?" * len(values))


def _views(rows: list[tuple]) -> list[PipelineView]:
    if not rows:
        return []
    keys = [(row[1], row[2]) for row in rows]
    workflows: dict[tuple[str, str], list[dict]] = {key: [] for key in keys}
    by_knot: dict[str, list[str]] = {}
    for knot, rkey in keys:
        by_knot.setdefault(knot, []).append(rkey)
    # One query per knot (nearly always one): ``knot = ? AND rkey IN (…)`` is
    # answered from the (knot, rkey, name) index; a row-value IN is not.
    for knot, rkeys in by_knot.items():
        for rkey, name, status, error, started, finished in database.execute_sql(
            "SELECT rkey, name, status, error, started_at, finished_at FROM workflow "
            f"WHERE knot = ? AND rkey IN ({_marks(rkeys)}) ORDER BY id",
            [knot, *rkeys],
        ):
            view = _workflow_view(name, status, error, started, finished)
            workflows[(knot, rkey)].append(view)
    return [_pipeline_view(row, workflows[(row[1], row[2])]) for row in rows]


def _workflow_view(
    name: str, status: str, error: str | None, started: int | None, finished: int | None
) -> dict[str, Any]:
    shown = PENDING if status == NEW else status
    view: dict[str, Any] = {"id": name, "name": name, "status": shown}
    if started:
        view["startedAt"] = rfc3339_seconds(started)
    if finished:
        view["finishedAt"] = rfc3339_seconds(finished)
    if error:
        view["error"] = error
    return view


def _pipeline_view(row: tuple, workflows: list[dict]) -> PipelineView:
    seq, knot, rkey, record_text, accepted_at, repo_did, sha = row
    record = json.loads(record_text)
    view = {
        "id": rkey,
        "repo": repo_did,
        "trigger": ci_trigger(record),
        "commit": sha or "",
        "createdAt": rfc3339_seconds(accepted_at),
        "workflows": workflows,
    }
    source = record["triggerMetadata"].get("sourceRepo")
    if source:
        view["sourceRepo"] = source
    return PipelineView(seq, knot, view)
