"""``tack <command>``: what an operator does beside a running tack.

The commands read the database and log paths from the same environment
variables as the service (SPINDLE_SERVER_DB_PATH, SPINDLE_SERVER_LOG_DIR),
so on the service's host they need no configuration of their own; they do
not take the service's lock and may run while it does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import config, retention, store
from .startup import StartupError
from .worklogs import LogBook


def open_existing(db_path: str) -> None:
    """Open tack's database for a command; never create one by mistake."""
    if not Path(db_path).is_file():
        where = os.path.abspath(db_path)
        raise StartupError("SPINDLE_SERVER_DB_PATH", f"no database at {where}")
    store.open_database(db_path)


def prune(days: float | None, as_json: bool) -> int:
    db_path = config.read_setting("SPINDLE_SERVER_DB_PATH")
    log_dir = config.read_setting("SPINDLE_SERVER_LOG_DIR")
    if days is None:
        days = config.read_setting("TACK_RETENTION_DAYS")
    open_existing(db_path)
    done = retention.prune(LogBook(log_dir), days)
    if as_json:
        print(json.dumps(vars(done) | {"retention_days": days}))
    elif days <= 0:
        print("retention is off (0 days): nothing pruned")
    else:
        print(
            f"pruned {done.workflows} workflows finished more than {days:g} days ago:"
            f" {done.log_files} log files and {done.status_events} status events deleted"
        )
    return 0
