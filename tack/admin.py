"""``tack <command>``: what an operator does beside a running tack.

The commands need only the database: ``--db``, else SPINDLE_SERVER_DB_PATH
as the service reads it. The running tack records where it keeps workflow
logs in the database (SPINDLE_SERVER_LOG_DIR, when set, wins). They do not
take the service's lock and may run while it does.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import config, retention, store
from .startup import StartupError
from .statuses import FINAL
from .store import (
    CancelRequest,
    Collaborator,
    Cursor,
    KnotCollaborator,
    Member,
    Pipeline,
    Repo,
    StatusEvent,
    Workflow,
)
from .worklogs import LogBook


@dataclass(frozen=True)
class Paths:
    """Where the running tack keeps its state, as a command found it."""

    db_path: str
    log_dir: str


def connect(db_path: str | None) -> Paths:
    """Open tack's database (``--db``, else SPINDLE_SERVER_DB_PATH), never
    creating one by mistake; and find its workflow logs."""
    db_path = db_path or config.read_setting("SPINDLE_SERVER_DB_PATH")
    if not Path(db_path).is_file():
        where = os.path.abspath(db_path)
        raise StartupError("SPINDLE_SERVER_DB_PATH", f"no database at {where}")
    store.open_database(db_path)
    log_dir = os.environ.get("SPINDLE_SERVER_LOG_DIR") or store.remembered_setting("log_dir")
    return Paths(db_path, log_dir or config.read_setting("SPINDLE_SERVER_LOG_DIR"))


def prune(paths: Paths, days: float | None, as_json: bool) -> int:
    if days is None:
        days = config.read_setting("TACK_RETENTION_DAYS")
    done = retention.prune(LogBook(paths.log_dir), days)
    if as_json:
        print(json.dumps(vars(done) | {"retention_days": days}))
    elif days <= 0:
        print("retention is off (0 days): nothing pruned")
    else:
        print(
            f"pruned {done.workflows} workflows finished more than {days:g} days ago:"
            f" {done.log_files} log files and {done.status_events} status events deleted"
        )
    return 0


# --- looking at what tack holds ------------------------------------------------------


def _print(rows: list[dict], columns: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, default=str))
        return
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


def _age(ns: int | None) -> str:
    if not ns:
        return ""
    seconds = max(time.time() - ns / 1e9, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def workflows(status: str | None, repo: str | None, days: float | None, as_json: bool) -> int:
    query = (
        Workflow.select(Workflow, Pipeline.repo_owner, Pipeline.repo_name, Pipeline.repo_did)
        .join(
            Pipeline,
            on=(Pipeline.knot == Workflow.knot) & (Pipeline.rkey == Workflow.rkey),
            attr="pipeline",
        )
        .order_by(Workflow.id.desc())
        .limit(200)
    )
    if status:
        query = query.where(Workflow.status == status)
    if repo:
        query = query.where(
            (Pipeline.repo_name == repo)
            | (Pipeline.repo_did == repo)
            | (Pipeline.repo_owner == repo)
        )
    if days is not None:
        query = query.where(Workflow.created_at >= time.time_ns() - int(days * 86400e9))
    rows = [
        {
            "id": w.id,
            "status": w.status,
            "repo": f"{w.pipeline.repo_owner}/{w.pipeline.repo_name}",
            "workflow": w.name,
            "engine": w.engine,
            "pipeline": f"{w.knot}/{w.rkey}",
            "age": _age(w.created_at),
        }
        for w in query
    ]
    _print(rows, ["id", "status", "repo", "workflow", "engine", "pipeline", "age"], as_json)
    return 0


def show(paths: Paths, workflow_id: int, lines: int, as_json: bool) -> int:
    workflow = Workflow.get_or_none(Workflow.id == workflow_id)
    if workflow is None:
        print(f"tack: no workflow {workflow_id}", file=sys.stderr)
        return 1
    statuses = [
        {"status": e.status, "at": e.created}
        for e in StatusEvent.select()
        .where(StatusEvent.workflow_id == workflow_id)
        .order_by(StatusEvent.id)
    ]
    path = LogBook(paths.log_dir).path(workflow_id)
    tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
    contents = [json.loads(line).get("content", "") for line in tail]
    detail = {
        "id": workflow.id,
        "workflow": workflow.name,
        "engine": workflow.engine,
        "pipeline": f"{workflow.knot}/{workflow.rkey}",
        "status": workflow.status,
        "error": workflow.error,
        "exit_code": workflow.exit_code,
        "statuses": statuses,
        "backend_state": {k: v for k, v in workflow.state.items() if "token" not in k},
        "log_tail": contents,
    }
    if as_json:
        print(json.dumps(detail, default=str))
        return 0
    for key in ("id", "workflow", "engine", "pipeline", "status", "error", "exit_code"):
        print(f"{key}: {detail[key] if detail[key] is not None else ''}")
    print("statuses: " + ", ".join(s["status"] for s in statuses))
    print(f"backend state: {json.dumps(detail['backend_state'])}")
    print(f"log (last {lines} lines):")
    for content in contents:
        print(f"  {content}")
    return 0


def cancel(workflow_id: int, wait: float, as_json: bool) -> int:
    """Ask the running tack to cancel a workflow, and wait until it has."""
    workflow = Workflow.get_or_none(Workflow.id == workflow_id)
    if workflow is None:
        print(f"tack: no workflow {workflow_id}", file=sys.stderr)
        return 1
    if workflow.status in FINAL:
        result = "already final"
    else:
        CancelRequest.insert(
            workflow_id=workflow_id, requested_at=time.time_ns()
        ).on_conflict_replace().execute()
        deadline = time.monotonic() + wait
        result = "requested (is tack running?)"
        while time.monotonic() < deadline:
            if Workflow.get_by_id(workflow_id).status in FINAL:
                result = Workflow.get_by_id(workflow_id).status
                break
            time.sleep(0.2)
    if as_json:
        print(json.dumps({"id": workflow_id, "result": result}))
    else:
        print(f"workflow {workflow_id}: {result}")
    return 0 if result in ("cancelled", "already final") else 1


def repos(as_json: bool) -> int:
    rows = [
        {"owner": r.did, "name": r.name, "repo_did": r.repo_did or "", "knot": r.knot}
        for r in Repo.select().order_by(Repo.did, Repo.name)
    ]
    _print(rows, ["owner", "name", "repo_did", "knot"], as_json)
    return 0


def members(as_json: bool) -> int:
    rows = [
        {"inviter": m.did, "member": m.subject, "instance": m.instance, "since": m.created_at}
        for m in Member.select().order_by(Member.created_at)
    ]
    _print(rows, ["inviter", "member", "instance", "since"], as_json)
    return 0


def collaborators(as_json: bool) -> int:
    rows = [
        {"owner": c.did, "collaborator": c.subject, "repo": c.repo_did or c.repo or ""}
        for c in Collaborator.select().order_by(Collaborator.did)
    ]
    rows += [
        {"owner": f"knot {k.knot}", "collaborator": k.subject, "repo": k.repo_did}
        for k in KnotCollaborator.select()
    ]
    _print(rows, ["owner", "collaborator", "repo"], as_json)
    return 0


def knots(as_json: bool) -> int:
    cursors = {
        c.name.removeprefix("knot:"): c.value for c in Cursor.select() if c.name.startswith("knot:")
    }
    served = {}
    for repo in Repo.select(Repo.knot):
        served[repo.knot] = served.get(repo.knot, 0) + 1
    rows = [
        {
            "knot": knot,
            "repos": served.get(knot, 0),
            "cursor_age": _age(cursors.get(knot)),
            "followed": "yes" if knot in cursors else "not yet",
        }
        for knot in sorted(set(served) | set(cursors))
    ]
    _print(rows, ["knot", "repos", "followed", "cursor_age"], as_json)
    return 0


def backup(paths: Paths, target: str, as_json: bool) -> int:
    """A consistent copy through SQLite's online backup: safe while tack
    writes (a plain copy of a live WAL database can lack its tables)."""
    db_path = paths.db_path
    if Path(target).exists():
        print(f"tack: {target} exists; choose a new file", file=sys.stderr)
        return 2
    source = sqlite3.connect(db_path, timeout=30)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)  # all pages in one read transaction: one snapshot
    finally:
        copy.close()
        source.close()
    size = Path(target).stat().st_size
    if as_json:
        print(json.dumps({"backup": str(Path(target).resolve()), "bytes": size}))
    else:
        print(f"backed up {db_path} to {target} ({size:,} bytes); keep the secrets key with it")
    return 0
