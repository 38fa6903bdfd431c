"""What every native CI adapter shares: HTTP, watching a remote run, logs, resume.

An adapter (buildbot.py, buildkite.py, …) only says how its CI does four
things: ``trigger`` a run, take a ``snapshot`` of it (state and the remote
jobs or steps, which become log steps), fetch a unit's ``log_lines`` from an
offset, and ``cancel_remote``. This module turns those into a tack run:

- the remote run's ids are saved with the workflow at once, then how far
  each unit's log was copied together with the log's size at that moment, so
  a restarted tack resumes watching the same run, cuts its log back to that
  size and copies each line exactly once;
- the first log line links to the remote run;
- HTTP goes through ``RemoteHttp``: timeouts, retries with backoff on
  connection errors, 5xx and 429 (honouring ``Retry-After``), and a clear
  error once the retry budget is spent; a malformed answer is an error too,
  never a crash. Credentials come from environment variables and appear in
  no log line and no error.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from .. import logs
from ..workflow import WorkflowError
from ..worklogs import SYSTEM_STEP, USER_STEP, WorkflowLog
from . import Backend, Context, Job, Outcome, provider_options
from .options import Options

log = logs.get("remote")

MAX_RESPONSE = 16 * 1024 * 1024
MAX_RETRY_AFTER = 120.0


class RemoteError(Exception):
    """The CI could not be used; the message says what, fit for the workflow's error."""


class _Retryable(RemoteError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Unit:
    """A remote job or step, shown as one log step."""

    id: str
    name: str
    done: bool
    log_url: str | None = None  # where its log is, when the CI says so per unit


@dataclass
class Snapshot:
    status: str  # pending | running | success | failed | timeout | cancelled
    units: list[Unit] = field(default_factory=list)
    error: str | None = None
    exit_code: int | None = None

    @property
    def final(self) -> bool:
        return self.status not in ("pending", "running")


CREDENTIAL_HEADERS = ("authorization", "private-token")


class _NoCredentialsElsewhere(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but send credentials only to the host they are for.

    urllib would copy them onto the new request; a CI that redirects a log
    download to blob storage must not receive the API token there.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if (
            new is not None
            and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc
        ):
            for name in list(new.headers):
                if name.lower() in CREDENTIAL_HEADERS:
                    del new.headers[name]
        return new


_opener = urllib.request.build_opener(_NoCredentialsElsewhere)


class RemoteHttp:
    """JSON over HTTP with the retry policy every adapter needs."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        *,
        attempts: int,
        timeout: float,
        backoff: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: how to trust the server (a private CA); default: the system's."""
        self.base_url = base_url.rstrip("/")
        self._headers = headers
        self._attempts = attempts
        self._timeout = timeout
        self._backoff = backoff
        self._opener = _opener
        if tls is not None:
            self._opener = urllib.request.build_opener(
                _NoCredentialsElsewhere, urllib.request.HTTPSHandler(context=tls)
            )

    def json(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        """``text``'s answer as JSON (None when empty); the same arguments."""
        text = self.text(method, path, *args, **kwargs)
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise RemoteError(f"malformed response to {method} {path}: not JSON") from None

    def text(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict | None = None,
        cancel=None,
        content_type: str = "application/json",
    ) -> str:
        url = self.base_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        where = f"{method} {path}"

        def attempt() -> str:
            try:
                with self._opener.open(request, timeout=self._timeout) as response:
                    raw = response.read(MAX_RESPONSE + 1)
            except urllib.error.HTTPError as exc:
                retry_after = _retry_after(exc.headers.get("Retry-After"))
                if exc.code == 429 or exc.code >= 500:
                    raise _Retryable(f"{where}: HTTP {exc.code}", retry_after) from None
                raise RemoteError(f"{where}: HTTP {exc.code}") from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise _Retryable(f"{where}: cannot connect ({reason})") from None
            if len(raw) > MAX_RESPONSE:
                raise RemoteError(f"{where}: response larger than {MAX_RESPONSE} bytes")
            return raw.decode("utf-8", errors="replace")

        retrying = Retrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, _Retryable)),
            stop=stop_after_attempt(self._attempts),
            wait=self._wait,
            sleep=cancel.wait if cancel is not None else time.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _Retryable as exc:
            raise RemoteError(f"{exc} (gave up after {self._attempts} attempts)") from None

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER)
        return min(self._backoff * 2 ** (state.attempt_number - 1), 60.0)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0
    log.warning(
        "CI API call failed, retrying",
        extra={"attempt": state.attempt_number, "error": str(exc), "retry_in_s": round(delay, 2)},
    )


def credential(env_name: str | None) -> str | None:
    return os.environ.get(env_name) if env_name else None


class RemoteCI(Backend):
    """Base of the native adapters; see the module docstring."""

    def __init__(self, name: str, options: Options, context: Context) -> None:
        super().__init__(name, options, context)
        self.timeout = options.number("timeout", 3600, 1, 7 * 86400)
        self.poll_interval = options.number("poll_interval", 5, 0.05, 600)
        self.attempts = int(options.number("attempts", 5, 1, 100))
        self.request_timeout = options.number("request_timeout", 30, 1, 300)
        self.retry_initial = options.number("retry_initial", 1, 0.01, 60)
        self._watched: dict[Hashable, threading.Event] = {}  # watch key -> its run's news
        self._watched_lock = threading.Lock()

    def http(
        self, base_url: str, headers: dict[str, str], tls: ssl.SSLContext | None = None
    ) -> RemoteHttp:
        return RemoteHttp(
            base_url,
            headers,
            attempts=self.attempts,
            timeout=self.request_timeout,
            backoff=self.retry_initial,
            tls=tls,
        )

    # --- what an adapter implements ---------------------------------------------------

    def trigger(self, job: Job) -> dict[str, Any]:
        """Start the remote run; the ids needed to find it again (JSON-able), with
        ``web_url`` for the log's first line."""
        raise NotImplementedError

    def snapshot(self, job: Job, run: dict[str, Any]) -> Snapshot:
        raise NotImplementedError

    def log_lines(
        self, job: Job, run: dict[str, Any], unit: Unit, offset: int
    ) -> tuple[list[tuple[str, str]], int]:
        """Complete ``(stream, line)`` pairs of ``unit``'s log from ``offset`` on, and
        the offset after them (the adapter decides what an offset counts)."""
        raise NotImplementedError

    def cancel_remote(self, job: Job, run: dict[str, Any]) -> None:
        raise NotImplementedError

    # --- Backend ------------------------------------------------------------------------

    def run(self, job: Job, workflow_log: WorkflowLog) -> Outcome:
        workflow_log.start_step(0, f"Trigger {self.name}", SYSTEM_STEP)
        try:
            run = self.trigger(job)
        except (RemoteError, WorkflowError) as exc:
            workflow_log.data(0, str(exc), "stderr")
            workflow_log.end_step(0, f"Trigger {self.name}", SYSTEM_STEP)
            return Outcome("failed", f"{self.name}: {exc}")
        workflow_log.data(0, f"{self.type_name} run: {run.get('web_url', '(no link)')}")
        workflow_log.end_step(0, f"Trigger {self.name}", SYSTEM_STEP)
        state = {"run": run, "deadline": time.time() + self.timeout, "logs": {}}
        job.save_state(workflow_log.checkpoint(state))
        return self._watch(job, workflow_log, state)

    def resume(self, job: Job, workflow_log: WorkflowLog) -> Outcome | None:
        if "run" not in job.state:
            return None  # stopped before the run was triggered
        workflow_log.data(
            0, f"tack restarted; watching {job.state['run'].get('web_url', 'the run')} again"
        )
        return self._watch(job, workflow_log, dict(job.state))

    def watch_key(self, run: dict[str, Any]) -> Hashable | None:
        """What a CI's notification names a run by (an adapter that takes
        notifications says); None: this run is only polled."""
        return None

    def notify(self, key: Hashable) -> bool:
        """A CI says the run ``key`` changed: look at it now rather than at
        the next poll. False when no run of this backend has that key."""
        with self._watched_lock:
            news = self._watched.get(key)
        if news is not None:
            news.set()
        return news is not None

    def _watch(self, job: Job, workflow_log: WorkflowLog, state: dict) -> Outcome:
        key = self.watch_key(state["run"])
        if key is None:
            return self._follow(job, workflow_log, state)
        with self._watched_lock:
            self._watched[key] = job.cancel.news
        try:
            return self._follow(job, workflow_log, state)
        finally:
            with self._watched_lock:
                self._watched.pop(key, None)

    def _follow(self, job: Job, workflow_log: WorkflowLog, state: dict) -> Outcome:
        run = state["run"]
        while True:
            # Cleared before looking, so news that comes while we look
            # cuts the next wait short instead of being lost.
            job.cancel.news.clear()
            if job.cancel.is_set():
                if not job.stopping.is_set():  # a Tangled cancel, not our shutdown
                    self._cancel(job, run)
                return Outcome("cancelled")
            try:
                snapshot = self.snapshot(job, run)
                if self._copy_logs(job, workflow_log, state, snapshot):
                    # Offsets and the log size saved together: after a crash
                    # the log is cut back to this size and copying goes on from
                    # these offsets, so each remote line lands exactly once.
                    job.save_state(workflow_log.checkpoint(state))
            except RemoteError as exc:
                workflow_log.error(str(exc), f"{self.name} API")
                return Outcome("failed", f"{self.name}: {exc}")
            if snapshot.final:
                return Outcome(snapshot.status, snapshot.error, snapshot.exit_code)
            if time.time() > state["deadline"]:
                self._cancel(job, run)
                return Outcome(
                    "timeout", f"the {self.type_name} run did not finish within {self.timeout:g}s"
                )
            job.cancel.news.wait(self.poll_interval)

    def _cancel(self, job: Job, run: dict) -> None:
        try:
            self.cancel_remote(job, run)
        except RemoteError as exc:
            log.warning("remote cancel failed", extra={"workflow": job.name, "error": str(exc)})

    def _copy_logs(
        self, job: Job, workflow_log: WorkflowLog, state: dict, snapshot: Snapshot
    ) -> bool:
        """Bring each unit's new log text over as lines of its step; True if anything moved."""
        moved = False
        for index, unit in enumerate(snapshot.units, start=1):
            progress = state["logs"].setdefault(
                unit.id, {"offset": 0, "started": False, "ended": False}
            )
            if progress["ended"]:
                continue
            if not progress["started"]:
                workflow_log.start_step(index, unit.name, USER_STEP)
                progress["started"] = moved = True
            lines, offset = self.log_lines(job, state["run"], unit, progress["offset"])
            for stream, line in lines:
                workflow_log.data(index, line, stream)
            if offset != progress["offset"]:
                progress["offset"] = offset
                moved = True
            if unit.done:
                workflow_log.end_step(index, unit.name, USER_STEP)
                progress["ended"] = moved = True
        return moved


# --- reading vendors' JSON: every shape mistake is a RemoteError, never a crash


def field_of(item: Any, key: str, kind: type) -> Any:
    value = item.get(key) if isinstance(item, dict) else None
    if kind is int and isinstance(value, bool):
        value = None
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # ids some APIs send as numbers
    if not isinstance(value, kind):
        raise RemoteError(f"malformed answer: {key} missing or not {kind.__name__}")
    return value


def items_of(item: Any, key: str) -> list[dict]:
    value = item.get(key) if isinstance(item, dict) else item if key == "" else None
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise RemoteError(f"malformed answer: {key or 'body'} is not a list of objects")
    return value


def extra_properties(job: Job, key: str) -> dict[str, str]:
    """Extra values a workflow file gives its CI under ``<key>:`` (or ``tack.<key>``).

    ``properties`` (Buildbot), ``variables`` (GitLab) or ``env`` (Buildkite),
    each a mapping of names to values.
    """
    section = provider_options(job, key)
    values = section.get("properties") or section.get("variables") or section.get("env") or {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise WorkflowError(f"{key}: properties must be a mapping of names to values")
    return {k: str(v) for k, v in values.items()}


def new_lines(text: str, offset: int, done: bool) -> tuple[list[tuple[str, str]], int]:
    """Lines of a growing log text after character ``offset``: only complete ones
    while the unit runs (the last may still be written), all once it is done."""
    fresh = text[offset:]
    if not done:
        fresh = fresh[: fresh.rfind("\n") + 1]
    return [("stdout", line) for line in fresh.splitlines()], offset + len(fresh)
