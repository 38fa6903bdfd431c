"""The ``webhook`` backend: any CI that can receive an HTTP POST and run curl.

tack POSTs a JSON description of the workflow, signed with HMAC-SHA256 over
the body (``X-Tack-Signature: sha256=<hex>``, key from the environment
variable ``secret_env`` names), including a per-workflow bearer token and the
callback URLs. The CI reports back through the callback API (callbacks.py).

Delivery is retried on connection errors and 5xx with backoff; a 4xx, or
running out of attempts, fails the workflow with the reason. The token's
hash and the deadline are saved with the workflow, so a restarted tack
resumes waiting for the CI instead of failing the workflow: the build keeps
running without us.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
import urllib.error
import urllib.request

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from .. import logs
from ..api.callbacks import EARLIER_TOKENS, LAST_SEQ, PREFIX, TOKEN_HASH, Channel, token_hash
from ..store import Workflow
from ..worklogs import SYSTEM_STEP, WorkflowLog
from . import Backend, Context, Job, Outcome
from .command import describe
from .options import Options

log = logs.get("webhook")

SIGNATURE_HEADER = "X-Tack-Signature"


# Backend state: whether the CI acknowledged the delivery (so a resumed
# workflow only waits) or not yet (so it is delivered again).
DELIVERED = "delivered"


class DeliveryError(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookBackend(Backend):
    type_name = "webhook"

    def __init__(self, name: str, options: Options, context: Context) -> None:
        super().__init__(name, options, context)
        self.url = options.url("url", required=True)
        self.secret_env = options.env_name("secret_env", required=True)
        self.timeout = options.number("timeout", 3600, 1, 7 * 86400)
        self.attempts = int(options.number("attempts", 5, 1, 100))
        self.request_timeout = options.number("request_timeout", 10, 1, 300)
        self.retry_initial = options.number("retry_initial", 1, 0.01, 60)
        self.callback_url = options.url("callback_url", context.public_url)

    # --- Backend ------------------------------------------------------------------------

    def run(self, job: Job, log_: WorkflowLog) -> Outcome:
        deadline = time.time() + self.timeout
        job.save_state({"deadline": deadline})
        return self._dispatch_and_await(job, log_, deadline, -1)

    def resume(self, job: Job, log_: WorkflowLog) -> Outcome | None:
        if "deadline" not in job.state:
            return None  # tack stopped before anything was saved
        deadline = float(job.state["deadline"])
        if job.state.get(DELIVERED):
            hub = self.context.callbacks
            channel = hub.open(job.workflow_id, log_, int(job.state.get(LAST_SEQ, -1)))
            try:
                return self._await(job, channel, deadline)
            finally:
                hub.close(job.workflow_id)
        # tack stopped before a delivery succeeded (or before it could record
        # that it did): deliver again. The CI sees the same workflow id and a
        # valid signature; see the README on handling a second delivery.
        return self._dispatch_and_await(job, log_, deadline, int(job.state.get(LAST_SEQ, -1)))

    def _dispatch_and_await(
        self, job: Job, log_: WorkflowLog, deadline: float, last_seq: int
    ) -> Outcome:
        """Deliver with a fresh token (earlier ones stay valid, in case a
        delivery landed before tack could record it), then wait for the CI."""
        token = secrets.token_urlsafe(32)
        earlier = [h for h in (job.state.get(TOKEN_HASH), *job.state.get(EARLIER_TOKENS, [])) if h]
        job.save_state({TOKEN_HASH: token_hash(token), EARLIER_TOKENS: earlier, DELIVERED: False})
        hub = self.context.callbacks
        channel = hub.open(job.workflow_id, log_, last_seq)
        try:
            log_.start_step(0, f"Dispatch to {self.name}", SYSTEM_STEP)
            try:
                status = self._deliver(job, self._payload(job, token))
            except DeliveryError as exc:
                log_.data(0, str(exc), "stderr")
                if job.stopping.is_set():
                    # Retries cut short by our own shutdown: the workflow stays
                    # running, and the next start delivers again.
                    return Outcome("cancelled")
                return Outcome("failed", f"webhook delivery failed: {exc}")
            finally:
                log_.end_step(0, f"Dispatch to {self.name}", SYSTEM_STEP)
            with channel.lock:
                log_.data(
                    0, f"delivered to {self.url} (HTTP {status}); waiting for the CI to report"
                )
                job.save_state({DELIVERED: True})
                hub.checkpoint(job.workflow_id, channel)
            return self._await(job, channel, deadline)
        finally:
            hub.close(job.workflow_id)

    # --- delivery -------------------------------------------------------------------------

    def _payload(self, job: Job, token: str) -> bytes:
        base = f"{self.callback_url}{PREFIX}{job.workflow_id}"
        description = describe(job)
        description["callback"] = {
            "status_url": f"{base}/status",
            "logs_url": f"{base}/logs",
            "token": token,
        }
        return json.dumps(description).encode()

    def _deliver(self, job: Job, body: bytes) -> int:
        secret = os.environ.get(self.secret_env, "").encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(secret, body),
                "User-Agent": "tack-webhook",
            },
        )

        def attempt() -> int:
            try:
                with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                raise DeliveryError(f"HTTP {exc.code} from {self.url}", exc.code >= 500) from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise DeliveryError(f"cannot reach {self.url}: {reason}", True) from None

        retrying = Retrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, DeliveryError) and exc.retryable),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential_jitter(
                multiplier=self.retry_initial, max=30, jitter=self.retry_initial
            ),
            sleep=job.cancel.wait,
            before_sleep=lambda state: _log_retry(job, state),
            reraise=True,
        )
        return retrying(attempt)

    # --- waiting for the CI -----------------------------------------------------------------

    def _await(self, job: Job, channel: Channel, deadline: float) -> Outcome:
        """Until the CI's final status is committed (by the callback API), a
        Tangled cancel, or the deadline."""
        while True:
            row = Workflow.get_by_id(job.workflow_id)
            if row.status not in ("pending", "running"):
                return Outcome(row.status, row.error, row.exit_code)
            if job.cancel.is_set():
                return Outcome("cancelled")
            left = deadline - time.time()
            if left <= 0:
                return Outcome(
                    "timeout", f"the CI reported no final status within {self.timeout:g}s"
                )
            channel.ended.wait(min(left, 0.25))


def _log_retry(job: Job, state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "webhook delivery failed, retrying",
        extra={
            "knot": job.knot,
            "rkey": job.rkey,
            "workflow": job.name,
            "attempt": state.attempt_number,
            "error": str(exc),
        },
    )
