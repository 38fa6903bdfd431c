"""The SQLite store: peewee models, versioned migrations and the queries tack needs.

One database file holds everything tack must not lose: the records ingested
from jetstream, the stream cursors, and (later) pipelines, statuses and logs.
peewee gives each thread its own connection; WAL lets readers proceed while
the single applier writes.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import operator
import sqlite3
import threading
from collections.abc import Callable, Iterable
from typing import Any

import peewee
from peewee import (
    AutoField,
    BigIntegerField,
    BlobField,
    CompositeKey,
    DatabaseProxy,
    IntegerField,
    Model,
    SqliteDatabase,
    TextField,
)

from . import logs, records
from .config import ConfigError

log = logs.get("store")

database = DatabaseProxy()

# How long a statement waits for another connection's write lock before
# SQLite reports "database is locked". Kept short: the ingest path retries
# with its own backoff (and logs it), which beats one silent long stall.
BUSY_TIMEOUT_MS = 2000


def pipeline_uri(knot: str, rkey: str) -> str:
    return f"at://did:web:{knot}/sh.tangled.pipeline/{rkey}"


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Member(BaseModel):
    """A ``sh.tangled.spindle.member`` record naming this spindle.

    Kept whoever wrote it: only the owner's count, and that is decided at
    query time so a corrected owner setting needs no replay.
    """

    did = TextField()  # author of the record (the inviter)
    rkey = TextField()
    subject = TextField()
    instance = TextField()
    created_at = TextField()

    class Meta:
        primary_key = CompositeKey("did", "rkey")


class Repo(BaseModel):
    """A ``sh.tangled.repo`` record whose ``spindle`` is this spindle."""

    did = TextField()  # the repo owner
    rkey = TextField()
    name = TextField()
    knot = TextField()
    spindle = TextField()
    repo_did = TextField(null=True)
    created_at = TextField()

    class Meta:
        primary_key = CompositeKey("did", "rkey")

    @property
    def at_uri(self) -> str:
        return f"at://{self.did}/sh.tangled.repo/{self.rkey}"

    @property
    def knot_path(self) -> str:
        """The repository's path on its knot: the repo DID today, owner/name before."""
        return self.repo_did or f"{self.did}/{self.name}"


class Collaborator(BaseModel):
    """A ``sh.tangled.repo.collaborator`` record: ``did`` grants ``subject`` a repo."""

    did = TextField()
    rkey = TextField()
    subject = TextField()
    repo = TextField(null=True)  # at-uri of the repo
    repo_did = TextField(null=True)
    created_at = TextField()

    class Meta:
        primary_key = CompositeKey("did", "rkey")


class Cursor(BaseModel):
    """Named stream positions (jetstream, one per knot)."""

    name = TextField(primary_key=True)
    value = BigIntegerField()


class Pipeline(BaseModel):
    """An accepted pipeline, keyed by its knot and TID (the knot's rkey for a
    pipeline an older knot compiled, one tack minted otherwise).

    ``record`` is the ``sh.tangled.pipeline`` record whoever compiled it;
    ``repo_did``, ``kind`` and ``sha`` are copied out of it for the
    ``sh.tangled.ci`` queries. ``push_key`` names the push a pipeline came
    from, so one push makes one pipeline whichever frames a knot sends for it.
    """

    knot = TextField()
    rkey = TextField()
    repo_owner = TextField()
    repo_name = TextField()
    record = TextField()  # the pipeline record, JSON
    accepted_at = BigIntegerField()  # unix ns
    repo_did = TextField(null=True)  # the repo DID, or the owner's DID for a repo without one
    kind = TextField(null=True)
    sha = TextField(null=True)
    push_key = TextField(null=True)

    class Meta:
        primary_key = CompositeKey("knot", "rkey")

    @property
    def at_uri(self) -> str:
        return pipeline_uri(self.knot, self.rkey)


class Workflow(BaseModel):
    """One workflow of an accepted pipeline; ``status`` is its latest status event."""

    id = AutoField()
    knot = TextField()
    rkey = TextField()
    name = TextField()
    engine = TextField()
    status = TextField()
    error = TextField(null=True)
    exit_code = IntegerField(null=True)
    backend_state = TextField(null=True)  # JSON a backend keeps to resume (remote run id)
    created_at = BigIntegerField()
    updated_at = BigIntegerField()
    started_at = BigIntegerField(null=True)  # unix ns of its running status
    finished_at = BigIntegerField(null=True)  # unix ns of its final status

    @property
    def state(self) -> dict[str, Any]:
        """The backend state as saved; empty when there is none."""
        return json.loads(self.backend_state or "{}")


class StatusEvent(BaseModel):
    """The append-only log served on /events; ``frame`` is the exact text sent."""

    id = AutoField()
    rkey = TextField(unique=True)
    created = BigIntegerField(unique=True)  # unix ns, strictly increasing with id
    workflow_id = IntegerField()
    status = TextField()
    frame = TextField()


class KnotEvent(BaseModel):
    """A knot event already taken in: (knot, rkey) makes at most one pipeline."""

    knot = TextField()
    rkey = TextField()

    class Meta:
        primary_key = CompositeKey("knot", "rkey")


class KnotCollaborator(BaseModel):
    """A collaborator a repo's own knot announced (``collaboratorUpdate``)."""

    knot = TextField()
    repo_did = TextField()
    subject = TextField()

    class Meta:
        primary_key = CompositeKey("repo_did", "subject", "knot")


class Pull(BaseModel):
    """A branch pull request (``sh.tangled.repo.pull``) into a repo this spindle serves."""

    did = TextField()  # the author
    rkey = TextField()
    target_repo_did = TextField()
    target_branch = TextField()
    source_branch = TextField()
    patch_blob = TextField()  # CID of the latest round's patch
    created_at = TextField()

    class Meta:
        primary_key = CompositeKey("did", "rkey")

    @property
    def at_uri(self) -> str:
        return f"at://{self.did}/sh.tangled.repo.pull/{self.rkey}"


class PullTrigger(BaseModel):
    """A pull request event waiting to become a pipeline (the applier queues it;
    the pull request worker, which may wait on the network, takes it)."""

    id = AutoField()
    key = TextField(unique=True)  # the jetstream commit it came from: replays add nothing
    pull_did = TextField()
    pull_rkey = TextField()
    action = TextField()
    actor = TextField()
    created_at = BigIntegerField()


class CancelRequest(BaseModel):
    """A cancel ``tack cancel`` asked for; the running tack carries it out."""

    workflow_id = IntegerField(primary_key=True)
    requested_at = BigIntegerField()


class Secret(BaseModel):
    """A repo's CI secret; ``value`` is sealed (see secrets.py), never plain."""

    repo = TextField()  # the repo's at-uri
    key = TextField()
    value = BlobField()
    created_at = TextField()
    created_by = TextField()

    class Meta:
        primary_key = CompositeKey("repo", "key")


class SchemaVersion(BaseModel):
    version = IntegerField(primary_key=True)


# --- migrations ------------------------------------------------------------
#
# Each step is frozen DDL, never derived from the models above: a model that
# grows a column in a later release must not change what step 1 created, or
# an upgrade from step 1 would skip the new column. Add steps; never edit one.

_V1 = (
    """CREATE TABLE member (
        did TEXT NOT NULL, rkey TEXT NOT NULL, subject TEXT NOT NULL,
        instance TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (did, rkey))""",
    "CREATE INDEX member_subject ON member (subject)",
    """CREATE TABLE repo (
        did TEXT NOT NULL, rkey TEXT NOT NULL, name TEXT NOT NULL, knot TEXT NOT NULL,
        spindle TEXT NOT NULL, repo_did TEXT, created_at TEXT NOT NULL,
        PRIMARY KEY (did, rkey))""",
    "CREATE INDEX repo_owner_name ON repo (did, name)",
    "CREATE INDEX repo_repo_did ON repo (repo_did)",
    "CREATE INDEX repo_knot ON repo (knot)",
    """CREATE TABLE collaborator (
        did TEXT NOT NULL, rkey TEXT NOT NULL, subject TEXT NOT NULL, repo TEXT,
        repo_did TEXT, created_at TEXT NOT NULL, PRIMARY KEY (did, rkey))""",
    "CREATE INDEX collaborator_subject ON collaborator (subject)",
    "CREATE TABLE cursor (name TEXT NOT NULL PRIMARY KEY, value BIGINT NOT NULL)",
)

_V2 = (
    """CREATE TABLE pipeline (
        knot TEXT NOT NULL, rkey TEXT NOT NULL, repo_owner TEXT NOT NULL,
        repo_name TEXT NOT NULL, record TEXT NOT NULL, accepted_at BIGINT NOT NULL,
        PRIMARY KEY (knot, rkey))""",
    """CREATE TABLE workflow (
        id INTEGER PRIMARY KEY AUTOINCREMENT, knot TEXT NOT NULL, rkey TEXT NOT NULL,
        name TEXT NOT NULL, engine TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
        exit_code INTEGER, backend_state TEXT, created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL, UNIQUE (knot, rkey, name),
        FOREIGN KEY (knot, rkey) REFERENCES pipeline (knot, rkey))""",
    "CREATE INDEX workflow_status ON workflow (status, id)",
    """CREATE TABLE status_event (
        id INTEGER PRIMARY KEY AUTOINCREMENT, rkey TEXT NOT NULL UNIQUE,
        created BIGINT NOT NULL UNIQUE, workflow_id INTEGER NOT NULL REFERENCES workflow (id),
        status TEXT NOT NULL, frame TEXT NOT NULL)""",
)

_V3 = (
    """CREATE TABLE secret (
        repo TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
        created_at TEXT NOT NULL, created_by TEXT NOT NULL, PRIMARY KEY (repo, key))""",
)

_V4 = (
    # The 2026 pipeline model: pipelines queried by repo DID, kind and commit.
    "ALTER TABLE pipeline ADD COLUMN repo_did TEXT",
    "ALTER TABLE pipeline ADD COLUMN kind TEXT",
    "ALTER TABLE pipeline ADD COLUMN sha TEXT",
    "ALTER TABLE pipeline ADD COLUMN push_key TEXT",
    """UPDATE pipeline SET
        kind = json_extract(record, '$.triggerMetadata.kind'),
        sha = coalesce(json_extract(record, '$.triggerMetadata.push.newSha'),
                       json_extract(record, '$.triggerMetadata.pullRequest.sourceSha'),
                       json_extract(record, '$.triggerMetadata.manual.sha')),
        repo_did = coalesce(json_extract(record, '$.triggerMetadata.repo.repoDid'), repo_owner)""",
    "CREATE INDEX pipeline_repo_did ON pipeline (repo_did)",
    "CREATE INDEX pipeline_repo_did_kind ON pipeline (repo_did, kind)",
    "CREATE INDEX pipeline_repo_did_sha ON pipeline (repo_did, sha)",
    "CREATE INDEX pipeline_rkey ON pipeline (rkey)",
    "CREATE INDEX pipeline_push_key ON pipeline (push_key)",
    "ALTER TABLE workflow ADD COLUMN started_at BIGINT",
    "ALTER TABLE workflow ADD COLUMN finished_at BIGINT",
    "CREATE INDEX status_event_workflow ON status_event (workflow_id)",
    """UPDATE workflow SET
        started_at = (SELECT min(created) FROM status_event
                      WHERE workflow_id = workflow.id AND status = 'running'),
        finished_at = (SELECT max(created) FROM status_event WHERE workflow_id = workflow.id
                       AND status IN ('success', 'failed', 'timeout', 'cancelled'))""",
    """CREATE TABLE knot_event (
        knot TEXT NOT NULL, rkey TEXT NOT NULL, PRIMARY KEY (knot, rkey))""",
    """CREATE TABLE knot_collaborator (
        knot TEXT NOT NULL, repo_did TEXT NOT NULL, subject TEXT NOT NULL,
        PRIMARY KEY (repo_did, subject, knot))""",
    """CREATE TABLE pull (
        did TEXT NOT NULL, rkey TEXT NOT NULL, target_repo_did TEXT NOT NULL,
        target_branch TEXT NOT NULL, source_branch TEXT NOT NULL, patch_blob TEXT NOT NULL,
        created_at TEXT NOT NULL, PRIMARY KEY (did, rkey))""",
    """CREATE TABLE pull_trigger (
        id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, pull_did TEXT NOT NULL,
        pull_rkey TEXT NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,
        created_at BIGINT NOT NULL)""",
    "CREATE INDEX collaborator_repo_did ON collaborator (repo_did)",
)

# V5: cancels asked for by ``tack cancel`` (another process), for the
# running tack to carry out: statuses are written by one process only.
# Also where the running tack keeps its workflow logs, so those commands
# need only the database's path.
_V5 = (
    """CREATE TABLE cancel_request (
        workflow_id INTEGER PRIMARY KEY, requested_at BIGINT NOT NULL)""",
    """CREATE TABLE instance_setting (name TEXT PRIMARY KEY, value TEXT NOT NULL)""",
)

MIGRATIONS: list[tuple[int, Iterable[str]]] = [
    (1, _V1),
    (2, _V2),
    (3, _V3),
    (4, _V4),
    (5, _V5),
]


def migrate(db: peewee.Database) -> int:
    """Bring the schema to the newest version, one transaction per step."""
    db.execute_sql("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)")
    current = SchemaVersion.select(peewee.fn.MAX(SchemaVersion.version)).scalar() or 0
    latest = MIGRATIONS[-1][0]
    if current > latest:
        # A newer tack wrote this database: running older code on it could
        # corrupt what it does not know about.
        raise ConfigError(
            "SPINDLE_SERVER_DB_PATH",
            f"the database's schema (version {current}) is newer than this tack's"
            f" ({latest}); run a newer tack, or restore a backup made for this one",
        )
    for version, statements in MIGRATIONS:
        if version <= current:
            continue
        with db.atomic():
            for statement in statements:
                db.execute_sql(statement)
            SchemaVersion.create(version=version)
        log.info("schema migrated", extra={"schema_version": version})
        current = version
    return current


class SerialWriteDatabase(SqliteDatabase):
    """SQLite with the threads of this process taking turns to write.

    Every thread has its own connection, and SQLite makes a writer that finds
    the database locked sleep and poll (1, 2, 5 … 100 ms) until it is free: a
    worker's status write behind the intake's commit waited tens of
    milliseconds for a lock released after one. Here a write transaction
    first takes a process-wide lock, so writers queue and start the moment
    the one before commits. Waiting is bounded by the same busy timeout and
    ends the same way, "database is locked": a transient error its caller
    retries (and logs), as when another process holds SQLite's lock.

    Every write transaction also runs on one connection, lent to the thread
    that holds the lock, while reads outside transactions stay on each
    thread's own. A connection that finds the database changed by another
    connection drops its whole page cache: with each thread writing on its
    own, every transaction read its pages back from the file first, about
    half of a pipeline's acceptance. The writers' connection only misses
    what other processes (or a lone autocommit write) changed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writer = threading.Lock()
        self._holding = threading.local()
        self._writer_connection: sqlite3.Connection | None = None  # under _writer
        self._writer_setup: list[str] = []  # run on each new writers' connection

    def _take_writer(self) -> None:
        """The write lock, waiting at most the busy timeout."""
        if not self._writer.acquire(timeout=BUSY_TIMEOUT_MS / 1000):
            raise peewee.OperationalError("database is locked (by another thread of tack)")

    def begin(self, lock_type: str | None = None) -> None:
        self._take_writer()
        try:
            self._lend_writer_connection()
        except BaseException:
            self._writer.release()
            raise
        try:
            super().begin(lock_type)
        except BaseException:
            self._release_writer()
            raise

    def commit(self) -> None:
        try:
            super().commit()
        except BaseException:
            # Undone here, on the writers' connection: the rollback peewee
            # sends next finds this thread's own connection back in place.
            with contextlib.suppress(Exception):
                super().rollback()
            raise
        finally:
            self._release_writer()

    def rollback(self) -> None:
        if not getattr(self._holding, "writer", False):
            return  # a failed commit already rolled back (see commit)
        try:
            super().rollback()
        finally:
            self._release_writer()

    def _lend_writer_connection(self) -> None:
        """Under the write lock: this thread's queries go to the writers'
        connection until it commits or rolls back."""
        if self._writer_connection is None:
            connection = self._connect()
            for statement in self._writer_setup:
                connection.execute(statement)
            self._writer_connection = connection
        state = self._state
        self._holding.own = (state.conn, state.closed)
        state.conn, state.closed = self._writer_connection, False
        self._holding.writer = True

    def _release_writer(self) -> None:
        if getattr(self._holding, "writer", False):
            self._holding.writer = False
            self._state.conn, self._state.closed = self._holding.own
            self._writer.release()

    def set_up_writers(self, statements: list[str]) -> None:
        """Run ``statements`` on the writers' connection, now and on each one
        opened later: temporary tables and triggers belong to a connection."""
        self._take_writer()
        try:
            self._writer_setup = list(statements)
            if self._writer_connection is not None:
                for statement in statements:
                    self._writer_connection.execute(statement)
        finally:
            self._writer.release()

    def release_own(self) -> bool:
        """Close this thread's own connection (not the writers')."""
        return super().close()

    def close(self) -> bool:
        """Close this thread's connection and the writers' one."""
        closed = super().close()
        if self._writer.acquire(timeout=BUSY_TIMEOUT_MS / 1000):
            try:
                if self._writer_connection is not None:
                    self._writer_connection.close()
                    self._writer_connection = None
            finally:
                self._writer.release()
        return closed


def open_database(path: str, background_checkpoints: bool = False) -> SqliteDatabase:
    """Open (creating if needed) and migrate the database at ``path``.

    ``background_checkpoints``: no commit checkpoints the write-ahead log
    itself; the caller runs a ``checkpoints.Checkpointer`` (the service does).
    """
    pragmas = {
        "journal_mode": "wal",
        "foreign_keys": 1,
        "busy_timeout": BUSY_TIMEOUT_MS,
        "synchronous": "normal",
    }
    if background_checkpoints:
        pragmas["wal_autocheckpoint"] = 0
    db = SerialWriteDatabase(
        path,
        pragmas=pragmas,
        check_same_thread=False,
        # Transactions take the write lock when they begin. A deferred one
        # that reads first and writes later fails outright (no busy wait)
        # when another connection committed in between.
        lock_type="IMMEDIATE",
    )
    database.initialize(db)
    db.connect(reuse_if_open=True)
    migrate(db)
    # Lets SQLite gather the statistics its planner needs for the pipeline
    # queries (which index serves a repo's page); cheap when nothing changed.
    db.execute_sql("PRAGMA optimize")
    return db


def release_connection() -> None:
    """Close this thread's connection, if it has one.

    peewee keeps one connection per thread; threads that live long but query
    rarely (stream followers, knot readers) give theirs back after use, so
    thousands of them do not hold thousands of SQLite descriptors.
    """
    if database.obj is not None and not database.is_closed():
        database.release_own()


def compile_once(build: Callable[[], peewee.Query]) -> Callable[[], str]:
    """The SQL of a statement on a hot path, built by peewee on first use.

    Building a query costs far more than running it; callers bind fresh
    values to the same SQL in the order peewee put its placeholders. Build
    with non-None sample values, or peewee writes NULL instead of a
    placeholder.
    """
    return functools.cache(lambda: build().sql()[0])


@functools.cache
def _insert_sql(model: type[BaseModel], on_conflict_ignore: bool) -> tuple[str, tuple[str, ...]]:
    """An INSERT of every column ``model`` sets itself (not an auto id), and
    the order its values bind in."""
    columns = tuple(
        name
        for name in model._meta.sorted_field_names
        if not isinstance(model._meta.fields[name], AutoField)
    )
    query = model.insert(**{name: 1 for name in columns})
    if on_conflict_ignore:
        query = query.on_conflict_ignore()
    sql, params = query.sql()
    if len(params) != len(columns):
        raise RuntimeError(f"{model.__name__}: {len(params)} placeholders for {len(columns)}")
    return sql, columns


def insert_row(model: type[BaseModel], values: dict[str, Any], ignore: bool = False) -> int:
    """Insert one row on a hot path (intake); its rowid, or 0 when ``ignore``
    and the row was there. Columns left out of ``values`` are NULL."""
    sql, columns = _insert_sql(model, ignore)
    cursor = database.execute_sql(sql, [values.get(name) for name in columns])
    return cursor.lastrowid if cursor.rowcount else 0


def fetch_one(model: type[BaseModel], sql: str, params: tuple) -> Any:
    """The first row a compiled SELECT of whole ``model`` rows finds, as a
    model instance; None when there is none."""
    cursor = database.execute_sql(sql, params)
    row = cursor.fetchone()
    if row is None:
        return None
    return model(**dict(zip([column[0] for column in cursor.description], row, strict=True)))


def next_pending_workflow() -> Workflow | None:
    """The oldest queued workflow: the scheduler's queue head."""
    return fetch_one(Workflow, _NEXT_PENDING(), ("pending", 1))


def queued_workflows() -> int:
    """Workflows waiting for a worker (/healthz, /metrics)."""
    return Workflow.select().where(Workflow.status == "pending").count()


def pipeline_by_key(knot: str, rkey: str) -> Pipeline | None:
    return fetch_one(Pipeline, _PIPELINE_BY_KEY(), (knot, rkey, 1))


_PIPELINE_BY_KEY = compile_once(
    lambda: Pipeline.select().where((Pipeline.knot == "k") & (Pipeline.rkey == "r")).limit(1)
)


_NEXT_PENDING = compile_once(
    lambda: Workflow.select().where(Workflow.status == "pending").order_by(Workflow.id).limit(1)
)


def merge_backend_state(workflow_id: int, changes: dict[str, Any]) -> None:
    """Merge ``changes`` into a workflow's saved backend state, in one transaction.

    The backend and the CI callback API save state from different threads;
    merging keeps each one's keys (the token hash, the last log seq) whoever
    writes last.
    """
    with database.atomic():
        state = Workflow.get_by_id(workflow_id).state | changes
        Workflow.update(backend_state=json.dumps(state)).where(Workflow.id == workflow_id).execute()


def is_transient(exc: BaseException) -> bool:
    """I/O trouble worth retrying in place, as opposed to a bad record.

    Locked or busy databases, a full disk and I/O errors all clear up without
    the input changing; constraint violations and type errors never do.
    """
    if isinstance(exc, peewee.OperationalError | sqlite3.OperationalError | OSError):
        return True
    return isinstance(exc, peewee.InterfaceError)


# --- record mutations (each an idempotent upsert or delete on (did, rkey)) ---
#
# Ingest writes tens of thousands of rows a second, and building a peewee
# query per row costs more than SQLite's work. So peewee builds each
# statement once (keeping its dialect handling), and many rows go to SQLite
# in one multi-row statement. Not ``executemany``: SQLite gives up the GIL for
# every row it steps, and taking it back waits for whichever thread holds it
# (the jetstream reader), which made each row cost milliseconds under load.

ROWS_PER_STATEMENT = 250

RECORD_MODELS: dict[str, type[BaseModel]] = {
    records.MEMBER: Member,
    records.REPO: Repo,
    records.COLLABORATOR: Collaborator,
    records.PULL: Pull,
}


@functools.cache
def _columns(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(model._meta.sorted_field_names)


@functools.cache
def _row_values(model: type[BaseModel]) -> Callable[[dict], tuple]:
    """A row's values in ``_columns`` order, taken in C: a third of what
    looking each up in Python cost."""
    return operator.itemgetter(*_columns(model))


@functools.cache
def _upsert_statement(collection: str, rows: int) -> str:
    """Upsert ``rows`` records of ``collection`` in one statement.

    A record written again as it is stored is left alone: a restart's
    replay and backfill bring back records unchanged, as do edits of fields
    tack does not keep (a repo's description). Rewriting such a row cost
    every index on it a delete and an insert, and fired the knot triggers.
    """
    model = RECORD_MODELS[collection]
    columns = _columns(model)
    updated = [name for name in columns if name not in ("did", "rkey")]
    names = ", ".join(f'"{name}"' for name in columns)
    row = "(" + ", ".join("?" for _ in columns) + ")"
    values = ", ".join(row for _ in range(rows))
    assignments = ", ".join(f'"{name}" = excluded."{name}"' for name in updated)
    changed = " OR ".join(f'"{name}" IS NOT excluded."{name}"' for name in updated)
    return (
        f'INSERT INTO "{model._meta.table_name}" ({names}) VALUES {values}'
        f' ON CONFLICT ("did", "rkey") DO UPDATE SET {assignments} WHERE {changed}'
    )


@functools.cache
def _delete_statement(collection: str, rows: int) -> str:
    """Delete ``rows`` records of ``collection``, given as (did, rkey) pairs.

    A join against the keys walks the primary key once per key; a plain
    ``(did, rkey) IN (…)`` would scan the table.
    """
    table = RECORD_MODELS[collection]._meta.table_name
    keys = ", ".join("(?, ?)" for _ in range(rows))
    return (
        f'DELETE FROM "{table}" WHERE rowid IN (SELECT t.rowid FROM (VALUES {keys}) AS k'
        f' JOIN "{table}" AS t ON t.did = k.column1 AND t.rkey = k.column2)'
    )


def _write_rows(statement: Callable[[str, int], str], collection: str, rows: list[tuple]) -> None:
    """``rows`` (each a tuple of values) through ``statement(collection, n)``,
    at most ROWS_PER_STATEMENT at a time."""
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start : start + ROWS_PER_STATEMENT]
        params = list(itertools.chain.from_iterable(chunk))
        database.execute_sql(statement(collection, len(chunk)), params)


def apply_changes(
    changes: Iterable[records.Change], may_grant: Callable[[str], bool] = lambda did: True
) -> None:
    """Write changes so the store ends as if each were written in order; call
    inside a transaction.

    Between account deletions and pull request events (which are written in
    their place), upserts and deletes are collapsed per record: each is a
    whole-record replacement or removal on (did, rkey), so the last one
    decides. Each collection then takes one statement for its deletes and one
    for its upserts, members first. Writing them one run of identical
    statements at a time cost a statement for every few events.

    A collaborator record is kept only when ``may_grant(author)``: only a
    repo's owner grants, and only the owner's and members' repos are served,
    so records by anyone else can never matter (the network has many). It is
    asked after the members are written, so a member invited in the same
    batch counts.
    """
    segment: list[records.Change] = []
    for change in changes:
        if change.action in ("upsert", "delete"):
            segment.append(change)
            continue
        _write_records(segment, may_grant)
        segment = []
        if change.action == "delete_account":
            delete_account(change.did)
        elif change.action == "pull_event":
            apply_pull_event(change)
    _write_records(segment, may_grant)


# Members first: whether a collaborator record is kept depends on them.
_WRITE_ORDER = (records.MEMBER, records.REPO, records.COLLABORATOR, records.PULL)


def _write_records(changes: list[records.Change], may_grant: Callable[[str], bool]) -> None:
    """Upserts and deletes, collapsed per record (see ``apply_changes``)."""
    if not changes:
        return
    deleted: dict[str, dict[tuple[str, str], None]] = {c: {} for c in _WRITE_ORDER}
    final: dict[str, dict[tuple[str, str], records.Change]] = {c: {} for c in _WRITE_ORDER}
    for change in changes:
        key = (change.did, change.rkey)
        last = final[change.collection]
        last.pop(key, None)  # a later write lands after the ones before it
        last[key] = change
        if change.action == "delete":
            deleted[change.collection][key] = None
    for collection in _WRITE_ORDER:
        upserts = [c for c in final[collection].values() if c.action == "upsert"]
        if collection == records.COLLABORATOR and upserts:
            granting = {did: may_grant(did) for did in {c.did for c in upserts}}
            for change in upserts:
                if not granting[change.did]:  # an earlier copy, if any, goes
                    deleted[collection][(change.did, change.rkey)] = None
            upserts = [c for c in upserts if granting[c.did]]
        if deleted[collection]:
            _write_rows(_delete_statement, collection, list(deleted[collection]))
        if upserts:
            values = _row_values(RECORD_MODELS[collection])
            rows = [values(change.row) for change in upserts]
            _write_rows(_upsert_statement, collection, rows)


def remember_setting(name: str, value: str) -> None:
    """A setting of the running tack that its admin commands read back."""
    database.execute_sql(
        "INSERT INTO instance_setting (name, value) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, value),
    )


def remembered_setting(name: str) -> str | None:
    row = database.execute_sql(
        "SELECT value FROM instance_setting WHERE name = ?", (name,)
    ).fetchone()
    return None if row is None else row[0]


def stored_rkeys(collection: str, did: str) -> set[str]:
    """The rkeys of ``did``'s records of ``collection`` tack holds."""
    model = RECORD_MODELS[collection]
    return {row.rkey for row in model.select(model.rkey).where(model.did == did)}


def apply_pull_event(change: records.Change) -> None:
    """Keep a pull request into a served repo, and queue its trigger.

    Pull requests into repos this spindle does not serve are not kept: the
    network has many. The trigger's key is the jetstream commit it came in,
    so a replayed event queues nothing twice.
    """
    row = dict(change.row or {})
    key, action = row.pop("key"), row.pop("action")
    if change.collection == records.PULL:
        served = Repo.select().where(Repo.repo_did == row["target_repo_did"]).exists()
        if not served:
            return
        Pull.insert(did=change.did, rkey=change.rkey, **row).on_conflict_replace().execute()
        pull_did, pull_rkey = change.did, change.rkey
    else:
        pull_did, pull_rkey = row["pull_did"], row["pull_rkey"]
        if not Pull.select().where((Pull.did == pull_did) & (Pull.rkey == pull_rkey)).exists():
            return
    PullTrigger.insert(
        key=key,
        pull_did=pull_did,
        pull_rkey=pull_rkey,
        action=action,
        actor=change.did,
        created_at=change.time_us * 1000,
    ).on_conflict_ignore().execute()


def delete_account(did: str) -> None:
    """Forget every record a deleted account wrote."""
    for model in RECORD_MODELS.values():
        model.delete().where(model.did == did).execute()


# --- cursors -----------------------------------------------------------------


def get_cursor(name: str) -> int | None:
    row = Cursor.get_or_none(Cursor.name == name)
    return None if row is None else row.value


def save_cursor(name: str, value: int) -> None:
    database.execute_sql(_SAVE_CURSOR(), (name, value))


_SAVE_CURSOR = compile_once(
    lambda: Cursor.insert(name="n", value=1).on_conflict(
        conflict_target=[Cursor.name], preserve=[Cursor.value]
    )
)


# --- queries -----------------------------------------------------------------


_REPO_BY_NAME = compile_once(
    lambda: Repo.select().where((Repo.did == "o") & (Repo.name == "n")).limit(1)
)


def _members_of(owner: str, hostname: str) -> peewee.ModelSelect:
    """Whom ``owner`` invited to the spindle at ``hostname``."""
    return Member.select(Member.subject).where(
        (Member.did == owner) & (Member.instance == hostname)
    )


def _served_repos_of(owner: str, hostname: str) -> peewee.ModelSelect:
    """Repo records naming the spindle, by its owner or a member."""
    return Repo.select().where(
        (Repo.spindle == hostname)
        & ((Repo.did == owner) | Repo.did.in_(_members_of(owner, hostname)))
    )


# The directory's questions asked for every ingest batch, built once. Their
# placeholders are, in order: owner, hostname, subject, limit; and hostname,
# owner, owner, hostname, knot, limit.
_IS_MEMBER = compile_once(lambda: _members_of("o", "h").where(Member.subject == "s").limit(1))
_IS_KNOT_WANTED = compile_once(
    lambda: _served_repos_of("o", "h").select(Repo.knot).where(Repo.knot == "k").limit(1)
)
# Asked for every push and every workflow's secrets: hostname, owner, owner,
# hostname, repo DID, limit.
_REPO_BY_DID = compile_once(
    lambda: (
        _served_repos_of("o", "h")
        .where(Repo.repo_did == "d")
        .order_by(peewee.SQL("rowid"))
        .limit(1)
    )
)


class KeptAnswers:
    """Answers to questions about stored rows, kept in memory until a change
    that may alter them is committed (``changed``).

    Every commit drops a reading connection's page cache, so a question
    asked for every pipeline or workflow read its pages from the file again.
    Kept answers are shared: never change one.
    """

    def __init__(self, limit: int) -> None:
        """At most ``limit`` answers: past it, all are forgotten and asked again."""
        self._limit = limit
        self._answers: dict[tuple, Any] = {}
        self._generation = 0  # counts changed() calls
        self._lock = threading.Lock()

    def changed(self) -> None:
        """A change was committed: forget every answer kept."""
        with self._lock:
            self._generation += 1
            self._answers.clear()

    def get(self, question: tuple, ask: Callable[[], Any]) -> Any:
        """``ask()``'s answer to ``question``, kept until the next change."""
        if database.in_transaction():
            # A write transaction sees what it has not committed (the
            # applier asks about members it just wrote): asked, never kept.
            return ask()
        with self._lock:
            generation = self._generation
            if question in self._answers:
                return self._answers[question]
        answer = ask()
        with self._lock:
            # Kept only if no change was committed since the asking began:
            # the answer may predate it.
            if generation == self._generation:
                if len(self._answers) >= self._limit:
                    self._answers.clear()
                self._answers[question] = answer
        return answer


class Directory:
    """Who may use this spindle and for which repos, as the records say.

    Bound to this spindle's hostname and owner, which every question here is
    relative to. The questions asked for every pipeline and workflow (whose
    repo, is its owner a member) are answered from memory until the applier
    commits a change to repo or member records (``records_changed``).
    """

    def __init__(self, hostname: str, owner: str) -> None:
        self.hostname = hostname
        self.owner = owner
        self._kept = KeptAnswers(limit=4096)

    def records_changed(self) -> None:
        """Repo or member records were committed: answers kept may be stale."""
        self._kept.changed()

    def is_member(self, did: str) -> bool:
        """The owner, or someone the owner invited to this spindle."""
        if did == self.owner:
            return True
        params = (self.owner, self.hostname, did, 1)
        return self._kept.get(
            ("member", did),
            lambda: database.execute_sql(_IS_MEMBER(), params).fetchone() is not None,
        )

    def _served_repos_where(self, value: str) -> tuple:
        """The parameters of a compiled one-row question about served repos
        (``_IS_KNOT_WANTED``, ``_REPO_BY_DID``): this spindle, its owner, and
        the ``value`` asked about."""
        return (self.hostname, self.owner, self.owner, self.hostname, value, 1)

    def _served_repos(self) -> peewee.ModelSelect:
        return _served_repos_of(self.owner, self.hostname)

    def is_knot_wanted(self, knot: str) -> bool:
        params = self._served_repos_where(knot)
        return database.execute_sql(_IS_KNOT_WANTED(), params).fetchone() is not None

    def knots_of_owners(self, dids: set[str]) -> set[str]:
        """The knots of every stored repo these DIDs own that names this spindle."""
        if not dids:
            return set()
        placeholders = ", ".join("?" for _ in dids)
        sql = f"SELECT DISTINCT knot FROM repo WHERE did IN ({placeholders}) AND spindle = ?"
        return {row[0] for row in database.execute_sql(sql, [*dids, self.hostname])}

    def wanted_knots(self) -> set[str]:
        """Knots hosting at least one repo we serve: the streams to subscribe to."""
        query = self._served_repos().select(Repo.knot).distinct()
        return {row.knot for row in query}

    def repo_by_name(self, owner: str, name: str) -> Repo | None:
        """The repo record ``name`` by ``owner`` (shared: never change it)."""
        return self._kept.get(
            ("repo_by_name", owner, name),
            lambda: fetch_one(Repo, _REPO_BY_NAME(), (owner, name, 1)),
        )

    def repo_by_did(self, repo_did: str) -> Repo | None:
        """The served repo record holding ``repo_did``: the first one written.

        Anyone can write a record claiming any repo DID; only records by the
        owner or a member are served, and among those the first owner wins,
        so a later claim cannot take a member's repo (or its pipelines) away.
        """
        return self._kept.get(
            ("repo_by_did", repo_did),
            lambda: fetch_one(Repo, _REPO_BY_DID(), self._served_repos_where(repo_did)),
        )

    def may_push(self, repo: Repo, did: str) -> bool:
        """Push rights: the repo's owner, or a collaborator."""
        return did == repo.did or self.is_collaborator(repo, did)

    def is_collaborator(self, repo: Repo, did: str) -> bool:
        """``did`` was granted ``repo`` by a record its owner wrote, or by its knot."""
        match_repo = Collaborator.repo == repo.at_uri
        if repo.repo_did:
            match_repo |= Collaborator.repo_did == repo.repo_did
        by_record = (
            Collaborator.select()
            .where((Collaborator.did == repo.did) & (Collaborator.subject == did) & match_repo)
            .exists()
        )
        if by_record or not repo.repo_did:
            return by_record
        return (
            KnotCollaborator.select()
            .where(
                (KnotCollaborator.repo_did == repo.repo_did)
                & (KnotCollaborator.subject == did)
                & (KnotCollaborator.knot == repo.knot)
            )
            .exists()
        )
