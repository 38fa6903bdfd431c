"""Process-wide logging: one event per line on stderr.

Components log through ``logging.getLogger("tack.<component>")`` and pass the
ids that matter (did, rkey, knot, workflow) as ``extra=``; the JSON formatter
turns those into fields, so every line can be filtered by the id it concerns.

Threads hand their records to one writer thread (``QueueListener``) instead
of formatting and writing them under the handler's lock themselves: with a
line per status, workers spent more time queued on that lock than running
workflows. Records keep their fields; the writer formats them in order.
``stop`` (also run at exit) writes what is still queued.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import queue
import sys
import time
from collections import deque
from logging.handlers import QueueHandler, QueueListener

from pythonjsonlogger.orjson import OrjsonFormatter

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(component)s %(message)s"
# Attributes every LogRecord has: what is left are the ``extra=`` fields.
_RECORD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "component",
}


class _TextFormatter(logging.Formatter):
    """For humans, and still filterable: the message, then each field as
    ``key=value`` (JSON for anything but a plain word)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [
            f"{key}={_plain(value)}"
            for key, value in vars(record).items()
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
        ]
        if not fields:
            return text
        head, newline, rest = text.partition("\n")  # a traceback stays below
        return f"{head} {' '.join(fields)}{newline}{rest}"


def _plain(value: object) -> str:
    if isinstance(value, str) and value and all(c.isalnum() or c in "-_.:/@" for c in value):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


class _JsonFormatter(OrjsonFormatter):
    """The time text made once per second: only the writer thread formats."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second[0]:
            self._second = (second, super().formatTime(record, datefmt))
        return self._second[1]


class _ComponentFilter(logging.Filter):
    """Expose the logger name without the package prefix as ``component``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = record.name.removeprefix("tack.")
        return True


class _Handoff(QueueHandler):
    """Queues the record itself: same process, so nothing needs flattening
    (the standard ``prepare`` folds the traceback into the message)."""

    def handle(self, record: logging.LogRecord) -> bool:
        """``Handler.handle`` without the handler's lock: the queue is safe
        across threads, and the record belongs to the thread logging it.

        The lock made every thread that logs wait in one line. When 2,000
        knot streams dropped at once, each woken waiter had to win the
        interpreter lock before it could pass the handler lock on, and the
        HTTP thread, logging its request, waited seconds behind them.
        """
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.message = record.getMessage()  # the arguments as they are now
        record.msg, record.args = record.message, None
        return record


# After the first line of a quiet spell, the writer waits this long and then
# writes every line that came meanwhile: a pipeline's lines (accepted,
# running, finished) wake the writer thread once, not once each, and every
# wake-up took the interpreter lock from the threads doing the work. A
# warning or an error that opens a burst is written at once.
LINGER_SECONDS = 0.02


class _LingeringListener(QueueListener):
    """The standard writer thread, taking records in bursts (``dequeue`` is
    its documented place for that), in the order they were queued."""

    def __init__(self, records: queue.SimpleQueue, handler: logging.Handler) -> None:
        super().__init__(records, handler)
        self._taken: deque[logging.LogRecord | None] = deque()

    def dequeue(self, block: bool) -> logging.LogRecord | None:
        if not self._taken:
            first = self.queue.get(block)
            if first is not self._sentinel and first.levelno < logging.WARNING:
                time.sleep(LINGER_SECONDS)
            self._taken.append(first)
            with contextlib.suppress(queue.Empty):
                while True:
                    self._taken.append(self.queue.get_nowait())
        return self._taken.popleft()


_listener: QueueListener | None = None


def setup(level: str = "info", fmt: str = "json") -> None:
    global _listener
    stop()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ComponentFilter())
    if fmt == "json":
        handler.setFormatter(
            # orjson: a third of the json module's cost per line, and a line
            # is written for every status of every workflow.
            _JsonFormatter(
                "%(asctime)s %(levelname)s %(component)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
            )
        )
    else:
        handler.setFormatter(_TextFormatter(_TEXT_FORMAT))
    records: queue.SimpleQueue = queue.SimpleQueue()
    _listener = _LingeringListener(records, handler)
    _listener.start()
    # What no line shows is not gathered for every record (the logging
    # HOWTO's "Optimization"): the caller's file and line take a stack walk.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [_Handoff(records)]
    root.setLevel(level.upper())
    # Library chatter (websocket-client's own tracebacks on reconnect) would
    # duplicate what tack already logs with context.
    logging.getLogger("websocket").setLevel(logging.CRITICAL)


def stop() -> None:
    """Write every queued record and stop the writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(stop)


def get(component: str) -> logging.Logger:
    return logging.getLogger(f"tack.{component}")
