"""The scheduler: a bounded pool of workers running queued workflows.

The queue is the store (workflows whose status is ``pending``), so the
backlog survives restarts and nothing is held only in memory. Claiming a
workflow and announcing ``running`` is one transaction, under the status log's
lock, so two workers never take the same one.

Every accepted workflow ends (invariant 4): a run ends in exactly one final
status; a workflow a dead process left ``running`` is resumed by its backend
when the backend can, else finished as failed with ``RESTART_ERROR``. On
shutdown running workflows are told to stop but keep their ``running``
status, which the next start resolves the same way.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import peewee

from . import logs, pipelines, retry
from .backends import DIALECT_ENGINE, Backend, Backends, CancelFlag, Job, Outcome, process
from .statuses import FINAL, RUNNING, StatusLog
from .store import (
    CancelRequest,
    Pipeline,
    Workflow,
    is_transient,
    merge_backend_state,
    next_pending_workflow,
    pipeline_by_key,
    release_connection,
)
from .workflow import WorkflowError, parse
from .worklogs import LOG_CHECKPOINT, LogBook

log = logs.get("scheduler")

RESTART_ERROR = "tack restarted while this workflow ran"
CANCEL_POLL_SECONDS = 1.0
PARK_SECONDS = 1.0  # an idle worker looks at the queue at least this often
SecretsFor = Callable[[Pipeline], dict[str, str]]
# Pipelines whose decoded record the workers keep: a pipeline's workflows run
# close together, and each re-read and re-decoded the whole record (every
# workflow's file) only to take its own entry.
PIPELINES_KEPT = 64


class PipelineRecords:
    """Stored pipelines and their decoded records, the most recent kept.

    A pipeline row and its record never change once accepted, so what is
    kept cannot go stale. The record is shared by every job of the pipeline:
    backends read it and never change it (``Job.pipeline``). Intake hands
    over each pipeline it accepts (``keep``), so its first workflow does not
    read back and decode what intake has just written.
    """

    def __init__(self, size: int = PIPELINES_KEPT) -> None:
        self._size = size
        self._kept: OrderedDict[tuple[str, str], tuple[Pipeline, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, knot: str, rkey: str) -> tuple[Pipeline, dict]:
        """The pipeline (knot, rkey) and its record; LookupError when not stored."""
        key = (knot, rkey)
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
                return kept
        pipeline = pipeline_by_key(knot, rkey)
        if pipeline is None:
            raise LookupError(f"pipeline {knot}/{rkey} is not stored")
        kept = (pipeline, json.loads(pipeline.record))
        self.keep(pipeline, kept[1])
        return kept

    def keep(self, pipeline: Pipeline, record: dict) -> None:
        """Keep a pipeline and its decoded record (the one stored, as a dict)."""
        with self._lock:
            self._kept[(pipeline.knot, pipeline.rkey)] = (pipeline, record)
            if len(self._kept) > self._size:
                self._kept.popitem(last=False)


class Scheduler:
    def __init__(
        self,
        db: peewee.Database,
        statuses: StatusLog,
        logbook: LogBook,
        backends: Backends,
        *,
        workers: int,
        dev: bool,
        stop: threading.Event,
        secrets_for: SecretsFor = lambda pipeline: {},
        on_finished: Callable[[Workflow, str, float, str | None], None] = (
            lambda workflow, status, seconds, backend: None
        ),
    ) -> None:
        """``on_finished(workflow, status, seconds, backend)`` follows each
        final status a worker writes (seconds since the worker took it; the
        name of the backend it ran on, None when it had none)."""
        self._on_finished = on_finished
        self._db = db
        self._statuses = statuses
        self._logbook = logbook
        self._backends = backends
        self._workers = workers
        self._dev = dev
        self._stop = stop
        self._secrets_for = secrets_for
        self._pipelines = PipelineRecords()
        self._work = threading.Condition()
        self._resumable: deque[int] = deque()
        # Under self._work: wake-ups no parked worker was there to take (at
        # most one a worker), so a worker on its way to park looks first.
        self._calls = 0
        self._cancels: dict[int, CancelFlag] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()  # tack is shutting down (not a user cancel)

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self._recover()
        threading.Thread(
            target=self._carry_out_cancel_requests, name="cancel-requests", daemon=True
        ).start()
        for index in range(self._workers):
            thread = threading.Thread(target=self._worker, name=f"worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def accepted(self, pipeline: Pipeline, record: dict, queued: int) -> None:
        """Intake accepted ``pipeline`` (its decoded ``record``), ``queued`` of
        its workflows left pending: keep it for the workers and wake them."""
        self._pipelines.keep(pipeline, record)
        if queued:
            self.wake(queued)

    def wake(self, count: int = 1) -> None:
        """``count`` workflows were queued: wake that many idle workers, not
        all of them (200 workers racing for one workflow cost ~100x)."""
        with self._work:
            self._calls = min(self._calls + count, self._workers)
            self._work.notify(count)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        for cancel in list(self._cancels.values()):
            cancel.set()
        with self._work:
            self._work.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _recover(self) -> None:
        for backend in self._backends.instances.values():
            for action in backend.remove_strays():
                log.info(
                    "leftover of a previous run removed",
                    extra={"backend": backend.name, "action": action},
                )
        for workflow in Workflow.select().where(Workflow.status == RUNNING):
            backend = self._backend_of(workflow)
            if backend is not None and type(backend).resume is not Backend.resume:
                self._cut_to_checkpoint(workflow)
                log.info("resuming workflow", extra=_ids(workflow))
                self._resumable.append(workflow.id)
                continue
            # What the dead process's run left (its steps, its workspace) goes
            # before the workflow is reported, so nothing writes after `failed`.
            ender = backend.end_leftovers if backend is not None else process.end_leftovers
            for action in ender(workflow.state):
                log.info(
                    "leftover of a previous run ended", extra=_ids(workflow) | {"action": action}
                )
            workflow_log = self._logbook.open(workflow.id)
            workflow_log.error(RESTART_ERROR)
            workflow_log.close()
            self._finish(workflow, Outcome("failed", RESTART_ERROR))

    def _cut_to_checkpoint(self, workflow: Workflow) -> None:
        """Lines written after the backend last saved its state were not
        accounted for in it, and the resumed backend writes them again: cut
        them first. This runs before the server starts, so no /logs reader
        has read past the cut."""
        size = workflow.state.get(LOG_CHECKPOINT)
        if isinstance(size, int):
            removed = self._logbook.cut(workflow.id, size)
            if removed:
                log.info("log cut back to checkpoint", extra=_ids(workflow) | {"bytes": removed})

    # --- cancelling -------------------------------------------------------------------

    def cancel(self, workflow_id: int) -> str:
        """Cancel a workflow: ``cancelled``, ``already final`` or ``unknown``.

        The status is final at once; a running backend is told through its
        job's cancel event and whatever it reports later is ignored.
        """

        def attempt() -> str:
            with self._statuses.writing() as statuses:
                workflow = Workflow.get_or_none(Workflow.id == workflow_id)
                if workflow is None:
                    return "unknown"
                if workflow.status in FINAL:
                    return "already final"
                statuses.append(workflow, "cancelled")
            event = self._cancels.get(workflow_id)
            if event is not None:
                event.set()
            return "cancelled"

        return self._with_retry(attempt)

    def _carry_out_cancel_requests(self) -> None:
        """Cancels other processes asked for (``tack cancel``), once a second."""
        while not self._stop.wait(CANCEL_POLL_SECONDS):
            try:
                for request in list(CancelRequest.select()):
                    result = self.cancel(request.workflow_id)
                    CancelRequest.delete_by_id(request.workflow_id)
                    log.info(
                        "cancel requested by tack cancel",
                        extra={"workflow_id": request.workflow_id, "result": result},
                    )
            except Exception:
                if not self._stop.is_set():
                    log.exception("cancel requests not read; trying again")
            finally:
                release_connection()

    def figures(self) -> tuple[int, int]:
        """(workflows running in this process, workers) for /healthz and /metrics."""
        return len(self._cancels), self._workers

    # --- workers ------------------------------------------------------------------------

    def _worker(self) -> None:
        claimed: tuple[Workflow, bool] | None = None
        look = True  # whether to look for pending work before parking
        while not self._stop.is_set():
            try:
                if claimed is None and look:
                    claimed = self._claim()
                if claimed is None:
                    # Every queued workflow comes with a wake-up; the look
                    # once a second is a safety net, so it only reads.
                    look = self._park() or self._pending_seen()
                    continue
                # The transaction that ends a workflow also claims the next
                # one: one status transaction per workflow instead of two.
                # When it found none, the worker parks without looking again:
                # whatever is queued after it comes with a wake-up (_calls).
                claimed, looked = self._execute(*claimed)
                look = not looked
            except Exception:
                # The workflow, if any, stays running and is resolved on the
                # next start; the worker itself carries on.
                claimed, look = None, True
                log.exception("worker failed")
                self._stop.wait(1.0)

    def _park(self) -> bool:
        """Wait to be woken for work: True when a wake-up was owed or came,
        False when a second passed without one."""
        with self._work:
            if not self._calls:
                self._work.wait(PARK_SECONDS)
            if self._calls:  # woken to look: that wake-up is taken
                self._calls -= 1
                return True
            return False

    def _pending_seen(self) -> bool:
        """A plain read, outside the status lock: is anything queued? With
        200 workers each looking once a second, a claim transaction per look
        kept the status lock busy for nothing."""
        return not self._stop.is_set() and next_pending_workflow() is not None

    def _claim(self) -> tuple[Workflow, bool] | None:
        if self._resumable:
            try:
                workflow = Workflow.get_by_id(self._resumable.popleft())
            except IndexError:
                return None
            cancel = CancelFlag()
            if workflow.status in FINAL:
                # Cancelled while it waited to be resumed: the backend is
                # still handed the job, already cancelled, so it can stop
                # the remote run; what it reports is ignored (final is final).
                cancel.set()
            self._cancels[workflow.id] = cancel
            return workflow, True

        flag = CancelFlag()  # made before the lock that every status write waits for

        def attempt() -> Workflow | None:
            with self._statuses.writing() as statuses:
                return self._claim_next(statuses, flag)

        return self._claimed(self._with_retry(attempt))

    def _claim_next(self, statuses: StatusLog, flag: CancelFlag) -> Workflow | None:
        """Inside a status transaction: the oldest pending workflow, now running.

        Its cancel flag (``flag``, made beforehand) is registered under the
        status lock, before the commit: a cancel (which takes that lock) can
        then never fall between the commit and the flag and leave the run
        untold."""
        workflow = next_pending_workflow()
        if workflow is not None:
            statuses.append(workflow, RUNNING)
            self._cancels[workflow.id] = flag
        return workflow

    @staticmethod
    def _claimed(workflow: Workflow | None) -> tuple[Workflow, bool] | None:
        return None if workflow is None else (workflow, False)

    def _execute(
        self, workflow: Workflow, resume: bool
    ) -> tuple[tuple[Workflow, bool] | None, bool]:
        """Run a claimed workflow and write its final status, whatever happens
        on the way (invariant 4): only a transient store error, retried in
        place, or our own shutdown keeps it from ending now. Returns the next
        workflow, claimed in the same transaction, when there was one, and
        whether that transaction looked for one."""
        cancel = self._cancels[workflow.id]
        started = time.monotonic()
        backend: str | None = None
        try:
            outcome, backend = self._outcome(workflow, cancel, resume)
        except Exception as exc:
            if self._stop.is_set() and is_transient(exc):
                self._cancels.pop(workflow.id, None)
                return None, False  # left running: the next start resumes or ends it
            log.exception("workflow could not be run", extra=_ids(workflow))
            outcome = Outcome("failed", f"tack could not run this workflow: {_describe(exc)}")
        try:
            # A run stopped by our own shutdown is not the user's cancel: it
            # stays running and the next start resumes or fails it.
            if self._stopping.is_set() and outcome.status == "cancelled":
                return None, False
            status, following, looked = self._finish(workflow, outcome)
            claimed = self._claimed(following)  # committed: it must reach this worker
            try:
                self._on_finished(workflow, status, time.monotonic() - started, backend)
            except Exception:
                log.exception("after a workflow ended", extra=_ids(workflow))
            return claimed, looked
        finally:
            self._cancels.pop(workflow.id, None)

    def _outcome(
        self, workflow: Workflow, cancel: threading.Event, resume: bool
    ) -> tuple[Outcome, str | None]:
        """How the workflow ended, and the name of the backend it ran on
        (None when it had none)."""
        pipeline, record = self._with_retry(
            lambda: self._pipelines.get(workflow.knot, workflow.rkey)
        )
        secrets = self._with_retry(lambda: self._secrets_for(pipeline))
        workflow_log = self._logbook.open(workflow.id, secrets.values())
        try:
            try:
                backend = self._route(workflow, record)
            except WorkflowError as exc:
                workflow_log.error(str(exc))
                return Outcome("failed", str(exc)), None
            outcome = self._run(
                workflow, pipeline, record, backend, secrets, cancel, workflow_log, resume
            )
            return outcome, backend.name
        finally:
            workflow_log.close()

    def _route(self, workflow: Workflow, record: dict | None) -> Backend:
        """The backend of a workflow of ``record`` (the original tack's
        dialect needs its file); WorkflowError saying why there is none."""
        raw = None if record is None else _raw_of(record, workflow.name)
        return self._backends.route(workflow.engine, raw)

    def _backend_of(self, workflow: Workflow) -> Backend | None:
        """At start: the backend a stored workflow runs on, None when it has none now."""
        record = None
        if workflow.engine == DIALECT_ENGINE:  # only then is the file needed
            with contextlib.suppress(LookupError):
                record = self._pipelines.get(workflow.knot, workflow.rkey)[1]
        try:
            return self._route(workflow, record)
        except WorkflowError:
            return None

    def _run(
        self, workflow, pipeline, record, backend, secrets, cancel, workflow_log, resume
    ) -> Outcome:
        try:
            job = self._job(workflow, pipeline, record, secrets, cancel)
        except WorkflowError as exc:
            workflow_log.error(str(exc), "workflow file")
            return Outcome("failed", str(exc))
        except Exception as exc:  # a record tack stored but cannot use: still ends
            error = f"workflow could not be prepared: {_describe(exc)}"
            workflow_log.error(error)
            return Outcome("failed", error)
        try:
            if resume:
                outcome = backend.resume(job, workflow_log)
                return outcome or Outcome("failed", RESTART_ERROR)
            return backend.run(job, workflow_log)
        except Exception as exc:
            log.exception("backend failed", extra=_ids(workflow))
            error = f"backend {backend.name} failed: {type(exc).__name__}: {exc}"[:1000]
            workflow_log.error(workflow_log.mask(error))
            return Outcome("failed", workflow_log.mask(error))

    def _job(self, workflow, pipeline, record, secrets, cancel) -> Job:
        entry = next(w for w in record["workflows"] if w["name"] == workflow.name)
        uri = pipeline.at_uri

        def save_state(state: dict) -> None:
            self._with_retry(lambda: merge_backend_state(workflow.id, state))

        return Job(
            workflow_id=workflow.id,
            knot=workflow.knot,
            rkey=workflow.rkey,
            name=workflow.name,
            engine=workflow.engine,
            pipeline_uri=uri,
            pipeline=record,
            workflow=entry,
            spec=parse(entry["raw"]),
            env=pipelines.tangled_env(record, uri, self._dev),
            secrets=secrets,
            cancel=cancel,
            stopping=self._stopping,
            state=workflow.state,
            save_state=save_state,
        )

    def _finish(self, workflow: Workflow, outcome: Outcome) -> tuple[str, Workflow | None, bool]:
        """Write the final status and, in the same transaction, claim the next
        pending workflow (none while resumed ones wait, since they go first,
        or while stopping); which status it was, that workflow, and whether
        the transaction looked for one."""
        status = outcome.status if outcome.status in FINAL else "failed"

        flag = CancelFlag()  # for the next workflow, made before the lock

        def attempt() -> tuple[Workflow | None, bool]:
            with self._statuses.writing() as statuses:
                statuses.append(workflow, status, outcome.error, outcome.exit_code)
                if self._stop.is_set() or self._resumable:
                    return None, False
                return self._claim_next(statuses, flag), True

        return status, *self._with_retry(attempt)

    def _with_retry(self, operation):
        return retry.store_writes(self._stop, log, "store busy, retrying")(operation)


def _raw_of(record: dict, name: str) -> str | None:
    """The workflow file ``name`` as the pipeline record carries it."""
    entry = next((w for w in record.get("workflows", ()) if w.get("name") == name), None)
    return None if entry is None else entry.get("raw")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _ids(workflow: Workflow) -> dict:
    return {"knot": workflow.knot, "rkey": workflow.rkey, "workflow": workflow.name}
