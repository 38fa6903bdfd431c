"""Start-up: claim the port and the database before touching anything.

Order matters. tack first binds its listen socket (a port in use or an
address that does not resolve stops it before any file is made), then takes
an exclusive lock beside the database (a second tack on the same database
stops here, before it could take the first one's running workflows for
crashed ones), and only then opens, creates or migrates the database and the
log directory. Every failure here is one line naming the setting and what is
wrong, and exit status 2 (``StartupError`` is a ``ConfigError``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import socket
from pathlib import Path

import peewee

from .config import ConfigError


class StartupError(ConfigError):
    """tack cannot start as configured; the message names the setting."""


def bind_listener(listen: tuple[str, int], server_class: type, handler: type):
    """An HTTP server bound to ``listen`` (IPv4, IPv6 or a name).

    The soft limit on open descriptors is raised to the hard one first: a
    spindle holds a socket per knot and per subscriber.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port = listen
    setting = "SPINDLE_SERVER_LISTEN_ADDR"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(setting, f"cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    bound_class = type(server_class.__name__, (server_class,), {"address_family": family})
    try:
        return bound_class(address[:2], handler)
    except OSError as exc:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise StartupError(setting, f"cannot listen on {shown}: {exc.strerror}") from None


class DatabaseLock:
    """An exclusive ``flock`` on ``<database>.lock``, holding the owner's PID."""

    def __init__(self, db_path: str) -> None:
        self.path = Path(f"{db_path}.lock")
        setting = "SPINDLE_SERVER_DB_PATH"
        folder = self.path.parent
        if not folder.is_dir():
            raise StartupError(setting, f"the folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StartupError(setting, f"the folder {folder} is not writable")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StartupError(setting, f"cannot open {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise StartupError(
                setting,
                f"{db_path} is in use by another tack (PID {holder}); only one may use a database",
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def open_store(db_path: str, open_database):
    """``open_database(db_path)``, its failures told as the setting's problem."""
    setting = "SPINDLE_SERVER_DB_PATH"
    path = Path(db_path)
    if path.exists() and not path.is_file():
        raise StartupError(setting, f"{db_path} is not a file")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StartupError(setting, f"{db_path} is not readable and writable")
    try:
        return open_database(db_path)
    except peewee.DatabaseError as exc:
        text = str(exc)
        if "not a database" in text:
            raise StartupError(setting, f"{db_path} is not a SQLite database") from None
        if "readonly" in text or "read-only" in text:
            raise StartupError(setting, f"{db_path} is read-only") from None
        raise StartupError(setting, f"cannot open {db_path}: {text}") from None


def check_log_dir(log_dir: str) -> None:
    path = Path(log_dir)
    setting = "SPINDLE_SERVER_LOG_DIR"
    if path.exists() and not path.is_dir():
        raise StartupError(setting, f"{log_dir} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(setting, f"cannot create {log_dir}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(setting, f"{log_dir} is not writable")
