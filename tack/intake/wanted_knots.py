"""Which knots the applier's writes may have made wanted or unwanted.

A knot is wanted while it hosts a repo this spindle serves: a repo record
naming this spindle, written by the owner or a member. So only two kinds of
write can flip a knot: a served-looking repo record added, removed, moved to
another knot or to another spindle; and a membership the owner grants or
withdraws (which serves or unserves every repo of its subject).

SQLite notes both as they happen, through temporary triggers on the
connection every write transaction runs on (``SerialWriteDatabase``): their
rows land in two small temporary tables, inside the applier's own
transaction (a rolled-back batch notes nothing), and are read and cleared
before it commits. Asking the store beforehand which knot
each changed record named cost a primary-key lookup per repo record, a
third of the applier's time.
"""

from __future__ import annotations

from .. import store


def _literal(text: str) -> str:
    """``text`` as an SQL string literal: triggers take no parameters."""
    return "'" + text.replace("'", "''") + "'"


def _tracking_sql(hostname: str, owner: str) -> list[str]:
    """The temporary tables and triggers that note the changes, made afresh."""
    spindle = _literal(hostname)

    def names_us(row: str) -> str:
        return f"{row}.spindle = {spindle}"

    def grants(row: str) -> str:
        return f"{row}.did = {_literal(owner)} AND {row}.instance = {spindle}"

    note_knots = "INSERT OR IGNORE INTO noted_knot VALUES"
    note_subjects = "INSERT OR IGNORE INTO noted_subject VALUES"
    triggers = {
        "repo_added": f"AFTER INSERT ON main.repo WHEN {names_us('NEW')}"
        f" BEGIN {note_knots} (NEW.knot); END",
        "repo_removed": f"AFTER DELETE ON main.repo WHEN {names_us('OLD')}"
        f" BEGIN {note_knots} (OLD.knot); END",
        "repo_moved": "AFTER UPDATE OF knot, spindle ON main.repo"
        " WHEN (OLD.knot IS NOT NEW.knot OR OLD.spindle IS NOT NEW.spindle)"
        f" AND ({names_us('OLD')} OR {names_us('NEW')})"
        f" BEGIN {note_knots} (OLD.knot), (NEW.knot); END",
        "member_added": f"AFTER INSERT ON main.member WHEN {grants('NEW')}"
        f" BEGIN {note_subjects} (NEW.subject); END",
        "member_removed": f"AFTER DELETE ON main.member WHEN {grants('OLD')}"
        f" BEGIN {note_subjects} (OLD.subject); END",
        "member_changed": "AFTER UPDATE OF subject, instance ON main.member"
        f" WHEN ({grants('OLD')}) OR ({grants('NEW')})"
        f" BEGIN {note_subjects} (OLD.subject), (NEW.subject); END",
    }
    statements = [
        "CREATE TEMP TABLE IF NOT EXISTS noted_knot (knot TEXT PRIMARY KEY) WITHOUT ROWID",
        "CREATE TEMP TABLE IF NOT EXISTS noted_subject (subject TEXT PRIMARY KEY) WITHOUT ROWID",
    ]
    for name, body in triggers.items():
        statements.append(f"DROP TRIGGER IF EXISTS temp.{name}")
        statements.append(f"CREATE TEMP TRIGGER {name} {body}")
    return statements


class KnotChanges:
    """The knots whose wanted-ness the applier's writes may have flipped.

    Used by the applier's thread only. The triggers fire on any write
    transaction, but only the applier writes repo and member records (every
    one jetstream brings); what other processes write, they do not see.
    """

    def __init__(self, directory: store.Directory) -> None:
        self._statements = _tracking_sql(directory.hostname, directory.owner)
        self._directory = directory
        # The database the triggers were set up on: held, so that a reopened
        # store is never mistaken for it.
        self._tracked: store.SerialWriteDatabase | None = None

    def track(self) -> None:
        """Make sure write transactions note changes; cheap when they do.

        Call outside a transaction: the triggers are made outside any, so a
        rolled-back one cannot take them away.
        """
        db = store.database.obj
        if db is self._tracked:
            return
        db.set_up_writers(self._statements)
        self._tracked = db

    def take(self) -> set[str]:
        """The knots noted since the last take, and the knots of the repos of
        every subject whose membership changed; the notes are cleared.
        Call inside the transaction that wrote the changes."""
        execute = store.database.execute_sql
        knots = {row[0] for row in execute("DELETE FROM temp.noted_knot RETURNING knot")}
        subjects = {row[0] for row in execute("DELETE FROM temp.noted_subject RETURNING subject")}
        return knots | self._directory.knots_of_owners(subjects)
