"""The one retry policy tack uses for I/O: exponential backoff with jitter,
forever, until it works or shutdown is asked for.

Transient failures are never given up on (giving up would mean skipping an
event or dropping a stream); only a shutdown ends the retrying, and the sleep
between attempts wakes at once when it does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential_jitter

from .store import is_transient


def until_stopped(
    stop: threading.Event,
    *,
    retry_if: Callable[[BaseException], bool],
    initial: float,
    cap: float,
    before_sleep: Callable[[RetryCallState], None],
) -> Retrying:
    """A Retrying that re-raises the last error only once ``stop`` is set."""
    return Retrying(
        retry=retry_if_exception(lambda exc: retry_if(exc) and not stop.is_set()),
        # Jitter proportional to the base delay, so sub-second policies stay sub-second.
        wait=wait_exponential_jitter(multiplier=initial, max=cap, jitter=initial),
        stop=lambda state: stop.is_set(),
        sleep=stop.wait,
        before_sleep=before_sleep,
        reraise=True,
    )


class ShutdownDuringRetry(Exception):
    """A transient failure was still unresolved when shutdown was asked for."""


def last_error(state: RetryCallState) -> str:
    exc = state.outcome.exception() if state.outcome else None
    return "" if exc is None else describe_io_error(exc)


def describe_io_error(exc: BaseException) -> str:
    """What went wrong, in the words an operator needs.

    When SQLite finds the disk full it rolls the transaction back itself, and
    peewee's own rollback then fails with "cannot rollback - no transaction
    is active", hiding the cause; the cause is in the exception's context.
    """
    root = exc
    while root.__context__ is not None and "cannot rollback" in str(root):
        root = root.__context__
    text = f"{type(root).__name__}: {root}"
    if "disk is full" in text or "No space left" in text:
        return f"disk is full ({text})"[:300]
    return text[:300]


def store_writes(stop: threading.Event, log: logging.Logger, message: str) -> Callable[..., Any]:
    """Retry a store operation through locks and I/O errors, logging each wait.

    The operation is tried once as it is; only when that fails with a
    transient error is a tenacity policy built and used (building one costs
    more than most store writes).
    """

    def log_wait(state: RetryCallState) -> None:
        log.warning(message, extra={"attempt": state.attempt_number, "error": last_error(state)})

    def call(operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return operation(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc) or stop.is_set():
                raise
            log.warning(message, extra={"attempt": 0, "error": describe_io_error(exc)})
        retrying = until_stopped(
            stop, retry_if=is_transient, initial=0.05, cap=2.0, before_sleep=log_wait
        )
        return retrying(operation, *args, **kwargs)

    return call
