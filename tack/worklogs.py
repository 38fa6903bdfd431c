"""Workflow logs: one JSON-lines file per workflow, in the official line format.

Files live in ``SPINDLE_SERVER_LOG_DIR`` and are named by the workflow's
numeric id, never by anything from a record, so no untrusted string reaches a
path. A line is written whole, in one ``write``, so a follower reading the
file while it grows sees only complete lines (it stops at the last newline).
Secrets are masked before a line is built, so no copy of a secret is ever on disk.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from . import logs
from .statuses import rfc3339

log = logs.get("worklogs")

SYSTEM_STEP, USER_STEP = 0, 1
# The backend-state key holding the log's size at the moment the rest of that
# state was saved; a resumed workflow's log is cut back to it first.
LOG_CHECKPOINT = "log_bytes"
MAX_CONTENT = 64 * 1024
MASK = "***"


# A workflow's log stops growing here (TACK_MAX_LOG_BYTES); step boundaries
# are still written, and one line at the end says how much was cut.
DEFAULT_MAX_LOG_BYTES = 10 * 1024 * 1024


class LogBook:
    def __init__(self, log_dir: str | Path, max_bytes: int = DEFAULT_MAX_LOG_BYTES) -> None:
        self.max_bytes = max_bytes
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._guard = threading.Lock()
        self._watchers: dict[int, set[Wakeup]] = {}

    def path(self, workflow_id: int) -> Path:
        return self.dir / f"{int(workflow_id)}.jsonl"

    def open(
        self, workflow_id: int, secrets: Iterable[str] = (), fresh: bool = False
    ) -> WorkflowLog:
        """Append to a workflow's log; ``fresh`` starts it over (a retried intake)."""
        mode = "w" if fresh else "a"
        return WorkflowLog(self, self.path(workflow_id), secrets, mode, workflow_id)

    def cut(self, workflow_id: int, size: int) -> int:
        """Cut a workflow's log back to ``size`` bytes (a backend's last log
        checkpoint, see ``LOG_CHECKPOINT``); the number of bytes removed.

        Lines written after the checkpoint are the ones the resumed backend
        will write again, so removing them keeps the log exactly-once.
        """
        path = self.path(workflow_id)
        try:
            extra = path.stat().st_size - size
        except FileNotFoundError:
            return 0
        if size < 0 or extra <= 0:
            return 0
        os.truncate(path, size)
        return extra

    @contextlib.contextmanager
    def watching(self, workflow_ids: Iterable[int]) -> Iterator[Wakeup]:
        """A wake-up rung whenever one of these workflows' logs grows (or the
        workflow ends, see ``notify``): only its own followers wake, so one
        chatty build does not wake every follower of every other one.

        Clear it *before* reading, then wait on it: a line written in
        between rings it again, so no wake-up is lost.
        """
        wakeup = Wakeup()
        ids = list(workflow_ids)
        with self._guard:
            for workflow_id in ids:
                self._watchers.setdefault(workflow_id, set()).add(wakeup)
        try:
            yield wakeup
        finally:
            with self._guard:
                for workflow_id in ids:
                    watchers = self._watchers.get(workflow_id)
                    if watchers is not None:
                        watchers.discard(wakeup)
                        if not watchers:
                            del self._watchers[workflow_id]
            # Unreachable now (writers find wake-ups only under the guard),
            # so its descriptor number cannot be rung after reuse.
            wakeup.close()

    def notify(self, workflow_id: int) -> None:
        """Wake the followers of one workflow."""
        with self._guard:
            for wakeup in self._watchers.get(workflow_id, ()):
                wakeup.ring()

    def wake_all(self) -> None:
        """Wake every follower (tack is stopping: they close their streams)."""
        with self._guard:
            for watchers in self._watchers.values():
                for wakeup in watchers:
                    wakeup.ring()


class Wakeup:
    """A follower's doorbell: rung by the threads writing its workflows' logs,
    waited on together with the follower's socket. It is an eventfd, so one
    poll(2) covers both: a client closing its end is answered at once, and a
    follower of a quiet workflow sleeps without waking to look.

    Rung only under ``LogBook._guard``, and closed only once no longer
    reachable from it, so a reused descriptor number is never rung.
    """

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._rung = False  # skips the write while a ring is still unanswered

    def fileno(self) -> int:
        return self._fd

    def ring(self) -> None:
        if not self._rung:
            self._rung = True
            os.eventfd_write(self._fd, 1)

    def clear(self) -> None:
        # Drain first, then let rings write again: a ring in between is
        # skipped, but the line behind it was written before the reader's
        # next read, which therefore sees it. The other order could drain a
        # ring's write while leaving it marked unanswered: no more wake-ups.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)
        self._rung = False

    def close(self) -> None:
        os.close(self._fd)


# `base64` wraps its output at 76 columns, each line the encoding of 57 bytes.
BASE64_LINE_BYTES = 57


def secret_variants(secrets: Iterable[str]) -> list[str]:
    """Each secret as it could appear in output: verbatim, base64-encoded
    whole, and, for a long secret, the base64 of each 57-byte piece (the
    lines of a wrapped `base64` output), so no line of it shows in clear.
    Logs are written line by line, so a secret of several lines (a key file)
    is also masked line by line."""
    variants: set[str] = set()
    for value in secrets:
        if len(value) < 3:  # masking "a" would shred the whole log
            continue
        variants.add(value)
        if "\n" in value:
            variants.update(line for line in value.splitlines() if len(line.strip()) >= 3)
        raw = value.encode()
        variants.add(base64.b64encode(raw).decode().rstrip("="))
        if len(raw) > BASE64_LINE_BYTES:
            for start in range(0, len(raw), BASE64_LINE_BYTES):
                piece = base64.b64encode(raw[start : start + BASE64_LINE_BYTES]).decode()
                if len(piece.rstrip("=")) >= 4:
                    variants.add(piece.rstrip("="))
    # Longest first, so a secret containing another is masked whole.
    return sorted(variants, key=len, reverse=True)


def masker(secrets: Iterable[str]) -> Callable[[str], str]:
    """A function masking ``secrets`` (in all their variants) in a text."""
    variants = secret_variants(secrets)
    return lambda text: _mask(text, variants)


def _mask(text: str, variants: list[str]) -> str:
    for secret in variants:
        text = text.replace(secret, MASK)
    return text


class WorkflowLog:
    """Appends one workflow's lines; safe to call from several threads."""

    def __init__(
        self, book: LogBook, path: Path, secrets: Iterable[str], mode: str, workflow_id: int
    ) -> None:
        self._book = book
        self._workflow_id = workflow_id
        self._lock = threading.Lock()
        self._path = path
        self._secrets = secret_variants(secrets)
        self.lines = 0
        self.failure: str | None = None  # why lines are no longer written, if they are not
        self._cut_lines = self._cut_bytes = 0  # output not kept past the size cap
        self._last_step = 0
        try:
            # Binary, so ``tell`` is the exact byte size a checkpoint records.
            self._file = open(path, mode + "b")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            self._file = None
            self._failed(exc)

    def mask(self, text: str) -> str:
        return _mask(text, self._secrets)

    def start_step(self, step_id: int, name: str, kind: int, command: str | None = None) -> None:
        line = self._control(step_id, name, "start", kind)
        if command is not None:
            line["step_command"] = self.mask(command)
        self._write(line)

    def end_step(self, step_id: int, name: str, kind: int) -> None:
        self._write(self._control(step_id, name, "end", kind))

    def data(self, step_id: int, content: str, stream: str = "stdout") -> None:
        self._last_step = step_id
        self._write(
            {
                "kind": "data",
                "content": self._clip(content),
                "time": _now(),
                "step_id": step_id,
                "stream": stream,
            },
            capped=True,
        )

    def error(self, message: str, step_name: str = "error") -> None:
        """A failure before (or outside) any step still shows up as a step."""
        self.start_step(0, step_name, SYSTEM_STEP)
        self.data(0, message, "stderr")
        self.end_step(0, step_name, SYSTEM_STEP)

    @property
    def size(self) -> int:
        """Bytes in the log so far: what a checkpoint records."""
        with self._lock:
            return self._file.tell() if self._file and not self._file.closed else 0

    def checkpoint(self, state: dict) -> dict:
        """``state`` with the log's current size under ``LOG_CHECKPOINT``."""
        state[LOG_CHECKPOINT] = self.size
        return state

    def close(self) -> None:
        if self._cut_lines:
            self._write(
                {
                    "kind": "data",
                    "content": f"tack: this log reached its cap of {self._book.max_bytes:,} bytes;"
                    f" {self._cut_lines:,} more lines ({self._cut_bytes:,} bytes) were not kept",
                    "time": _now(),
                    "step_id": self._last_step,
                    "stream": "stderr",
                }
            )
        with self._lock:
            if self._file and not self._file.closed:
                with contextlib.suppress(OSError):  # a full disk: what is lost is lost
                    self._file.close()

    def _control(self, step_id: int, name: str, status: str, kind: int) -> dict:
        return {
            "kind": "control",
            "content": self._clip(name),
            "time": _now(),
            "step_id": step_id,
            "step_status": status,
            "step_kind": kind,
        }

    def _clip(self, text: str) -> str:
        return self.mask(text[:MAX_CONTENT])

    def _write(self, line: dict, capped: bool = False) -> None:
        """Append one line. Output (``capped``) past the size cap is counted,
        not written: step boundaries still are, so every step still ends."""
        text = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        with self._lock:
            if self._file is None or self._file.closed or self.failure:
                return  # ended (late output is dropped), or the log cannot be written
            if capped and (self._cut_lines or self._file.tell() + len(text) > self._book.max_bytes):
                self._cut_lines += 1
                self._cut_bytes += len(text)
                return
            try:
                self._file.write(text)
                self._file.flush()
            except OSError as exc:
                # A full disk must not keep the workflow from ending: the run
                # goes on, its status is written, the log keeps what it could.
                self._failed(exc)
                return
            self.lines += 1
        self._book.notify(self._workflow_id)

    def _failed(self, exc: OSError) -> None:
        self.failure = f"{type(exc).__name__}: {exc.strerror or exc}"
        log.error(
            "workflow log not written; the run goes on without it",
            extra={"path": str(self._path), "error": self.failure},
        )


def _now() -> str:
    return rfc3339(time.time_ns())


class LogReader:
    """Reads a workflow's log as it grows, one read of complete lines at a time.

    The file stays open between reads: a follower of a chatty build reads
    thousands of times, and need not open and close the file for each.
    The log is only ever appended to, truncated in place (a resumed or
    retried workflow) or deleted once long finished, never replaced, so the
    open file is always the log.
    """

    CHUNK = 4 * 1024 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._file: BinaryIO | None = None

    def read_lines(self) -> list[bytes]:
        """Complete lines (bytes, without the newline) past the last read.
        Split on ``\\n`` only: a line's text may hold U+2028, U+2029 or
        U+0085, which ``str.splitlines`` takes for line ends."""
        if self._file is None:
            try:
                self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            except FileNotFoundError:
                return []  # no line written yet
        self._file.seek(self.offset)
        chunk = self._file.read(self.CHUNK) or b""
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        return chunk[:end].split(b"\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
