"""The CI callback API: how a CI that got a webhook reports back.

``POST /ci/v1/workflows/<id>/status`` and ``POST /ci/v1/workflows/<id>/logs``,
each with ``Authorization: Bearer <token>``, the per-workflow token sent in
the webhook. Everything here is untrusted input: bodies are size-limited and
type-checked in full before anything is written, tokens are compared in
constant time against a hash (the token itself is never stored), and a
refused call changes nothing.

A final status is recorded here, in the request, so the answer reflects what
was committed; the waiting backend only learns that it may stop waiting.
Final is final: repeating the same final status is answered 200 without a
change, a different one 409.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from .. import logs, retry
from ..statuses import FINAL, RUNNING, StatusLog
from ..store import Workflow, merge_backend_state
from ..worklogs import MAX_CONTENT, USER_STEP, WorkflowLog, masker

if TYPE_CHECKING:
    from .server import Handler

log = logs.get("callbacks")

PREFIX = "/ci/v1/workflows/"
_PATH = re.compile(r"^/ci/v1/workflows/(?P<id>[0-9]{1,12})/(?P<what>status|logs)$")
MAX_STATUS_BODY = 8 * 1024
MAX_LOGS_BODY = 1024 * 1024
MAX_LINES = 1000
REPORTABLE = frozenset({RUNNING}) | FINAL
LAST_SEQ = "last_seq"  # backend-state key: the highest logs ``seq`` written


# Backend state keys: the hash of the newest callback token, and of earlier
# ones still accepted (a redelivery after a crash mints a new token, but the
# CI may hold the one before it).
TOKEN_HASH = "token_sha256"
EARLIER_TOKENS = "earlier_token_sha256"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Channel:
    """A running webhook workflow: its log, and the signal that it ended.

    ``lock`` serialises everything that writes to the log and checkpoints it,
    so a saved (log size, last seq) pair always describes the same moment.
    """

    def __init__(self, workflow_log: WorkflowLog, last_seq: int = -1) -> None:
        self.log = workflow_log
        self.ended = threading.Event()
        self.last_seq = last_seq
        self.lock = threading.Lock()


class CallbackHub:
    def __init__(
        self,
        statuses: StatusLog,
        stop: threading.Event,
        secrets_of: Callable[[int], Iterable[str]] = lambda workflow_id: (),
    ) -> None:
        """``secrets_of(workflow_id)``: the secret values to mask in what a
        CI reports for that workflow (its error text reaches /events)."""
        self._statuses = statuses
        self._stop = stop
        self._secrets_of = secrets_of
        self._channels: dict[int, Channel] = {}
        self._lock = threading.Lock()

    # --- the backend's side ---------------------------------------------------------------

    def open(self, workflow_id: int, workflow_log: WorkflowLog, last_seq: int = -1) -> Channel:
        channel = Channel(workflow_log, last_seq)
        with self._lock:
            self._channels[workflow_id] = channel
        return channel

    def checkpoint(self, workflow_id: int, channel: Channel) -> None:
        """Save the log's size and the last accepted ``seq`` into the
        workflow's backend state (merged: the token hash stays). After a
        crash the log is cut back to this size, so a batch the CI retries is
        written once: either it is past the checkpoint (cut, then accepted
        again) or its seq is recorded (answered as a duplicate)."""

        changes = channel.log.checkpoint({LAST_SEQ: channel.last_seq})
        retry.store_writes(self._stop, log, "store busy, retrying log checkpoint")(
            merge_backend_state, workflow_id, changes
        )

    def close(self, workflow_id: int) -> None:
        with self._lock:
            self._channels.pop(workflow_id, None)

    # --- the HTTP side ----------------------------------------------------------------------

    def route(self, handler: Handler, query: dict) -> None:
        match = _PATH.match(handler.path.split("?", 1)[0])
        if not match:
            _error(handler, HTTPStatus.NOT_FOUND, "NotFound", "no such callback")
            return
        workflow_id = int(match["id"])
        limit = MAX_STATUS_BODY if match["what"] == "status" else MAX_LOGS_BODY
        workflow = Workflow.get_or_none(Workflow.id == workflow_id)
        # The token comes first, before the body is read or parsed. An
        # unknown workflow is refused like a wrong token: the answer must not
        # tell which workflow ids exist. The unread body ends the connection.
        if workflow is None or not _token_matches(handler, workflow):
            log.warning("callback refused: bad token", extra={"workflow_id": workflow_id})
            handler.close_connection = True
            _error(handler, HTTPStatus.UNAUTHORIZED, "Unauthorized", "missing or wrong token")
            return
        raw = handler.read_body(limit)
        if raw is None:
            return
        body = handler.parse_json(raw)
        if body is None:
            return
        if match["what"] == "status":
            self._status(handler, workflow, body)
        else:
            self._logs(handler, workflow, body)

    def _status(self, handler: Handler, workflow: Workflow, body: Any) -> None:
        problem = _check_status_body(body)
        if problem:
            _error(handler, HTTPStatus.BAD_REQUEST, "InvalidRequest", problem)
            return
        status = body["status"]
        error = body.get("error")
        if error is not None:
            error = masker(self._secrets_of(workflow.id))(error)

        def record() -> tuple[bool, str]:
            with self._statuses.writing() as statuses:
                changed = statuses.append(workflow, status, error, body.get("exitCode"))
                return changed, Workflow.get_by_id(workflow.id).status

        changed, current = retry.store_writes(self._stop, log, "store busy, retrying callback")(
            record
        )
        if not changed and current != status:
            _error(
                handler,
                HTTPStatus.CONFLICT,
                "InvalidTransition",
                f"workflow is {current}; cannot become {status}",
            )
            return
        if status in FINAL:
            with self._lock:
                channel = self._channels.get(workflow.id)
            if channel:
                channel.ended.set()
        handler.send_json(HTTPStatus.OK, {"status": current, "changed": changed})

    def _logs(self, handler: Handler, workflow: Workflow, body: Any) -> None:
        problem = _check_logs_body(body)
        if problem:
            _error(handler, HTTPStatus.BAD_REQUEST, "InvalidRequest", problem)
            return
        with self._lock:
            channel = self._channels.get(workflow.id)
        if workflow.status in FINAL:
            _error(handler, HTTPStatus.CONFLICT, "InvalidTransition", "workflow is final")
            return
        if channel is None:
            # Not final, but no backend is attached: tack is restarting, or a
            # worker has yet to take the workflow up again. Transient; a CI
            # that retries gets its lines in once the worker is back.
            handler.send_json(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": "NotReady", "message": "workflow is being resumed; retry shortly"},
                {"Retry-After": "1"},
            )
            return
        with channel.lock:
            seq = body.get("seq")
            if seq is not None and seq <= channel.last_seq:
                handler.send_json(HTTPStatus.OK, {"written": 0, "duplicate": True})
                return
            for line in body["lines"]:
                _write_line(channel.log, line)
            if seq is not None:
                channel.last_seq = seq
            self.checkpoint(workflow.id, channel)
        handler.send_json(HTTPStatus.OK, {"written": len(body["lines"])})


def _token_matches(handler: Handler, workflow: Workflow) -> bool:
    header = handler.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme != "Bearer" or not token:
        return False
    given = token_hash(token.strip())
    state = workflow.state
    accepted = [state.get(TOKEN_HASH, ""), *state.get(EARLIER_TOKENS, [])]
    # Every candidate is compared, so the time taken says nothing about which matched.
    matches = [bool(expected) and hmac.compare_digest(given, expected) for expected in accepted]
    return any(matches)


def _check_status_body(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "body must be a JSON object"
    unknown = set(body) - {"status", "error", "exitCode"}
    if unknown:
        return f"unknown field {sorted(unknown)[0]!r}"
    if body.get("status") not in REPORTABLE:
        return f"status must be one of {', '.join(sorted(REPORTABLE))}"
    error = body.get("error")
    if error is not None and (not isinstance(error, str) or len(error) > 2000):
        return "error must be a string of at most 2000 characters"
    code = body.get("exitCode")
    if code is not None and (
        isinstance(code, bool) or not isinstance(code, int) or not -(2**31) <= code < 2**31
    ):
        return "exitCode must be an integer"
    return None


def _check_logs_body(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "body must be a JSON object"
    seq = body.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
        return "seq must be a non-negative integer"
    lines = body.get("lines")
    if not isinstance(lines, list) or not 0 < len(lines) <= MAX_LINES:
        return f"lines must be a list of 1 to {MAX_LINES} items"
    for index, line in enumerate(lines):
        problem = _check_line(line)
        if problem:
            return f"lines[{index}]: {problem}"
    return None


def _check_line(line: Any) -> str | None:
    if not isinstance(line, dict):
        return "must be an object"
    step_id = line.get("step_id", 0)
    if isinstance(step_id, bool) or not isinstance(step_id, int) or not 0 <= step_id < 10_000:
        return "step_id must be an integer from 0 to 9999"
    if "step_status" in line:
        if line["step_status"] not in ("start", "end"):
            return "step_status must be start or end"
        name = line.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 256:
            return "a step marker needs a name of 1 to 256 characters"
        command = line.get("command")
        if command is not None and (not isinstance(command, str) or len(command) > MAX_CONTENT):
            return "command must be a string"
        return None
    content = line.get("content")
    if not isinstance(content, str) or len(content) > MAX_CONTENT:
        return f"content must be a string of at most {MAX_CONTENT} characters"
    if line.get("stream", "stdout") not in ("stdout", "stderr"):
        return "stream must be stdout or stderr"
    return None


def _write_line(workflow_log: WorkflowLog, line: dict) -> None:
    step_id = line.get("step_id", 0)
    if line.get("step_status") == "start":
        workflow_log.start_step(step_id, line["name"], USER_STEP, line.get("command"))
    elif line.get("step_status") == "end":
        workflow_log.end_step(step_id, line["name"], USER_STEP)
    else:
        workflow_log.data(step_id, line["content"], line.get("stream", "stdout"))


def _error(handler: Handler, status: int, name: str, message: str) -> None:
    handler.send_json(status, {"error": name, "message": message})
