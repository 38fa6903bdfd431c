"""The clone of protocol §2, as the first (system) step of a workflow.

The shell and container backends both check the repository out on this
host, in the workflow's own folder, with git talking only to the vetted
address of the repo's knot (``tack.git``); the container backend then mounts
that folder at ``/tangled/workspace``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from ..git import HostRefused, pin_knot, safe_settings
from ..pipelines import commit_sha
from ..worklogs import SYSTEM_STEP, WorkflowLog
from . import Job, Outcome, process

CLONE_STEP = "Clone repository"


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


def wants_clone(job: Job) -> bool:
    return not job.workflow.get("clone", {}).get("skip", False)


def clone(
    job: Job,
    log: WorkflowLog,
    checkout: Path,
    home: Path,
    deadline: float,
    *,
    dev: bool,
    timeout: float,
    kill_grace: float,
    prefix: Sequence[str] = (),
) -> Outcome | None:
    """Fetch and check out the pipeline's commit into ``checkout``; the
    outcome when that ended the workflow, None when the steps may run.

    ``prefix`` confines each git command (the shell backend's sandbox).
    """
    options = job.workflow.get("clone", {})
    target = clone_target(job.pipeline)
    url = job.env["TANGLED_REPO_URL"]
    knot = urlsplit(url).netloc
    log.start_step(0, CLONE_STEP, SYSTEM_STEP, f"git fetch origin {target}")
    try:
        try:
            git = ["git", *safe_settings(dev, pin_knot(knot, dev))]
        except (HostRefused, OSError) as exc:
            reason = f"knot {knot!r} refused: {exc}"
            log.data(0, reason, "stderr")
            return Outcome("failed", f"clone failed: {reason}")
        # Protocol §2: "--depth=<depth or 1>"; a zero depth is the default, not
        # a full clone, so a workflow behaves here as on the official spindle.
        fetch = [*git, "fetch", f"--depth={options.get('depth') or 1}"]
        if options.get("submodules"):
            fetch.append("--recurse-submodules=yes")
        if options.get("tags"):
            fetch.append("--tags")
        commands = [
            ["git", "init", "-q"],
            ["git", "remote", "add", "origin", url],
            [*fetch, "origin", target],
            [*git, "-c", "advice.detachedHead=false", "checkout", "-q", "FETCH_HEAD"],
        ]
        if options.get("submodules"):
            commands.append([*git, "submodule", "update", "--init", "--recursive"])
        env = process.base_environment(home) | {"GIT_TERMINAL_PROMPT": "0"}
        for argv in commands:
            result = process.run(
                [*prefix, *argv],
                cwd=checkout,
                env=env,
                cancel=job.cancel,
                deadline=deadline,
                on_line=lambda stream, line: log.data(0, line, stream),
                kill_grace=kill_grace,
                on_start=lambda pid: job.save_state(process.leftover_state(pid, home)),
            )
            outcome = outcome_of(result, "clone", timeout)
            if outcome:
                return outcome
    finally:
        log.end_step(0, CLONE_STEP, SYSTEM_STEP)
    return None
