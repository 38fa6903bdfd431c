"""Process-wide logging: one event per line on stderr.

Components log through ``logging.getLogger("tack.<component>")`` and pass the
ids that matter (did, rkey, knot, workflow) as ``extra=``; the JSON formatter
turns those into fields, so every line can be filtered by the id it concerns.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _ComponentFilter(logging.Filter):
    """Expose the logger name without the package prefix as ``component``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = record.name.removeprefix("tack.")
        return True


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ComponentFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(component)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
            )
        )
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (websocket-client's own tracebacks on reconnect) would
    # duplicate what tack already logs with context.
    logging.getLogger("websocket").setLevel(logging.CRITICAL)


def get(component: str) -> logging.Logger:
    return logging.getLogger(f"tack.{component}")
