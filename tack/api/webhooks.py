"""CI notifications: ``POST /webhooks/buildkite``.

Buildkite's notification webhooks (https://buildkite.com/docs/apis/webhooks/pipelines)
say a build changed; tack then looks at that build through the API at once
instead of at the next poll. The notification itself is never trusted for
the build's state: it only decides *when* tack asks, so a forged or stale
one can at most cost an API call, and only after it authenticated.

Authentication, as Buildkite documents it, per configured backend:

- ``X-Buildkite-Token``: the webhook's token, compared in constant time;
- ``X-Buildkite-Signature: timestamp=<unix s>,signature=<hex>``: HMAC-SHA256
  with the webhook's secret over ``<timestamp>.<body>``; the timestamp must
  be within the backend's ``webhook_max_age`` of now.

A delivery already accepted is refused when it comes again (a replay of a
captured request), 401 like every other refusal; a refused delivery changes
nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from .. import logs
from ..backends.remote import credential

if TYPE_CHECKING:
    from ..backends.buildkite import BuildkiteBackend
    from .server import Handler

log = logs.get("webhooks")

BUILDKITE_PATH = "/webhooks/buildkite"
MAX_BODY = 4 * 1024 * 1024  # a build with many jobs is large; far more is not Buildkite
MAX_REMEMBERED = 10_000  # accepted deliveries remembered against replays


class Refused(Exception):
    """Not authenticated; the message says why (for the log, not the caller)."""


class BuildkiteWebhooks:
    """The route, for the Buildkite backends that take notifications."""

    def __init__(
        self, backends: list[BuildkiteBackend], clock: Callable[[], float] = time.time
    ) -> None:
        self._backends = backends
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # delivery digest -> forget at
        self._lock = threading.Lock()

    def route(self, handler: Handler, query: dict) -> None:
        raw = handler.read_body(MAX_BODY)
        if raw is None:
            return
        try:
            backend, delivery = self._authenticate(handler.headers, raw)
            self._remember(delivery, backend.webhook_max_age)
        except Refused as exc:
            log.warning("buildkite webhook refused", extra={"reason": str(exc)})
            handler.send_json(HTTPStatus.UNAUTHORIZED, {"error": "Unauthorized"})
            return
        payload = handler.parse_json(raw)
        if payload is None:
            return
        event, key = _build_of(payload)
        if key is None:
            handler.send_json(HTTPStatus.OK, {"event": event, "ignored": True})
            return
        watched = backend.notify(key)
        log.info(
            "buildkite webhook",
            extra={"event": event, "pipeline": key[0], "build": key[1], "watched": watched},
        )
        handler.send_json(HTTPStatus.OK, {"event": event, "watched": watched})

    def _authenticate(
        self, headers: Mapping[str, str], body: bytes
    ) -> tuple[BuildkiteBackend, str]:
        """The backend the delivery is for and its replay digest; Refused
        when it proves itself to none."""
        signature = headers.get("X-Buildkite-Signature")
        token = headers.get("X-Buildkite-Token")
        reason = "no X-Buildkite-Token or X-Buildkite-Signature header"
        for backend in self._backends:
            try:
                if signature is not None and backend.webhook_secret_env:
                    self._check_signature(backend, signature, body)
                    return backend, "sig:" + signature
                if token is not None and backend.webhook_token_env:
                    _check_token(backend, token)
                    return backend, "body:" + hashlib.sha256(body).hexdigest()
            except Refused as exc:
                reason = str(exc)
        raise Refused(reason)

    def _check_signature(self, backend: BuildkiteBackend, header: str, body: bytes) -> None:
        parts = dict(part.strip().partition("=")[::2] for part in header.split(",", 4))
        timestamp, given = parts.get("timestamp", ""), parts.get("signature", "")
        if not timestamp.isdigit() or len(timestamp) > 12 or not given:
            raise Refused("malformed X-Buildkite-Signature")
        if abs(self._clock() - int(timestamp)) > backend.webhook_max_age:
            raise Refused("signature timestamp outside the freshness window")
        secret = (credential(backend.webhook_secret_env) or "").encode()
        expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, given.strip().lower()):
            raise Refused("wrong signature")

    def _remember(self, delivery: str, max_age: float) -> None:
        """Accept each delivery once while it could still be fresh."""
        now = self._clock()
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            if delivery in self._seen:
                raise Refused("replayed delivery")
            self._seen[delivery] = now + 2 * max_age
            if len(self._seen) > MAX_REMEMBERED:
                self._seen.popitem(last=False)


def _check_token(backend: BuildkiteBackend, token: str) -> None:
    expected = credential(backend.webhook_token_env) or ""
    if not expected or not hmac.compare_digest(expected.encode(), token.encode()):
        raise Refused("wrong token")


def _build_of(payload: Any) -> tuple[str, tuple[str, int] | None]:
    """The event and the (pipeline slug, build number) it is about; None for
    events about no build (``ping``) or shapes that are not Buildkite's."""
    if not isinstance(payload, dict):
        return "?", None
    event = payload.get("event")
    event = event[:100] if isinstance(event, str) else "?"
    build, pipeline = payload.get("build"), payload.get("pipeline")
    if not event.startswith(("build.", "job.")):
        return event, None
    if not isinstance(build, dict) or not isinstance(pipeline, dict):
        return event, None
    number, slug = build.get("number"), pipeline.get("slug")
    if isinstance(number, bool) or not isinstance(number, int) or not isinstance(slug, str):
        return event, None
    return event, (slug, number)
