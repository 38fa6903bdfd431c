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
from ..worklogs import USER_STEP, WorkflowLog
from . import Backend, Context, Job, Outcome, checkout, job_environment, process
from .options import Options

_log = logs.get("shell")


def workflow_environment(job: Job, home: Path, step_env: dict[str, str] | None = None) -> dict:
    """This host's short allow-list, then ``job_environment``."""
    return process.base_environment(home) | job_environment(job, step_env)


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


def new_workspace(root: Path, workflow_id: int, log: WorkflowLog) -> Path | Outcome:
    """A fresh folder for one workflow under tack's own ``root``; when the
    root is not tack's, the failed outcome (said in the log) instead."""
    try:
        private_folder(root)
    except WorkspaceRootRefused as exc:
        log.error(str(exc), "workspace")
        return Outcome("failed", str(exc))
    return Path(tempfile.mkdtemp(prefix=f"{workflow_id}-", dir=root))


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
        workspace = new_workspace(self.workspace_root, job.workflow_id, log)
        if isinstance(workspace, Outcome):
            return workspace
        if not self.sandboxed:
            log.data(0, UNSANDBOXED, "stderr")
        try:
            tree = workspace / "checkout"
            tree.mkdir()
            step_id = 0
            if checkout.wants_clone(job):
                outcome = checkout.clone(
                    job, log, tree, workspace, deadline,
                    dev=self.context.dev, timeout=self.timeout, kill_grace=self.kill_grace,
                    prefix=self._confine(workspace, tree),
                )  # fmt: skip
                if outcome:
                    return outcome
                step_id = 1
            self._warn_about_dependencies(job, log, step_id)
            for step in job.spec.steps:
                log.start_step(step_id, step.name, USER_STEP, step.command)
                result = process.run(
                    [
                        *self._confine(workspace, tree),
                        *self.wrapper,
                        self.shell,
                        "-c",
                        step.command,
                    ],
                    cwd=tree,
                    env=workflow_environment(job, workspace, step.environment),
                    cancel=job.cancel,
                    deadline=deadline,
                    on_line=lambda stream, line, sid=step_id: log.data(sid, line, stream),
                    kill_grace=self.kill_grace,
                    on_start=lambda pid: job.save_state(process.leftover_state(pid, workspace)),
                )
                log.end_step(step_id, step.name, USER_STEP)
                outcome = checkout.outcome_of(result, f"step {step.name!r}", self.timeout)
                if outcome:
                    return outcome
                step_id += 1
            return Outcome("success")
        finally:
            shutil.rmtree(workspace, ignore_errors=True)

    @staticmethod
    def _warn_about_dependencies(job: Job, log: WorkflowLog, step_id: int) -> None:
        """Say in the log that ``dependencies`` are not installed here: the
        steps run with whatever this host has."""
        dependencies = job.spec.document.get("dependencies")
        if not dependencies:
            return
        listed = dependencies if isinstance(dependencies, dict) else {}
        names = ", ".join(
            f"{source}: {' '.join(map(str, packages or []))}".strip()
            for source, packages in listed.items()
            if isinstance(packages, list | type(None))
        )
        log.data(
            step_id,
            f"tack: the shell backend does not install dependencies ({names[:300]});"
            " steps run with what this host has. Use a container backend for them.",
            "stderr",
        )

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
