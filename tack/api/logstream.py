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
from http import HTTPStatus
from typing import TYPE_CHECKING

import libipld
import msgspec

from .. import logs
from ..store import Workflow
from ..worklogs import SYSTEM_STEP
from . import view
from .follow import Follow, LogFollower
from .sockets import ClientGone, encode_binary_frame

if TYPE_CHECKING:
    from .server import Handler

log = logs.get("logstream")

PATH = "/xrpc/sh.tangled.ci.subscribePipelineLogs"
CONTROL_HEADER = libipld.encode_dag_cbor({"op": 1, "t": "#control"})
DATA_HEADER = libipld.encode_dag_cbor({"op": 1, "t": "#data"})
_TID = re.compile(r"^[A-Za-z0-9._:~-]{1,512}$")
MAX_WORKFLOW_PARAMS = 50


class _LogLine(msgspec.Struct):
    """A line of tack's own workflow log (``worklogs``), as this stream reads
    it: typed decoding is a fifth cheaper than a dict, on every line of a
    million-line replay."""

    kind: str
    time: str
    step_id: int
    content: str
    stream: str = "stdout"
    step_status: str | None = None  # control lines
    step_kind: int | None = None  # control lines
    step_command: str | None = None


_read_log_line = msgspec.json.Decoder(_LogLine).decode


def encode_line(line: bytes, workflow: str) -> bytes | None:
    """One tack log line (JSON) as header + body; None for a line that is not
    one of ours (a torn or foreign line is skipped, never sent half)."""
    try:
        entry = _read_log_line(line)
    except msgspec.MsgspecError:
        return None
    if entry.kind == "control":
        if entry.step_status is None or entry.step_kind is None:
            return None
        body = {
            "time": entry.time,
            "workflow": workflow,
            "step": entry.step_id,
            "content": entry.content,
            "status": entry.step_status,
            "kind": "system" if entry.step_kind == SYSTEM_STEP else "user",
        }
        if entry.step_command is not None:
            body["command"] = entry.step_command
        return CONTROL_HEADER + libipld.encode_dag_cbor(body)
    body = {
        "time": entry.time,
        "workflow": workflow,
        "step": entry.step_id,
        "content": entry.content + "\n",
        "stream": entry.stream,
    }
    return DATA_HEADER + libipld.encode_dag_cbor(body)


def encode_frame(line: bytes, workflow: str) -> bytes | None:
    """One log line as the binary websocket frame the subscription sends."""
    payload = encode_line(line, workflow)
    return None if payload is None else encode_binary_frame(payload)


class PipelineLogStream:
    def __init__(self, follower: LogFollower) -> None:
        self._follower = follower

    def route(self, handler: Handler, query: dict) -> None:
        follows = self._select(handler, query)
        if follows is None:
            return
        ws = handler.upgrade()
        if ws is None:
            return
        with contextlib.suppress(ClientGone):
            self._follower.stream(ws, follows, encode_frame, "pipeline finished")

    def _select(self, handler: Handler, query: dict) -> list[Follow] | None:
        """The workflows to follow, or None after answering the error."""
        pipeline = (query.get("pipeline") or [""])[0]
        names = query.get("workflows") or []
        if not _TID.match(pipeline) or len(names) > MAX_WORKFLOW_PARAMS:
            return _refuse(handler, 400, "InvalidRequest", "pipeline must be a pipeline id")
        found = view.by_id(pipeline)
        if found is None:
            return _refuse(handler, 404, "PipelineNotFound", f"no pipeline {pipeline}")
        rows = list(
            Workflow.select(Workflow.id, Workflow.name)
            .where((Workflow.rkey == pipeline) & (Workflow.knot == found.knot))
            .order_by(Workflow.id)
        )
        known = {row.name for row in rows}
        unknown = [name for name in names if name not in known]
        if unknown:
            return _refuse(handler, 404, "WorkflowNotFound", f"no workflow {unknown[0]!r}")
        wanted = set(names) or known
        return [self._follower.follow(row.id, row.name) for row in rows if row.name in wanted]


def _refuse(handler: Handler, status: int, name: str, message: str) -> None:
    handler.send_json(HTTPStatus(status), {"error": name, "message": message})
    return None
