"""Running one child process for a workflow: streamed output, timeout, cancel.

Each child starts in a session of its own, so a timeout or cancel can end it
and everything it spawned with one signal to the process group: SIGTERM,
then SIGKILL after a grace period. Leftover background processes are ended
when the step's main process exits, so a step cannot outlive itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# A line longer than this is split: a child printing without newlines must
# not make tack buffer without bound.
MAX_LINE_BYTES = 64 * 1024

OnLine = Callable[[str, str], None]  # (stream name, line without newline)


@dataclass(frozen=True)
class Finished:
    exit_code: int | None
    cancelled: bool = False
    timed_out: bool = False


def base_environment(home: Path) -> dict[str, str]:
    """What every child gets from tack's own environment: nothing secret.

    tack's environment holds its configuration (and, later, key material),
    so children start from a short allow-list instead of inheriting it.
    """
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
    for name in ("LANG", "LC_ALL", "TZ", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def run(
    argv: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    cancel: threading.Event,
    deadline: float,
    on_line: OnLine,
    stdin: bytes | None = None,
    kill_grace: float = 5.0,
) -> Finished:
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        on_line("stderr", f"cannot start {argv[0]}: {exc.strerror}")
        return Finished(exit_code=127)
    threads = [
        threading.Thread(target=_pump, args=(proc.stdout, "stdout", on_line), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, "stderr", on_line), daemon=True),
    ]
    if stdin is not None:
        threads.append(threading.Thread(target=_feed, args=(proc, stdin), daemon=True))
    for thread in threads:
        thread.start()
    result = _wait(proc, cancel, deadline, kill_grace)
    _signal_group(proc.pid, signal.SIGKILL)  # whatever the step left behind
    for thread in threads:
        thread.join(5.0)
    return result


def _wait(
    proc: subprocess.Popen, cancel: threading.Event, deadline: float, grace: float
) -> Finished:
    while True:
        try:
            return Finished(exit_code=proc.wait(timeout=0.05))
        except subprocess.TimeoutExpired:
            pass
        if cancel.is_set():
            _end_group(proc, grace)
            return Finished(exit_code=proc.returncode, cancelled=True)
        if time.monotonic() >= deadline:
            _end_group(proc, grace)
            return Finished(exit_code=proc.returncode, timed_out=True)


def _end_group(proc: subprocess.Popen, grace: float) -> None:
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _pump(pipe, stream: str, on_line: OnLine) -> None:
    with pipe:
        while True:
            raw = pipe.readline(MAX_LINE_BYTES)
            if not raw:
                return
            on_line(stream, raw.decode("utf-8", errors="replace").rstrip("\r\n"))


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the child did not read its input; its exit status tells the rest
