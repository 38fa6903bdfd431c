"""Accepting a pipeline: the one transaction every intake path ends in.

Ref updates, older knots' compiled pipelines, pull requests and
``triggerPipeline`` all hand over a ``NewPipeline``. Acceptance writes, in one
transaction: the dedupe marks (the knot event, the push), the pipeline row
with its id, its workflow rows, the pipeline's announcement on ``/events``
(for pipelines tack compiled) and each workflow's first status. A knot that
replays, or a tack that restarts between accepting and saving a cursor, finds
the marks and nothing runs twice (invariant 3). A workflow that cannot run
(a file that did not parse, an engine with no backend) is failed here, with
its reason in its log, and its siblings still run.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import logs, pipelines, retry
from ..backends import Backends
from ..statuses import NEW, PENDING, StatusLog
from ..store import (
    KnotEvent,
    Pipeline,
    PullTrigger,
    Repo,
    Workflow,
    compile_once,
    insert_row,
)
from ..workflow import WorkflowError
from ..worklogs import LogBook
from .compiler import CompiledWorkflow, Trigger, compile_workflows
from .fetch import WorkflowFetcher

log = logs.get("intake")

# A push seen again within this window (another frame for the same push) is
# the same push; outside it, the same old→new move is a new push.
PUSH_DEDUPE_NS = 3600 * 1_000_000_000


@dataclass
class NewPipeline:
    knot: str
    repo: Repo
    record: dict  # the sh.tangled.pipeline record, workflows included
    workflows: list[CompiledWorkflow]
    rkey: str | None = None  # the knot's rkey (older knots); None: tack mints a TID
    knot_event: tuple[str, str] | None = None  # (knot, rkey) this came from, if any
    # The push this came from, as "<frame kind>|<push>": a pipeline whose key
    # names the same push from the other kind of frame makes this a duplicate.
    push_key: str | None = None
    pull_trigger_id: int | None = None  # the queued pull request event it consumes
    ids: dict = field(default_factory=dict)

    @property
    def repo_did(self) -> str:
        return self.repo.repo_did or self.repo.did


PUSH_SOURCES = ("refUpdate", "pipeline")

# Built once: building a query costs more than running it, on the path from a
# knot frame to its ``pending`` status. Placeholders: knot, rkey, limit; and
# push key, accepted after, limit.
_PIPELINE_EXISTS = compile_once(
    lambda: (
        Pipeline.select(Pipeline.rkey)
        .where((Pipeline.knot == "k") & (Pipeline.rkey == "r"))
        .limit(1)
    )
)
_RECENT_PUSH = compile_once(
    lambda: (
        Pipeline.select(Pipeline.rkey)
        .where((Pipeline.push_key == "p") & (Pipeline.accepted_at > 0))
        .limit(1)
    )
)


def push_key(source: str, knot: str, repo_path: str, push: dict) -> str:
    """Names one push as one kind of frame (``PUSH_SOURCES``) announced it."""
    return f"{source}|{knot}|{repo_path}|{push['ref']}|{push['oldSha']}|{push['newSha']}"


class Acceptor:
    def __init__(
        self,
        statuses: StatusLog,
        logbook: LogBook,
        backends: Backends,
        on_accepted: Callable[[Pipeline, dict, int], None],
        stop: threading.Event,
    ) -> None:
        """``on_accepted(pipeline, record, queued)`` follows each pipeline
        accepted, ``queued`` of its workflows pending."""
        self._statuses = statuses
        self._logbook = logbook
        self._backends = backends
        self._on_accepted = on_accepted
        self._stop = stop

    def seen(self, knot: str, rkey: str) -> bool:
        """This knot event was taken in before (a replay)."""
        event = (KnotEvent.knot == knot) & (KnotEvent.rkey == rkey)
        return KnotEvent.select().where(event).exists()

    def mark_seen(self, knot: str, rkey: str) -> None:
        """Remember a knot event that made no pipeline (nothing to run), so a
        replay does not fetch its workflows again."""
        retry.store_writes(self._stop, log, "store busy, retrying")(
            lambda: KnotEvent.insert(knot=knot, rkey=rkey).on_conflict_ignore().execute()
        )

    def accept(self, new: NewPipeline) -> str | None:
        """Accept ``new``; its pipeline rkey, or None when it was accepted before.

        ``on_accepted`` is handed the stored pipeline with ``new.record``,
        which nothing may change from here on: the workers share it.
        """
        writing = retry.store_writes(self._stop, log, "store busy, retrying intake")
        accepted = writing(self._write, new)
        if accepted is None:
            log.info("pipeline already accepted, replay ignored", extra=new.ids)
            return None
        pipeline, queued = accepted
        rkey = pipeline.rkey
        log.info(
            "pipeline accepted",
            extra={
                **new.ids,
                "pipeline": rkey,
                "did": new.repo.did,
                "repo_did": new.repo_did,
                "kind": new.record["triggerMetadata"]["kind"],
                "workflows": [w.name for w in new.workflows],
            },
        )
        self._on_accepted(pipeline, new.record, queued)
        return rkey

    def _write(self, new: NewPipeline) -> tuple[Pipeline, int] | None:
        """The pipeline row ``new`` makes, written with its workflows and
        their first statuses, and how many of them wait for a worker; None
        when it was accepted before."""
        now = time.time_ns()
        # Worked out before the lock that every status write waits for.
        record_text = json.dumps(new.record)
        errors = [self._error_of(compiled) for compiled in new.workflows]
        with self._statuses.writing() as statuses:
            if self._duplicate(new, now):
                return None
            if new.rkey is None:
                created, rkey = statuses.mint()
            else:
                created, rkey = now, new.rkey
            values = {
                "knot": new.knot,
                "rkey": rkey,
                "repo_owner": new.repo.did,
                "repo_name": new.repo.name or new.repo.rkey,
                "record": record_text,
                "accepted_at": created,
                "repo_did": new.repo_did,
                "kind": new.record["triggerMetadata"]["kind"],
                "sha": pipelines.commit_sha(new.record),
                "push_key": new.push_key,
            }
            insert_row(Pipeline, values)
            rows = [
                self._workflow_row(new.knot, rkey, compiled, now, error)
                for compiled, error in zip(new.workflows, errors, strict=True)
            ]
            if new.rkey is None:
                statuses.append_pipeline(created, rkey, rows[0].id, new.record)
            queued = sum(
                self._announce(statuses, row, compiled, error)
                for row, compiled, error in zip(rows, new.workflows, errors, strict=True)
            )
        return Pipeline(**values), queued  # built after the commit, outside the status lock

    def _duplicate(self, new: NewPipeline, now: int) -> bool:
        """Marks this pipeline's sources as used; True if one already was."""
        if new.pull_trigger_id is not None:
            taken = PullTrigger.delete().where(PullTrigger.id == new.pull_trigger_id).execute()
            if not taken:
                return True
        if new.knot_event is not None:
            knot, rkey = new.knot_event
            # An older knot's pipeline keeps the knot's own key: its row is
            # the event's mark, and a second one would only cost the write.
            own_mark = new.knot_event != (new.knot, new.rkey)
            if own_mark and not insert_row(KnotEvent, {"knot": knot, "rkey": rkey}, ignore=True):
                return True
            if self.seen_pipeline(knot, rkey):
                return True
        if new.push_key is not None:
            # Knots of early 2026 announce a push twice, as a ref update and as
            # a compiled pipeline: whichever comes second finds the first.
            source, _, push = new.push_key.partition("|")
            (twin,) = (f"{other}|{push}" for other in PUSH_SOURCES if other != source)
            recent = (twin, now - PUSH_DEDUPE_NS, 1)
            if Pipeline._meta.database.execute_sql(_RECENT_PUSH(), recent).fetchone():
                log.info("push already has a pipeline, frame ignored", extra=new.ids)
                return True
        return False

    @staticmethod
    def seen_pipeline(knot: str, rkey: str) -> bool:
        params = (knot, rkey, 1)
        return (
            Pipeline._meta.database.execute_sql(_PIPELINE_EXISTS(), params).fetchone() is not None
        )

    @staticmethod
    def _workflow_row(
        knot: str, rkey: str, compiled: CompiledWorkflow, now: int, error: str | None
    ) -> Workflow:
        """The workflow's row: written pending when it can run (its event
        follows in ``_announce``), else NEW until ``failed`` is appended."""
        values = {
            "knot": knot,
            "rkey": rkey,
            "name": compiled.name,
            "engine": compiled.engine,
            "status": NEW if error is not None else PENDING,
            "created_at": now,
            "updated_at": now,
        }
        return Workflow(id=insert_row(Workflow, values), **values)

    def _error_of(self, compiled: CompiledWorkflow) -> str | None:
        """Why a compiled workflow cannot run here (its file, or no backend
        for its engine); None when it can."""
        if compiled.error is not None:
            return compiled.error
        try:
            self._backends.route(compiled.engine, compiled.raw)
        except WorkflowError as exc:
            return str(exc)
        return None

    def _announce(
        self, statuses: StatusLog, row: Workflow, compiled: CompiledWorkflow, error: str | None
    ) -> int:
        """``pending`` for a workflow that can run; else ``failed`` with
        ``error``, written to its log first. 1 when it is pending, else 0."""
        if error is None:
            statuses.announce_queued(row)
            return 1
        # Written before the status commits, so a log reader that sees the
        # final status has already been able to read this line.
        workflow_log = self._logbook.open(row.id, fresh=True)
        try:
            workflow_log.error(error, "workflow file" if compiled.error else "error")
        finally:
            workflow_log.close()
        statuses.append(row, "failed", error=error)
        return 0


def compile_pipeline(
    fetcher: WorkflowFetcher,
    repo: Repo,
    trigger: Trigger,
    files: dict[str, str],
    only: set[str] | None = None,
    **marks: Any,
) -> NewPipeline | None:
    """The pipeline ``trigger`` makes of a repo's workflow files (limited to
    the names in ``only``, when given); None when no workflow runs.

    Every intake path that reads workflows itself (pushes, pull requests,
    ``triggerPipeline``) ends here; ``marks`` are the NewPipeline's dedupe
    fields and log ids.
    """
    workflows = compile_workflows(files, trigger)
    if only is not None:
        workflows = [w for w in workflows if w.name in only]
    if not workflows:
        return None
    default_branch = fetcher.default_branch(repo.knot, repo.repo_did) if repo.repo_did else ""
    record = pipeline_record(repo.knot, repo, trigger.kind, trigger.data, default_branch, workflows)
    return NewPipeline(knot=repo.knot, repo=repo, record=record, workflows=workflows, **marks)


def pipeline_record(
    knot: str,
    repo: Repo,
    kind: str,
    data: dict,
    default_branch: str,
    workflows: list[CompiledWorkflow],
) -> dict:
    """The ``sh.tangled.pipeline`` record tack compiles, as the official spindle
    does (protocol-2026 §5.3 step 6)."""
    trigger_repo = {"knot": knot, "did": repo.did, "repo": repo.name or repo.rkey}
    if repo.repo_did:
        trigger_repo["repoDid"] = repo.repo_did
    trigger_repo["defaultBranch"] = default_branch
    return {
        "triggerMetadata": {
            "kind": kind,
            "repo": trigger_repo,
            pipelines.TRIGGER_KEYS[kind]: data,
        },
        "workflows": [w.entry() for w in workflows],
    }
