"""Clients for tack's own surfaces, as the Tangled appview uses them."""

from __future__ import annotations

import json
import struct
import threading
import urllib.request
from dataclasses import dataclass, field

import websocket


class EventsClient:
    """Subscribes to ``/events`` and collects every frame in a background thread."""

    def __init__(self, port: int, cursor: int | None = 1, rcvbuf: int | None = None) -> None:
        query = "" if cursor is None else f"?cursor={cursor}"
        options = {}
        if rcvbuf is not None:
            import socket

            options["sockopt"] = [(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}/events{query}", **options)
        self.frames: list[dict] = []
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> EventsClient:
        self._thread.start()
        return self

    def _read(self) -> None:
        try:
            while True:
                text = self.ws.recv()
                if not text:
                    break
                self.frames.append(json.loads(text))
        except Exception:
            pass
        finally:
            self.closed.set()

    def statuses(self, workflow: str | None = None, pipeline: str | None = None) -> list[str]:
        """Status values in order, of one workflow (and pipeline rkey) or all."""
        return [
            f["event"]["status"]
            for f in self.frames
            if f["nsid"] == "sh.tangled.pipeline.status"
            and (workflow is None or f["event"]["workflow"] == workflow)
            and (pipeline is None or f["event"]["pipeline"].endswith("/" + pipeline))
        ]

    def pipelines(self) -> list[dict]:
        """The ``sh.tangled.pipeline`` frames: pipelines tack compiled."""
        return [f for f in self.frames if f["nsid"] == "sh.tangled.pipeline"]

    def workflow_names(self, index: int = -1) -> list[str]:
        return [w["name"] for w in self.pipelines()[index]["event"]["workflows"]]

    def close(self) -> None:
        self.ws.close()


@dataclass
class LogRead:
    lines: list[dict] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""


def read_log(port: int, path: str, timeout: float = 30.0) -> LogRead:
    """Read a ``/logs`` websocket to its close; the lines and the close code."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=timeout)
    result = LogRead()
    try:
        while True:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                if len(data) >= 2:
                    result.close_code = struct.unpack("!H", data[:2])[0]
                    result.close_reason = data[2:].decode()
                return result
            if opcode == websocket.ABNF.OPCODE_TEXT:
                result.lines.append(json.loads(data))
    finally:
        ws.shutdown()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
