"""Intake: decide whether a pipeline from a knot runs here, and accept it once.

Acceptance is one transaction: the pipeline row (the dedupe mark on
(knot, rkey)), its workflow rows and each workflow's first status event. A
knot that replays, or a tack that restarts between accepting and saving the
knot cursor, finds the mark and the pipeline is not run again (invariant 3).
Rejections write nothing and send no status: only a log line says why.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import peewee

from . import logs, pipelines, retry, tid
from .backends import Backends
from .pipelines import PipelineRecord, Rejected
from .records import is_rkey
from .statuses import NEW, PENDING, StatusLog
from .store import Directory, Pipeline, Repo, Workflow
from .worklogs import LogBook

log = logs.get("intake")

MAX_FRAME_BYTES = 2 * 1024 * 1024


class Intake:
    def __init__(
        self,
        db: peewee.Database,
        directory: Directory,
        statuses: StatusLog,
        logbook: LogBook,
        backends: Backends,
        on_accepted: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        self._db = db
        self._directory = directory
        self._statuses = statuses
        self._logbook = logbook
        self._backends = backends
        self._on_accepted = on_accepted
        self._stop = stop

    def handle(self, knot: str, frame: str | bytes) -> int | None:
        """Process one knot frame; the knot-clock time (µs) it carries, if any.

        The return value feeds the knot's cursor: only what was processed
        (accepted, rejected or ignored) moves it.
        """
        event = _decode_frame(frame)
        if event is None:
            log.warning(
                "knot frame skipped: not a {rkey, nsid, event} object",
                extra={"knot": knot, "size": len(frame)},
            )
            return None
        rkey, nsid, record = event
        knot_time = tid.micros(rkey)
        if nsid != pipelines.NSID:
            return knot_time
        ids = {"knot": knot, "rkey": rkey}
        try:
            pipeline = pipelines.validate(record)
            repo = self._authorize(knot, pipeline)
        except Rejected as exc:
            log.warning("pipeline rejected", extra={**ids, "reason": str(exc)})
            return knot_time
        accepted = retry.store_writes(self._stop, log, "store busy, retrying intake")(
            self._accept, knot, rkey, pipeline, repo
        )
        if accepted:
            log.info(
                "pipeline accepted",
                extra={
                    **ids,
                    "did": repo.did,
                    "repo": repo.name,
                    "workflows": [w["name"] for w in pipeline.workflows],
                },
            )
            self._on_accepted()
        else:
            log.info("pipeline already accepted, replay ignored", extra=ids)
        return knot_time

    def _authorize(self, knot: str, pipeline: PipelineRecord) -> Repo:
        if pipeline.knot != knot:
            raise Rejected(f"names knot {pipeline.knot!r} but came from {knot!r}")
        repo = None
        if pipeline.repo_did:
            repo = self._directory.repo_by_did(pipeline.repo_did)
        if repo is None and pipeline.repo_name:
            repo = self._directory.repo_by_name(pipeline.owner, pipeline.repo_name)
        if repo is None:
            raise Rejected("no repo record naming this spindle matches the pipeline's repo")
        if repo.did != pipeline.owner:
            raise Rejected("the repo record belongs to another owner")
        if repo.knot != knot:
            raise Rejected(f"the repo lives on knot {repo.knot!r}, not {knot!r}")
        if not self._directory.is_member(repo.did):
            raise Rejected("the repo owner is not the spindle owner or a member")
        return repo

    def _accept(self, knot: str, rkey: str, pipeline: PipelineRecord, repo: Repo) -> bool:
        now = time.time_ns()
        with self._statuses.writing() as statuses:
            if Pipeline.get_or_none((Pipeline.knot == knot) & (Pipeline.rkey == rkey)):
                return False
            Pipeline.insert(
                knot=knot,
                rkey=rkey,
                repo_owner=repo.did,
                repo_name=repo.name,
                record=json.dumps(pipeline.record),
                accepted_at=now,
            ).execute()
            for entry in pipeline.workflows:
                workflow = Workflow.create(
                    knot=knot,
                    rkey=rkey,
                    name=entry["name"],
                    engine=entry["engine"],
                    status=NEW,
                    created_at=now,
                    updated_at=now,
                )
                if self._backends.resolve(entry["engine"]) is None:
                    self._fail_unknown_engine(statuses, workflow)
                else:
                    statuses.append(workflow, PENDING)
        return True

    def _fail_unknown_engine(self, statuses: StatusLog, workflow: Workflow) -> None:
        error = f'unknown engine "{workflow.engine}"'
        # Written before the status commits, so a /logs follower that sees the
        # final status has already been able to read this line.
        workflow_log = self._logbook.open(workflow.id, fresh=True)
        workflow_log.error(error)
        workflow_log.close()
        statuses.append(workflow, "failed", error=error)


def _decode_frame(frame: str | bytes) -> tuple[str, str, object] | None:
    if len(frame) > MAX_FRAME_BYTES:
        return None
    try:
        event = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict):
        return None
    rkey, nsid = event.get("rkey"), event.get("nsid")
    if not is_rkey(rkey) or not isinstance(nsid, str) or len(nsid) > 317:
        return None
    return rkey, nsid, event.get("event")
