"""A client of tack's ``sh.tangled.ci`` surface written from the lexicons
(``shared/lexicons-2026``), as today's appview calls it: JSON queries and
procedures over HTTP, and ``subscribePipelineLogs`` frames decoded with
cbor2 (not with tack's own encoder)."""

from __future__ import annotations

import io
import json
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlencode

import cbor2
import websocket

CI = "sh.tangled.ci"


class AppviewClient:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.ws_base = f"ws://127.0.0.1:{port}"

    def query(self, method: str, params: list[tuple[str, str]] | dict) -> tuple[int, dict]:
        query = urlencode(params)
        return self._send(urllib.request.Request(f"{self.base}/xrpc/{method}?{query}"))

    def procedure(self, method: str, body: object, token: str | None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.base}/xrpc/{method}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        return self._send(request)

    @staticmethod
    def _send(request: urllib.request.Request) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return response.status, json.loads(body) if body else {}
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def pipelines(self, repo: str, **params: object) -> dict:
        pairs = [("repo", repo)]
        for key, value in params.items():
            values = value if isinstance(value, list) else [value]
            pairs += [(key, str(v)) for v in values]
        status, body = self.query(f"{CI}.queryPipelines", pairs)
        assert status == 200, body
        return body

    def pipeline(self, rkey: str) -> tuple[int, dict]:
        return self.query(f"{CI}.getPipeline", {"pipeline": rkey})

    def subscribe_logs(self, pipeline: str, workflows: list[str] = (), timeout=30) -> LogStream:
        query = urlencode([("pipeline", pipeline), *[("workflows", w) for w in workflows]])
        url = f"{self.ws_base}/xrpc/{CI}.subscribePipelineLogs?{query}"
        return LogStream(websocket.create_connection(url, timeout=timeout))


@dataclass
class LogMessage:
    header: dict
    body: dict


@dataclass
class LogStream:
    """Reads an atproto event stream: every message a binary frame holding a
    DAG-CBOR header then a DAG-CBOR body."""

    ws: websocket.WebSocket
    messages: list[LogMessage] = field(default_factory=list)
    close_code: int | None = None
    text_frames: int = 0

    def read_to_end(self) -> LogStream:
        try:
            while True:
                opcode, data = self.ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self.close_code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                    return self
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    self.text_frames += 1
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    self.messages.append(decode_message(data))
        finally:
            self.ws.shutdown()

    def read_one(self) -> LogMessage:
        while True:
            opcode, data = self.ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_BINARY:
                message = decode_message(data)
                self.messages.append(message)
                return message
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise EOFError("closed")

    def bodies(self, kind: str | None = None) -> list[dict]:
        return [m.body for m in self.messages if kind is None or m.header.get("t") == kind]


def decode_message(data: bytes) -> LogMessage:
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream)
    header = decoder.decode()
    body = decoder.decode()
    assert stream.read() == b"", "nothing after the body"
    return LogMessage(header, body)
