"""Repo secrets, encrypted at rest.

Values are sealed with Fernet (AES-CBC + HMAC, from ``cryptography``) before
they reach SQLite, so a copy of the database alone reveals nothing. The key
comes from ``TACK_SECRETS_KEY`` or a key file tack creates (mode 0600) on
first start. Several comma-separated keys may be given: the first seals, all
open, and on start every value is re-sealed with the first, which is how a
key is rotated. A value leaves this module only to be injected into its own
repo's workflows; it is never logged, listed or put in an error.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import peewee
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from . import logs
from .config import ConfigError
from .store import KeptAnswers, Secret, compile_once

log = logs.get("secrets")
T = TypeVar("T")

KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_KEY = 50
MAX_VALUE = 200
MAX_SECRETS_PER_REPO = 100


class TooManySecrets(Exception):
    """The repo holds as many secrets as one repo may."""


class DuplicateSecret(Exception):
    pass


def load_keys(env_value: str | None, key_file: str) -> MultiFernet:
    """The configured keys, creating the key file on first start if none are set."""
    if env_value:
        raw_keys = [part.strip() for part in env_value.split(",") if part.strip()]
        source = "TACK_SECRETS_KEY"
    else:
        raw_keys = [_read_or_create(key_file)]
        source = "TACK_SECRETS_KEY_FILE"
    try:
        return MultiFernet([Fernet(key.encode()) for key in raw_keys])
    except (ValueError, TypeError):
        raise ConfigError(
            source, "must hold Fernet keys (32 url-safe base64-encoded bytes)"
        ) from None


def rotation_requested(env_value: str | None) -> bool:
    """Several keys configured: re-seal everything with the first on start.

    With one key there is nothing to do, and re-sealing anyway would rewrite
    every secret on every start (Fernet output differs each time).
    """
    return bool(env_value) and len([k for k in env_value.split(",") if k.strip()]) > 1


def _read_or_create(path: str) -> str:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError("TACK_SECRETS_KEY_FILE", f"cannot read {path}: {exc.strerror}") from None
    key = Fernet.generate_key().decode()
    try:
        # O_EXCL: never overwrite a key another process just made.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_or_create(path)
    except OSError as exc:
        raise ConfigError(
            "TACK_SECRETS_KEY_FILE", f"cannot create {path}: {exc.strerror}"
        ) from None
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    log.warning(
        "created a new secrets key file; back it up with the database", extra={"path": path}
    )
    return key


def _writing(method: Callable[..., T]) -> Callable[..., T]:
    """A ``SecretStore`` method that writes secrets: the sealed rows kept in
    memory are forgotten after it, whether it wrote or failed."""

    @functools.wraps(method)
    def write(self: SecretStore, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        finally:
            self._sealed.changed()

    return write


class SecretStore:
    """Secrets sealed at rest. Only this object writes them, so it keeps each
    repo's sealed rows in memory between its own writes (a workflow's start
    read them back from the file otherwise); values are unsealed per use."""

    def __init__(self, db: peewee.Database, keys: MultiFernet) -> None:
        self._db = db
        self._keys = keys
        self._sealed = KeptAnswers(limit=1024)

    @_writing
    def rotate(self) -> int:
        """Re-seal every value with the first key; the count re-sealed."""
        count = 0
        with self._db.atomic():
            for row in Secret.select():
                try:
                    sealed = self._keys.rotate(bytes(row.value))
                except InvalidToken:
                    log.error(
                        "a secret cannot be opened with the configured keys",
                        extra={"repo": row.repo, "key": row.key},
                    )
                    continue
                if sealed != bytes(row.value):
                    Secret.update(value=sealed).where(
                        (Secret.repo == row.repo) & (Secret.key == row.key)
                    ).execute()
                    count += 1
        return count

    @_writing
    def add(self, repo: str, key: str, value: str, created_by: str) -> None:
        with self._db.atomic():
            if Secret.get_or_none((Secret.repo == repo) & (Secret.key == key)):
                raise DuplicateSecret(key)
            if Secret.select().where(Secret.repo == repo).count() >= MAX_SECRETS_PER_REPO:
                raise TooManySecrets(MAX_SECRETS_PER_REPO)
            Secret.create(
                repo=repo,
                key=key,
                value=self._keys.encrypt(value.encode()),
                created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                created_by=created_by,
            )

    @_writing
    def remove(self, repo: str, key: str) -> bool:
        return bool(Secret.delete().where((Secret.repo == repo) & (Secret.key == key)).execute())

    def listing(self, repo: str) -> list[dict]:
        """What the appview may see: never values."""
        rows = Secret.select().where(Secret.repo == repo).order_by(Secret.key)
        return [
            {"repo": r.repo, "key": r.key, "createdAt": r.created_at, "createdBy": r.created_by}
            for r in rows
        ]

    def values(self, repo: str) -> dict[str, str]:
        """Key to value, for injecting into that repo's workflows only."""
        result = {}
        for key, value in self._sealed.get((repo,), lambda: _sealed_values(repo)):
            try:
                result[key] = self._keys.decrypt(value).decode()
            except InvalidToken:
                log.error(
                    "a secret cannot be opened with the configured keys; not injected",
                    extra={"repo": repo, "key": key},
                )
        return result


def _sealed_values(repo: str) -> tuple[tuple[str, bytes], ...]:
    """(key, sealed value) of each of ``repo``'s secrets, as stored."""
    rows = Secret._meta.database.execute_sql(_VALUES_OF_REPO(), (repo,))
    return tuple((key, bytes(value)) for key, value in rows)


# Asked for every workflow a worker starts: the query is built once.
_VALUES_OF_REPO = compile_once(
    lambda: Secret.select(Secret.key, Secret.value).where(Secret.repo == "r")
)
