"""Wiring: one process, one database, the threads of every component.

Start-up order matters: the store is migrated before any thread runs, and the
knot side learns the wanted knots before the applier can change them.
Shutdown reverses it, so the applier's last commit (with its cursor) happens
before the database closes.
"""

from __future__ import annotations

import signal
import threading

from . import logs, store
from .config import Config
from .jetstream import Ingester
from .knots import KnotSubscriptions, LoggedKnotSubscriptions
from .stream import Backoff

log = logs.get("service")


class Spindle:
    def __init__(self, config: Config, knots: KnotSubscriptions | None = None) -> None:
        self.config = config
        self.db = store.open_database(config.db_path)
        self.directory = store.Directory(config.hostname, config.owner)
        self.knots = knots if knots is not None else LoggedKnotSubscriptions()
        wanted = self.directory.wanted_knots()
        for knot in sorted(wanted):
            self.knots.add_knot(knot)
        self.ingester = Ingester(
            self.db,
            self.directory,
            self.knots,
            endpoint=config.jetstream_endpoint,
            queue_size=config.queue_size,
            backoff=Backoff(config.reconnect_min, config.reconnect_max),
            known_knots=wanted,
        )

    def start(self) -> None:
        self.ingester.start()
        log.info(
            "tack started",
            extra={
                "hostname": self.config.hostname,
                "owner": self.config.owner,
                "cursor": self.ingester.applier.cursor,
            },
        )

    def stop(self) -> None:
        log.info("tack stopping")
        self.ingester.stop()
        log.info("tack stopped", extra={"cursor": self.ingester.applier.cursor})
        self.db.close()


def run(config: Config) -> int:
    """Run until SIGTERM or SIGINT, then shut down cleanly; the exit status."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    spindle = Spindle(config)
    spindle.start()
    while not stop.wait(1.0):
        pass
    spindle.stop()
    return 0
