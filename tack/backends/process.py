"""Running one child process for a workflow: streamed output, timeout, cancel.

Each child starts in a session of its own, so a timeout or cancel can end it
and everything it spawned with one signal to the process group: SIGTERM,
then SIGKILL after a grace period. Leftover background processes are ended
when the step's main process exits, so a step cannot outlive itself.

Nor tack: the child is started under ``setpriv --pdeathsig KILL`` (when
util-linux has it), so the kernel kills it if tack dies, and its process
group is recorded (``on_start``) with the group leader's start time, so the
next start ends whatever a killed tack left in that group
(``end_leftovers``) before it reports the workflow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
    on_start: Callable[[int], None] | None = None,
) -> Finished:
    try:
        proc = subprocess.Popen(
            [*_DIE_WITH_TACK, *argv],
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
    if on_start is not None:
        on_start(proc.pid)
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


# The kernel sends SIGKILL to the child when the thread that started it (a
# worker, alive as long as tack) dies: a kill -9 of tack ends the step too.
_DIE_WITH_TACK = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
# Backend-state keys recording a run's process group and workspace.
PROCESS_GROUP, PROCESS_START, WORKSPACE = "process_group", "process_start", "workspace"


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), to tell it from a
    later process that reuses its PID; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])


def leftover_state(pid: int, workspace: Path) -> dict:
    """What to save so a later start can end this run's processes and files."""
    return {PROCESS_GROUP: pid, PROCESS_START: start_time(pid), WORKSPACE: str(workspace)}


def end_leftovers(state: dict) -> list[str]:
    """End the process group and remove the workspace a dead tack's run left
    (as ``leftover_state`` recorded them); what was done, for the log."""
    done = []
    group, started = state.get(PROCESS_GROUP), state.get(PROCESS_START)
    if isinstance(group, int) and group > 1:
        alive = _group_members(group)
        # Only the group that run made: its leader, if still alive, must be
        # the same process (same start time), not a later one with its PID.
        leader_ok = started is None or start_time(group) in (None, started)
        if alive and leader_ok:
            _signal_group(group, signal.SIGKILL)
            done.append(f"killed process group {group} ({len(alive)} processes)")
    workspace = state.get(WORKSPACE)
    if isinstance(workspace, str) and workspace and Path(workspace).is_dir():
        shutil.rmtree(workspace, ignore_errors=True)
        done.append(f"removed workspace {workspace}")
    return done


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(int(entry.name)) == pgid:
                members.append(int(entry.name))
    return members


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
