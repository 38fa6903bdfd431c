"""The ``shell`` backend, tack's embedded default: run the steps here with bash.

Trust model: steps run as the user tack runs as, on this host; only the
owner's and members' repos reach this backend. By default (``sandbox =
"auto"``) every command runs in a bubblewrap sandbox when ``bwrap`` is
installed: the file system read-only except the workspace, a private /tmp,
tack's own state (database, secrets key, logs) hidden behind empty folders,
and its own process namespace, so tack's process and its environment are
not visible. Without bubblewrap tack says so at start and in every
workflow's log. ``wrapper`` is still prefixed inside the sandbox.

Per workflow: a fresh workspace, the clone of protocol §2 as a system step,
then each step with ``bash -c`` in the checkout. The workspace is removed
afterwards, whatever the outcome.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from .. import logs
from ..config import ConfigError
from ..pipelines import commit_sha
from ..worklogs import SYSTEM_STEP, USER_STEP, WorkflowLog
from . import Backend, Context, Job, Outcome, process
from .options import Options

CLONE_STEP = "Clone repository"
_log = logs.get("shell")


def workflow_environment(job: Job, home: Path, step_env: dict[str, str] | None = None) -> dict:
    """workflow env < step env < TANGLED_* < secrets: later sources win."""
    env = process.base_environment(home)
    env.update(job.spec.environment)
    env.update(step_env or {})
    env.update(job.env)
    env.update(job.secrets)
    return env


def outcome_of(result: process.Finished, what: str, timeout: float) -> Outcome | None:
    """The workflow's outcome when this process ended it; None to carry on."""
    if result.cancelled:
        return Outcome("cancelled")
    if result.timed_out:
        return Outcome("timeout", f"timed out after {timeout:g}s")
    if result.exit_code:
        return Outcome(
            "failed", f"{what} failed with exit code {result.exit_code}", result.exit_code
        )
    return None


def clone_target(record: dict) -> str:
    """What the clone fetches: the pipeline's commit; a manual run without
    one takes the default branch, or the remote's HEAD when none is known."""
    sha = commit_sha(record)
    if sha:
        return sha
    branch = record["triggerMetadata"]["repo"].get("defaultBranch")
    return f"refs/heads/{branch}" if branch else "HEAD"


UNSANDBOXED = (
    "tack: no sandbox (bubblewrap is not installed, or sandbox = none): "
    "steps run with all of tack's access"
)


class WorkspaceRootRefused(Exception):
    """The workspace root is not tack's own private folder."""


def private_folder(path: Path) -> None:
    """Make sure ``path`` is a folder only tack can enter (0700, tack's).

    A root another local user created first (``/tmp`` is shared) could be
    watched or swapped under running workflows: it is refused. One tack made
    earlier with looser permissions is tightened.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = path.lstat()
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
        raise WorkspaceRootRefused(
            f"workspace root {path} is not a folder owned by tack's user (uid {os.getuid()});"
            " remove it or set workspace_root elsewhere"
        )
    if stat.S_IMODE(status.st_mode) & 0o077:
        os.chmod(path, 0o700)


class ShellBackend(Backend):
    type_name = "shell"

    def __init__(self, name: str, options: Options, context: Context) -> None:
        super().__init__(name, options, context)
        default_root = str(Path(tempfile.gettempdir()) / "tack-workspaces")
        self.workspace_root = Path(options.text("workspace_root", default_root))
        self.timeout = options.number("timeout", 3600, 1, 7 * 86400)
        self.kill_grace = options.number("kill_grace", 5, 0, 300)
        self.wrapper = options.argv("wrapper")
        self.shell = options.text("shell", "bash")
        self.sandbox = options.text("sandbox", "auto")
        if self.sandbox not in ("auto", "bwrap", "none"):
            raise ConfigError(
                "TACK_CONFIG", f"backends.{name}.sandbox: must be auto, bwrap or none"
            )
        self.bwrap = shutil.which("bwrap")
        if self.sandbox == "bwrap" and self.bwrap is None:
            raise ConfigError("TACK_CONFIG", f"backends.{name}.sandbox: bwrap is not installed")
        if self.sandbox == "auto" and self.bwrap is None:
            _log.warning(
                "bubblewrap (bwrap) is not installed: workflow steps can read tack's files",
                extra={"backend": name},
            )
        self.private_paths = context.private_paths

    @property
    def sandboxed(self) -> bool:
        return self.sandbox != "none" and self.bwrap is not None

    def run(self, job: Job, log: WorkflowLog) -> Outcome:
        deadline = time.monotonic() + self.timeout
        try:
            private_folder(self.workspace_root)
        except WorkspaceRootRefused as exc:
            log.error(str(exc), "workspace")
            return Outcome("failed", str(exc))
        workspace = Path(tempfile.mkdtemp(prefix=f"{job.workflow_id}-", dir=self.workspace_root))
        if not self.sandboxed:
            log.data(0, UNSANDBOXED, "stderr")
        try:
            checkout = workspace / "checkout"
            checkout.mkdir()
            step_id = 0
            if not job.workflow.get("clone", {}).get("skip", False):
                outcome = self._clone(job, log, workspace, checkout, deadline)
                if outcome:
                    return outcome
                step_id = 1
            for step in job.spec.steps:
                log.start_step(step_id, step.name, USER_STEP, step.command)
                result = process.run(
                    [
                        *self._confine(workspace, checkout),
                        *self.wrapper,
                        self.shell,
                        "-c",
                        step.command,
                    ],
                    cwd=checkout,
                    env=workflow_environment(job, workspace, step.environment),
                    cancel=job.cancel,
                    deadline=deadline,
                    on_line=lambda stream, line, sid=step_id: log.data(sid, line, stream),
                    kill_grace=self.kill_grace,
                    on_start=lambda pid: job.save_state(process.leftover_state(pid, workspace)),
                )
                log.end_step(step_id, step.name, USER_STEP)
                outcome = outcome_of(result, f"step {step.name!r}", self.timeout)
                if outcome:
                    return outcome
                step_id += 1
            return Outcome("success")
        finally:
            shutil.rmtree(workspace, ignore_errors=True)

    def _confine(self, workspace: Path, checkout: Path) -> list[str]:
        """The bubblewrap prefix for one command (nothing when unsandboxed).

        Mount order matters: later mounts cover earlier ones, so the
        workspace, mounted last, stays writable and visible even when it
        lies under /tmp or a hidden folder.
        """
        if not self.sandboxed:
            return []
        argv = [
            self.bwrap, "--die-with-parent", "--new-session",
            "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
        ]  # fmt: skip
        for hidden in self.private_paths:
            argv += ["--tmpfs", hidden]
        argv += ["--bind", str(workspace), str(workspace), "--chdir", str(checkout)]
        if os.getuid() == 0:
            argv += ["--cap-drop", "ALL"]
        return [*argv, "--"]

    def _clone(self, job: Job, log: WorkflowLog, home: Path, checkout: Path, deadline: float):
        clone = job.workflow.get("clone", {})
        target = clone_target(job.pipeline)
        # Protocol §2: "--depth=<depth or 1>"; a zero depth is the default, not
        # a full clone, so a workflow behaves here as on the official spindle.
        fetch = ["git", "fetch", f"--depth={clone.get('depth') or 1}"]
        if clone.get("submodules"):
            fetch.append("--recurse-submodules=yes")
        if clone.get("tags"):
            fetch.append("--tags")
        commands = [
            ["git", "init", "-q"],
            ["git", "remote", "add", "origin", job.env["TANGLED_REPO_URL"]],
            [*fetch, "origin", target],
            ["git", "-c", "advice.detachedHead=false", "checkout", "-q", "FETCH_HEAD"],
        ]
        if clone.get("submodules"):
            commands.append(["git", "submodule", "update", "--init", "--recursive"])
        env = process.base_environment(home) | {"GIT_TERMINAL_PROMPT": "0"}
        log.start_step(0, CLONE_STEP, SYSTEM_STEP, f"git fetch origin {target}")
        try:
            for argv in commands:
                result = process.run(
                    [*self._confine(home, checkout), *argv],
                    cwd=checkout,
                    env=env,
                    cancel=job.cancel,
                    deadline=deadline,
                    on_line=lambda stream, line: log.data(0, line, stream),
                    kill_grace=self.kill_grace,
                    on_start=lambda pid: job.save_state(process.leftover_state(pid, home)),
                )
                outcome = outcome_of(result, "clone", self.timeout)
                if outcome:
                    return outcome
        finally:
            log.end_step(0, CLONE_STEP, SYSTEM_STEP)
        return None
