"""Switching over from the official spindle on the same database file.

The official spindle's tables (``repos``, ``secrets``, ``pipelines``, …) do
not share a name with tack's and are left alone. Its ``secrets`` table holds
repo secrets in plain text: tack imports each once, sealed like its own
(``tack.secrets``), for the repo the official row names, and marks it
imported so a secret later removed through tack is not brought back. A row
whose repo tack cannot place yet (its record not read yet) is tried again at
the next start.
"""

from __future__ import annotations

import re

from . import logs, store
from .config import is_did
from .secrets import DuplicateSecret, SecretStore

log = logs.get("switchover")

_MARK = "official-secret:"
_AT_URI = re.compile(r"^at://did:[a-z]+:[A-Za-z0-9._:%-]+/sh\.tangled\.repo/[A-Za-z0-9._:~-]+$")


def _has_table(name: str) -> bool:
    cursor = store.database.execute_sql(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    )
    return cursor.fetchone() is not None


def repo_uri(identifier: str, directory: store.Directory) -> str | None:
    """The at-uri of the repo an official secret row names, or None."""
    if _AT_URI.match(identifier):
        return identifier
    if is_did(identifier):  # today's rows: the repo DID
        repo = directory.repo_by_did(identifier)
        if repo is not None:
            return repo.at_uri
        if _has_table("repos"):
            row = store.database.execute_sql(
                "SELECT owner, rkey FROM repos WHERE repo_did = ?", (identifier,)
            ).fetchone()
            if row is not None:
                return f"at://{row[0]}/sh.tangled.repo/{row[1]}"
        return None
    owner, _, name = identifier.partition("/")  # older rows: owner/name
    if is_did(owner) and name:
        repo = directory.repo_by_name(owner, name)
        return repo.at_uri if repo is not None else None
    return None


def import_official_secrets(secrets: SecretStore, directory: store.Directory) -> None:
    if not _has_table("secrets"):
        return
    rows = store.database.execute_sql(
        "SELECT id, repo, key, value, created_by FROM secrets ORDER BY id"
    ).fetchall()
    imported = waiting = 0
    for row_id, identifier, key, value, created_by in rows:
        mark = f"{_MARK}{row_id}"
        if store.get_cursor(mark) is not None:
            continue
        uri = repo_uri(str(identifier), directory)
        if uri is None:
            waiting += 1
            continue
        try:
            secrets.add(uri, str(key), str(value), str(created_by))
        except DuplicateSecret:
            pass  # set through tack already: tack's value stands
        except Exception as exc:
            log.warning(
                "official secret not imported",
                extra={"repo": uri, "key": key, "reason": f"{type(exc).__name__}: {exc}"[:200]},
            )
            continue
        store.save_cursor(mark, 1)
        imported += 1
    if imported or waiting:
        log.info(
            "secrets of the official spindle imported, sealed",
            extra={"imported": imported, "waiting_for_their_repo": waiting},
        )
