"""``sh.tangled.ci.subscribePipelineLogs``: a pipeline's logs as atproto event
stream frames (protocol-2026 §4).

Every message is a binary websocket frame holding two DAG-CBOR maps back to
back: a header ``{op: 1, t: "#control" | "#data"}`` and the body. Each
connection replays every selected workflow's log from its start, then
follows the ones still running, multiplexed in the order lines arrive, and
closes (1000) once every selected workflow is final and all of its log was
sent. Bad parameters, an unknown pipeline or workflow are answered with a
JSON HTTP error before the upgrade, so a client never tails forever.

Encoding is libipld's (canonical DAG-CBOR); the two headers never change, so
they are encoded once.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

import libipld
import orjson

from .. import logs
from ..statuses import FINAL, StatusLog
from ..store import Workflow, release_connection
from ..worklogs import SYSTEM_STEP, LogBook, read_raw_lines
from . import view
from .server import ClientGone, ServerWebSocket, encode_binary_frame

if TYPE_CHECKING:
    from .server import Handler

log = logs.get("logstream")

PATH = "/xrpc/sh.tangled.ci.subscribePipelineLogs"
CONTROL_HEADER = libipld.encode_dag_cbor({"op": 1, "t": "#control"})
DATA_HEADER = libipld.encode_dag_cbor({"op": 1, "t": "#data"})
_TID = re.compile(r"^[A-Za-z0-9._:~-]{1,512}$")
MAX_WORKFLOW_PARAMS = 50


def encode_line(line: bytes, workflow: str) -> bytes | None:
    """One tack log line (JSON) as header + body; None for a line that is not
    one of ours (a torn or foreign line is skipped, never sent half)."""
    try:
        entry = orjson.loads(line)
        if entry["kind"] == "control":
            body = {
                "time": entry["time"],
                "workflow": workflow,
                "step": entry["step_id"],
                "content": entry["content"],
                "status": entry["step_status"],
                "kind": "system" if entry["step_kind"] == SYSTEM_STEP else "user",
            }
            if entry.get("step_command") is not None:
                body["command"] = entry["step_command"]
            return CONTROL_HEADER + libipld.encode_dag_cbor(body)
        body = {
            "time": entry["time"],
            "workflow": workflow,
            "step": entry["step_id"],
            "content": entry["content"] + "\n",
            "stream": entry.get("stream", "stdout"),
        }
        return DATA_HEADER + libipld.encode_dag_cbor(body)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


@dataclass
class _Follow:
    workflow_id: int
    name: str
    path: Path
    offset: int = 0
    done: bool = False


class PipelineLogStream:
    def __init__(self, statuses: StatusLog, logbook: LogBook, stop: threading.Event) -> None:
        self._statuses = statuses
        self._logbook = logbook
        self._stop = stop

    def route(self, handler: Handler, query: dict) -> None:
        follows = self._select(handler, query)
        if follows is None:
            return
        ws = handler.upgrade()
        if ws is None:
            return
        with (
            contextlib.suppress(ClientGone),
            self._logbook.watching(f.workflow_id for f in follows) as grew,
        ):
            self._stream(ws, follows, grew)

    def _select(self, handler: Handler, query: dict) -> list[_Follow] | None:
        """The workflows to follow, or None after answering the error."""
        pipeline = (query.get("pipeline") or [""])[0]
        names = query.get("workflows") or []
        if not _TID.match(pipeline) or len(names) > MAX_WORKFLOW_PARAMS:
            return _refuse(handler, 400, "InvalidRequest", "pipeline must be a pipeline id")
        found = view.by_id(pipeline)
        if found is None:
            return _refuse(handler, 404, "PipelineNotFound", f"no pipeline {pipeline}")
        knot = found.knot
        rows = list(
            Workflow.select(Workflow.id, Workflow.name)
            .where((Workflow.rkey == pipeline) & (Workflow.knot == knot))
            .order_by(Workflow.id)
        )
        known = {row.name for row in rows}
        unknown = [name for name in names if name not in known]
        if unknown:
            return _refuse(handler, 404, "WorkflowNotFound", f"no workflow {unknown[0]!r}")
        wanted = set(names) or known
        return [
            _Follow(row.id, row.name, self._logbook.path(row.id))
            for row in rows
            if row.name in wanted
        ]

    def _stream(self, ws: ServerWebSocket, follows: list[_Follow], grew: threading.Event) -> None:
        statuses_seen = -1
        while not self._stop.is_set():
            ws.poll()
            grew.clear()
            if self._send_new_lines(ws, follows):
                continue
            # Lines are written before a final status commits, so a workflow
            # seen final is drained by one more read, then done.
            if statuses_seen != self._statuses.latest_id:
                statuses_seen = self._statuses.latest_id
                finals = {
                    follow.workflow_id: Workflow.get_by_id(follow.workflow_id).status in FINAL
                    for follow in follows
                    if not follow.done
                }
                release_connection()  # none held while waiting
                for follow in follows:
                    if finals.get(follow.workflow_id):
                        self._send_new_lines(ws, [follow])
                        follow.done = True
                if all(follow.done for follow in follows):
                    ws.close(1000, "pipeline finished")
                    return
            ws.ping_if_due()
            grew.wait(1.0)
        ws.close(1001, "spindle shutting down")

    @staticmethod
    def _send_new_lines(ws: ServerWebSocket, follows: list[_Follow]) -> bool:
        sent = False
        for follow in follows:
            lines, follow.offset = read_raw_lines(follow.path, follow.offset)
            frames = [encode_line(line, follow.name) for line in lines]
            data = b"".join(encode_binary_frame(frame) for frame in frames if frame is not None)
            if data:
                ws.send_encoded(data)
                sent = True
        return sent


def _refuse(handler: Handler, status: int, name: str, message: str) -> None:
    handler.send_json(HTTPStatus(status), {"error": name, "message": message})
    return None
