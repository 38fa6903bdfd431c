"""Wiring: one process, one database, the threads of every component.

Start-up order matters: the store is migrated and workflows a dead process
left running are resolved before any thread runs; the knot side learns the
wanted knots before the applier can change them. Shutdown first asks every
component to stop, then waits for all of them against one deadline, so the
whole stop stays within 10 s; the applier's last commit (with its cursor)
lands before the database closes.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import signal
import threading
import time
from pathlib import Path

from . import __version__, logs, store
from . import backends as backend_registry
from .api.callbacks import PREFIX as CALLBACK_PREFIX
from .api.callbacks import CallbackHub
from .api.ci import CiApi
from .api.follow import LogFollower
from .api.logstream import PATH as LOGSTREAM_PATH
from .api.logstream import PipelineLogStream
from .api.operator import Operator, Probes
from .api.server import App, Handler, Server, TackHTTPServer
from .api.sockets import encode_utf8_frame
from .api.webhooks import BUILDKITE_PATH, BuildkiteWebhooks
from .api.xrpc import Xrpc
from .auth import ServiceAuth
from .backends import Backends, Context
from .backends.buildkite import BuildkiteBackend
from .checkpoints import Checkpointer
from .config import Config, unimplemented_settings
from .intake.accept import Acceptor
from .intake.backfill import Backfill
from .intake.fetch import WorkflowFetcher
from .intake.knot_frames import KnotIntake
from .intake.knots import KnotConsumer, KnotSubscriptions
from .intake.pulls import PullRequests
from .jetstream import Ingester
from .metrics import Metrics
from .metrics import State as MetricsState
from .retention import Pruner
from .scheduler import Scheduler
from .secrets import SecretStore, load_keys, rotation_requested
from .startup import DatabaseLock, bind_listener, check_log_dir, open_store
from .statuses import StatusLog
from .store import Pipeline, Workflow
from .stream import Backoff
from .switchover import import_official_secrets
from .worklogs import LogBook

log = logs.get("service")

STOP_DEADLINE = 8.0


class Spindle:
    def __init__(
        self,
        config: Config,
        knots: KnotSubscriptions | None = None,
        backends: Backends | None = None,
        context: Context | None = None,
    ) -> None:
        """``backends`` (and the ``context`` they were built with) may come
        pre-loaded, so configuration errors surface before anything starts."""
        self.config = config
        self.context = context or Context.for_config(config)
        if backends is None:
            backends = backend_registry.load(config.config_file, self.context)
        self.stop_event = threading.Event()
        # The port and the database lock come first: nothing is created or
        # migrated until both are ours (startup.py).
        with contextlib.ExitStack() as undo:
            self.httpd = bind_listener(config.listen, TackHTTPServer, Handler)
            self.httpd.max_connections = config.max_connections
            self.httpd.max_per_client = config.max_connections_per_client
            undo.callback(self.httpd.server_close)
            self.lock = DatabaseLock(config.db_path)
            undo.callback(self.lock.release)
            check_log_dir(config.log_dir)
            self.db = open_store(
                config.db_path,
                functools.partial(store.open_database, background_checkpoints=True),
            )
            undo.callback(self.db.close)
            self._build(config, knots, backends)
            undo.pop_all()

    def _build(self, config: Config, knots: KnotSubscriptions | None, backends: Backends) -> None:
        self.metrics = Metrics()
        self.directory = store.Directory(config.hostname, config.owner)
        self.logbook = LogBook(config.log_dir, config.max_log_bytes)
        self.pruner = Pruner(self.logbook, config.retention_days, self.stop_event)
        self.checkpointer = Checkpointer(self.db, self.stop_event)
        self.statuses = StatusLog(self.db, encode=encode_utf8_frame, on_final=self.logbook.notify)
        self.backends = backends
        self.callbacks = CallbackHub(self.statuses, self.stop_event, self._secrets_of_workflow)
        self.context.callbacks = self.callbacks
        backoff = Backoff(config.reconnect_min, config.reconnect_max)
        self.secrets = SecretStore(self.db, load_keys(config.secrets_key, config.key_file))
        if rotation_requested(config.secrets_key):
            rotated = self.secrets.rotate()
            log.info("secrets re-sealed with the first key", extra={"count": rotated})
        import_official_secrets(self.secrets, self.directory)
        store.remember_setting("log_dir", str(Path(config.log_dir).resolve()))
        self.scheduler = Scheduler(
            self.db,
            self.statuses,
            self.logbook,
            self.backends,
            workers=config.max_job_count,
            dev=config.dev,
            stop=self.stop_event,
            secrets_for=self._secrets_for,
            on_finished=self._count_finished,
        )
        self.auth = ServiceAuth(config.spindle_did, config.plc_url, config.dev)
        self.acceptor = Acceptor(
            self.statuses,
            self.logbook,
            self.backends,
            on_accepted=self._accepted,
            stop=self.stop_event,
        )
        # Workflow mirrors live beside the database: state tack may rebuild.
        mirrors = Path(config.db_path).resolve().parent / "tack-mirrors"
        self.fetcher = WorkflowFetcher(mirrors, config.dev)
        self.intake = KnotIntake(
            self.directory,
            self.acceptor,
            self.fetcher,
            self.stop_event,
            on_rejected=self.metrics.rejected,
        )
        self.pulls = PullRequests(
            self.directory,
            self.acceptor,
            self.fetcher,
            self.auth,
            dev=config.dev,
            stop=self.stop_event,
        )
        self.knots = (
            knots
            if knots is not None
            else KnotConsumer(
                self.intake,
                dev=config.dev,
                backoff=backoff,
                read_cursor=store.get_cursor,
                write_cursor=store.save_cursor,
                connects_per_second=config.knot_connects_per_second,
            )
        )
        self.wanted_knots = self.directory.wanted_knots()
        self.ingester = Ingester(
            self.db,
            self.directory,
            self.knots,
            endpoint=config.jetstream_endpoint,
            queue_size=config.queue_size,
            backoff=backoff,
            known_knots=self.wanted_knots,
            on_pull_events=self.pulls.wake,
            backfill=Backfill(self.directory, self.auth.pds_endpoint, config.dev, self.stop_event),
            retention_hours=config.jetstream_retention_hours,
        )
        follower = LogFollower(self.statuses, self.logbook, self.stop_event)
        app = App(config.hostname, config.owner, self.statuses, follower, self.stop_event)
        app.prefix_routes[("POST", CALLBACK_PREFIX)] = self.callbacks.route
        xrpc = Xrpc(self.auth, self.directory, self.secrets, self.scheduler)
        ci = CiApi(self.auth, self.directory, self.acceptor, self.fetcher, self.scheduler)
        for get_routes, post_routes in (xrpc.routes(), ci.routes()):
            app.get_routes.update(get_routes)
            app.post_routes.update(post_routes)
        logstream = PipelineLogStream(follower)
        app.get_routes[LOGSTREAM_PATH] = logstream.route
        notified = [
            b
            for b in self.backends.instances.values()
            if isinstance(b, BuildkiteBackend) and b.takes_webhooks
        ]
        if notified:
            app.post_routes[BUILDKITE_PATH] = BuildkiteWebhooks(notified).route
        self._watch(app, follower)
        self.server = Server(self.httpd, app)

    # --- what the operator sees (/healthz, /metrics) -----------------------------------

    def _watch(self, app: App, follower: LogFollower) -> None:
        applier, reader = self.ingester.applier, self.ingester.reader
        self.metrics.watch(
            MetricsState(
                jetstream_applied=lambda: applier.applied,
                jetstream_skipped=lambda: self.ingester.decoder.bad + applier.unwritable,
                jetstream_cursor_us=lambda: applier.cursor,
                knot_streams=self._knot_figures,
                workflows=lambda: (self.scheduler.figures()[0], self._queued()),
                subscribers=lambda: (app.broadcaster.subscribers, follower.streams),
            )
        )
        app.on_response = self._count_response
        probes = Probes(
            db_path=self.config.db_path,
            jetstream=lambda: (reader.connected, _age(reader.last_frame_at)),
            knots=self._knot_figures,
            workers=self.scheduler.figures,
            queued=self._queued,
        )
        app.get_routes.update(Operator(probes, self.metrics).routes())

    def _knot_figures(self) -> tuple[int, int, int]:
        if isinstance(self.knots, KnotConsumer):
            return self.knots.figures()
        return 0, 0, 0

    def _queued(self) -> int:
        try:
            return store.queued_workflows()
        finally:
            store.release_connection()  # asked from HTTP threads

    def _accepted(self, pipeline: Pipeline, record: dict, queued: int) -> None:
        self.metrics.pipelines_accepted.inc()
        self.scheduler.accepted(pipeline, record, queued)

    def _count_finished(
        self, workflow: Workflow, status: str, seconds: float, backend: str | None
    ) -> None:
        self.metrics.workflows_finished.labels(status).inc()
        self.metrics.workflow_seconds.labels(backend or "none").observe(seconds)

    def _count_response(self, route: str, status: int) -> None:
        self.metrics.http_requests.labels(route, str(status)).inc()

    def _secrets_of_workflow(self, workflow_id: int) -> list[str]:
        workflow = Workflow.get_or_none(Workflow.id == workflow_id)
        if workflow is None:
            return []
        pipeline = store.pipeline_by_key(workflow.knot, workflow.rkey)
        return [] if pipeline is None else list(self._secrets_for(pipeline).values())

    def _secrets_for(self, pipeline: Pipeline) -> dict[str, str]:
        """The secrets of the repo a pipeline belongs to, and no other repo's."""
        repo = None
        if pipeline.repo_did and pipeline.repo_did != pipeline.repo_owner:
            repo = self.directory.repo_by_did(pipeline.repo_did)
        if repo is None:
            repo = self.directory.repo_by_name(pipeline.repo_owner, pipeline.repo_name)
        return {} if repo is None else self.secrets.values(repo.at_uri)

    def start(self) -> None:
        self.scheduler.start()
        self.server.start()
        for knot in sorted(self.wanted_knots):
            self.knots.add_knot(knot)
        self.pulls.start()
        self.ingester.start()
        self.pruner.start()
        self.checkpointer.start()
        log.info("tack started", extra=self._summary())

    def _summary(self) -> dict:
        """What an operator checks first: one line at start with all of it."""
        config = self.config
        return {
            "version": __version__,
            "hostname": config.hostname,
            "owner": config.owner,
            "listen": f"{config.listen[0]}:{config.listen[1]}",
            "port": self.server.port,
            "database": str(Path(config.db_path).resolve()),
            "log_dir": str(Path(config.log_dir).resolve()),
            "dev": config.dev,
            "backends": {
                name: backend.type_name or "unavailable"
                for name, backend in self.backends.instances.items()
            },
            "aliases": self.backends.aliases,
            "cursor": self.ingester.applier.cursor,
        }

    def stop(self) -> None:
        """Stop everything, once: a second call (a test's teardown after the
        test stopped it) changes nothing."""
        if self.stop_event.is_set():
            return
        log.info("tack stopping")
        deadline = time.monotonic() + STOP_DEADLINE
        self.stop_event.set()
        self.logbook.wake_all()  # log followers close their streams now, not at their next wake
        # Stop taking in new records first; the applier drains meanwhile.
        self.ingester.request_stop()
        if isinstance(self.knots, KnotConsumer):
            self.knots.stop(timeout=_left(deadline))
        self.scheduler.stop(timeout=_left(deadline))
        self.pulls.join(timeout=_left(deadline))
        self.pruner.join(timeout=_left(deadline))
        self.ingester.stop(timeout=_left(deadline))
        self.checkpointer.join(timeout=_left(deadline))
        self.server.stop()
        log.info("tack stopped", extra={"cursor": self.ingester.applier.cursor})
        self.db.close()
        self.lock.release()


def _age(moment: float | None) -> float | None:
    return None if moment is None else time.monotonic() - moment


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.1)


# Ingest allocates a few short-lived dicts per event, so the default first
# generation (700 allocations) collected every few dozen events.
GC_YOUNG_THRESHOLD = 50_000


def _tune_garbage_collector() -> None:
    """Collect less often, and never walk what start-up built again.

    Everything alive once the spindle is built (modules, the model set, the
    routes) lives as long as the process: freezing it keeps every full
    collection from walking it. With the default thresholds the collector
    took about a tenth of ingest's time.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def run(config: Config, backends: Backends, context: Context) -> int:
    """Run until SIGTERM, SIGINT or SIGHUP, then shut down cleanly; the exit status.

    SIGHUP (a closed terminal, or an operator's reload habit) stops tack the
    same orderly way: tack has nothing to reload, and dying silently is worse.
    """
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        stop.set()

    ignored = unimplemented_settings()
    if ignored:
        log.warning(
            "settings of the official spindle that tack does not implement are ignored",
            extra={"settings": ignored},
        )
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_stop)
    spindle = Spindle(config, backends=backends, context=context)
    _tune_garbage_collector()
    spindle.start()
    while not stop.wait(1.0):
        pass
    spindle.stop()
    return 0
