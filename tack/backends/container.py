"""The ``container`` backend: each workflow in a fresh container, the way the
official spindle's nixery engine runs it.

It drives a Docker-compatible command line (``podman`` or ``docker``). Per
workflow, in order:

- the image: the workflow's ``image:``; else, when it lists
  ``dependencies``, the image a nixery registry builds from them,
  ``<registry>/<nixpkgs…>/bash/git/coreutils/nix`` (``arm64/`` first on
  arm64), as the official spindle names it; else the backend's ``image``
  option (by default the nixery image of those four). It is pulled as a
  system step; a failed pull fails the workflow with the runtime's words.
- the checkout: cloned on this host from the vetted knot address (the same
  clone step as the shell backend), mounted at ``/tangled/workspace``, with
  ``HOME=/tangled/home`` beside it;
- one container (and, with ``network = "bridge"``, one network of its own),
  labelled with the workflow id and this tack's instance; all capabilities
  dropped but the five the official spindle keeps, no new privileges,
  ``memory``, ``cpus`` and ``pids`` limits, and open-file and process limits
  no higher than tack's own (a runtime's default above the host's hard limit
  makes the container fail to start);
- each step with ``bash -c`` in the workspace through ``exec``, its output
  streamed line by line; values reach it by name (``-e NAME``) from the
  runtime's environment, never on a command line;
- the container, its network and the workspace removed whatever happened.
  Timeout and cancel stop the container (SIGTERM, SIGKILL after
  ``kill_grace``). A tack killed mid-run leaves its container behind: the
  next start removes every container and network labelled with its instance.

The container sees its workspace and nothing of tack's: no files, no
environment, no processes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..worklogs import SYSTEM_STEP, USER_STEP, WorkflowLog
from . import Backend, Context, Job, Outcome, checkout, job_environment, process
from .options import Options
from .shell import new_workspace

WORKSPACE_DIR = "/tangled/workspace"
HOME_DIR = "/tangled/home"
# PATH in the container, as the official spindle sets it (nix profiles first).
CONTAINER_PATH = (
    f"{HOME_DIR}/.nix-profile/bin:/nix/var/nix/profiles/default/bin:"
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)
NIXERY_BASE = ("bash", "git", "coreutils", "nix")
# The capabilities the official spindle keeps; every other one is dropped.
KEPT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID")
# Open files and processes of a container, at most (``flag``, limit, cap).
# Given explicitly: podman's defaults (open files 1048576) exceed the hard
# limits of many hosts, and the container then fails to start; and the
# runtime, without CAP_SYS_RESOURCE, cannot raise the process limit far.
ULIMITS = (
    ("nofile", resource.RLIMIT_NOFILE, 65536),
    ("nproc", resource.RLIMIT_NPROC, 16384),
)
WORKFLOW_LABEL = "tack.workflow"
INSTANCE_LABEL = "tack.instance"
PULL_STEP = "Pull image"
# How long one runtime command (pull aside) may take before it is abandoned.
RUNTIME_TIMEOUT = 120.0
# Backend-state keys.
CONTAINER, NETWORK = "container", "network"

# A nixpkgs attribute as a path component of a nixery image name.
_PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
_REGISTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:/-]{0,199}$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,299}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
_SIZE = re.compile(r"^[0-9]{1,12}[bkmg]?$")


class UnusableWorkflow(Exception):
    """The workflow asks for something this backend cannot give it."""


@dataclass(frozen=True)
class ImagePlan:
    """What a workflow runs in, and the system steps that prepare it."""

    image: str
    nixery: bool  # built by a nixery registry: nix is there to configure
    flake_packages: tuple[str, ...] = ()  # dependencies from other registries


def find_runtime() -> str | None:
    """``podman`` or ``docker``, whichever is on PATH first (podman preferred)."""
    for name in ("podman", "docker"):
        if shutil.which(name):
            return name
    return None


def nixery_image(registry: str, packages: list[str]) -> str:
    """The image name the official spindle asks a nixery registry for."""
    path = "/".join([*packages, *NIXERY_BASE])
    if platform.machine() in ("aarch64", "arm64"):
        path = f"arm64/{path}"
    return f"{registry}/{path}"


def plan_image(document: dict[str, Any], registry: str, default: str | None) -> ImagePlan:
    """The image for one workflow (see the module docstring); UnusableWorkflow
    for dependencies that cannot become an image name."""
    image = document.get("image")
    if image is not None:
        if not isinstance(image, str) or not _IMAGE.match(image):
            raise UnusableWorkflow("image: must be an image reference")
        return ImagePlan(image, nixery=False)
    dependencies = document.get("dependencies") or {}
    if not isinstance(dependencies, dict):
        raise UnusableWorkflow("dependencies: must map a registry to a list of packages")
    nixpkgs: list[str] = []
    flakes: list[str] = []
    for source, packages in dependencies.items():
        if packages is None:
            packages = []
        if not isinstance(source, str) or not isinstance(packages, list):
            raise UnusableWorkflow("dependencies: must map a registry to a list of packages")
        if source == "nixpkgs":
            for package in packages:
                if not isinstance(package, str) or not _PACKAGE.match(package):
                    raise UnusableWorkflow(
                        f"dependencies.nixpkgs: {str(package)[:60]!r} is not a package name"
                    )
                nixpkgs.append(package)
            continue
        # Another registry (a flake reference): installed with ``nix profile
        # add`` as a system step, as the official spindle does.
        if not _REGISTRY_NAME.match(source):
            raise UnusableWorkflow(f"dependencies: {source[:60]!r} is not a registry tack can use")
        if not packages:
            flakes.append(source)
        for package in packages:
            if not isinstance(package, str) or not _PACKAGE.match(package):
                raise UnusableWorkflow(
                    f"dependencies.{source}: {str(package)[:60]!r} is not a package name"
                )
            flakes.append(f"{source}#{package}")
    if nixpkgs or flakes or default is None:
        return ImagePlan(nixery_image(registry, nixpkgs), nixery=True, flake_packages=tuple(flakes))
    return ImagePlan(default, nixery=False)


def setup_steps(plan: ImagePlan) -> list[tuple[str, str, dict[str, str]]]:
    """(name, command, environment) of the system steps a nixery image needs first."""
    steps = []
    if plan.nixery:
        steps.append(("Configure Nix", _NIX_CONF, {}))
    if plan.flake_packages:
        packages = " ".join(shlex.quote(p) for p in plan.flake_packages)
        steps.append(
            (
                "Install custom dependencies",
                "nix --extra-experimental-features nix-command --extra-experimental-features"
                f" flakes profile add {packages}",
                {"NIX_NO_COLOR": "1", "NIX_SHOW_DOWNLOAD_PROGRESS": "0"},
            )
        )
    return steps


# Nix in a nixery image runs as root without build users or a sandbox; the
# official spindle writes the same settings before the steps.
_NIX_CONF = """mkdir -p /etc/nix
echo 'extra-experimental-features = nix-command flakes' >> /etc/nix/nix.conf
echo 'build-users-group = ' >> /etc/nix/nix.conf
echo 'sandbox = false' >> /etc/nix/nix.conf"""


def container_environment(job: Job, step_env: dict[str, str]) -> dict[str, str]:
    """``job_environment``, then HOME and PATH of the container."""
    env = job_environment(job, step_env)
    env["HOME"] = HOME_DIR
    env.setdefault("PATH", CONTAINER_PATH)
    return env


class ContainerBackend(Backend):
    type_name = "container"

    def __init__(self, name: str, options: Options, context: Context) -> None:
        super().__init__(name, options, context)
        self.runtime = options.text("runtime", None) or find_runtime()
        if self.runtime is None:
            raise options.fail("runtime", "neither podman nor docker is on PATH; install podman")
        if shutil.which(self.runtime) is None:
            raise options.fail("runtime", f"{self.runtime!r} is not on PATH")
        # podman and docker differ in a few flags (below); the rest is shared.
        self.podman = os.path.basename(self.runtime) == "podman"
        official = context.container_defaults
        registry = options.text("registry", official.get("registry", "nixery.dev"))
        self.insecure_registry = registry.startswith("http://")
        self.registry = registry.removeprefix("http://").removeprefix("https://").rstrip("/")
        if not _REGISTRY_NAME.match(self.registry):
            raise options.fail("registry", "must be a registry address (host[:port][/path])")
        self.image = options.text("image", None)
        if self.image is not None and not _IMAGE.match(self.image):
            raise options.fail("image", "must be an image reference")
        self.memory = options.text("memory", official.get("memory"))
        if self.memory is not None and not _SIZE.match(self.memory.lower()):
            raise options.fail("memory", "must be a size such as 512m or 2g")
        self.cpus = options.number("cpus", 0, 0, 1024)
        self.pids = int(options.number("pids", 4096, 0, 1_000_000))
        self.network = options.text("network", "bridge")
        if self.network not in ("bridge", "none"):
            raise options.fail("network", "must be bridge or none")
        self.run_args = options.argv("run_args")
        self.timeout = options.number("timeout", official.get("timeout", 3600), 1, 7 * 86400)
        self.kill_grace = options.number("kill_grace", 5, 0, 300)
        default_root = str(Path(tempfile.gettempdir()) / "tack-workspaces")
        self.workspace_root = Path(options.text("workspace_root", default_root))
        self.instance = instance_label(context)

    # --- running ----------------------------------------------------------------------

    def run(self, job: Job, log: WorkflowLog) -> Outcome:
        try:
            plan = plan_image(job.spec.document, self.registry, self.image)
        except UnusableWorkflow as exc:
            log.error(str(exc), "workflow file")
            return Outcome("failed", str(exc))
        workspace = new_workspace(self.workspace_root, job.workflow_id, log)
        if isinstance(workspace, Outcome):
            return workspace
        name = f"tack-{job.workflow_id}-{os.urandom(4).hex()}"
        network = name if self.network == "bridge" else None
        # Saved before anything exists, so a tack killed at any point after
        # leaves enough for the next start to remove it all.
        job.save_state({CONTAINER: name, NETWORK: network, process.WORKSPACE: str(workspace)})
        run = _ContainerRun(self, job, log, plan, workspace, name, network)
        try:
            return run.until_done()
        finally:
            self._remove(name, network, workspace)

    # --- the runtime ------------------------------------------------------------------

    def runtime_run(
        self,
        job: Job,
        args: list[str],
        on_line: process.OnLine,
        deadline: float,
        env: dict[str, str] | None = None,
    ) -> process.Finished:
        """One runtime command, its output to ``on_line``; cancel and the
        deadline end it (the container itself is stopped by the caller)."""
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        for keep in ("XDG_RUNTIME_DIR", "DOCKER_HOST", "CONTAINER_HOST", "HOME"):
            if keep in os.environ:
                base[keep] = os.environ[keep]
        return process.run(
            [self.runtime, *args],
            cwd=Path("/"),
            env=base | (env or {}),
            cancel=job.cancel,
            deadline=deadline,
            on_line=on_line,
            kill_grace=1.0,
        )

    def run_argv(
        self, job: Job, image: str, tree: Path, home: Path, name: str, network: str | None
    ) -> list[str]:
        """``run`` of the workflow's container: kept alive by ``cat`` on an
        open stdin (as the official spindle does), steps come by ``exec``."""
        return [
            "run", "--detach", "--interactive", "--name", name,
            "--label", f"{WORKFLOW_LABEL}={job.workflow_id}",
            "--label", f"{INSTANCE_LABEL}={self.instance}",
            "--hostname", "spindle",
            "--network", network or "none",
            "--workdir", WORKSPACE_DIR,
            "--volume", f"{tree}:{WORKSPACE_DIR}",
            "--volume", f"{home}:{HOME_DIR}",
            "--tmpfs", "/tmp:rw,exec,mode=1777",
            "--cap-drop", "ALL",
            *[arg for cap in KEPT_CAPABILITIES for arg in ("--cap-add", cap)],
            "--security-opt", "no-new-privileges",
            *self._limits(),
            "--pull", "never",
            *self.run_args,
            image, "cat",
        ]  # fmt: skip

    def _limits(self) -> list[str]:
        args = []
        if self.memory:
            args += ["--memory", self.memory, "--memory-swap", self.memory]
        if self.cpus:
            args += ["--cpus", f"{self.cpus:g}"]
        if self.pids:
            args += ["--pids-limit", str(self.pids)]
        for flag, limit, cap in ULIMITS:
            args += ["--ulimit", f"{flag}={_ulimit(limit, cap)}"]
        return args

    def pull_flags(self) -> list[str]:
        """podman takes a plain-HTTP registry per pull; docker only from its
        daemon's ``insecure-registries`` (README)."""
        if self.insecure_registry and self.podman:
            return ["--tls-verify=false"]
        return []

    def have_image(self, image: str) -> bool:
        return self._quiet(["image", "inspect", "--format", "{{.Id}}", image]) == 0

    def _call(
        self, args: list[str], timeout: float = RUNTIME_TIMEOUT
    ) -> subprocess.CompletedProcess | None:
        """A runtime command whose output nobody streams; None if it could not run."""
        try:
            return subprocess.run(
                [self.runtime, *args], capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None

    def _quiet(self, args: list[str], timeout: float = RUNTIME_TIMEOUT) -> int | None:
        done = self._call(args, timeout)
        return None if done is None else done.returncode

    def _remove_container(self, name: str) -> list[str]:
        """Remove at once: ``cat`` as the container's first process ignores
        SIGTERM, and podman would wait its 10 s stop timeout first."""
        if self.podman:
            return ["rm", "--force", "--time", "0", name]
        return ["rm", "--force", name]  # docker kills straight away

    def _remove_network(self, name: str) -> list[str]:
        """podman's ``--force`` also takes the network from a container still
        being torn down, which otherwise keeps it "in use" for a moment."""
        if self.podman:
            return ["network", "rm", "--force", name]
        return ["network", "rm", name]

    def stop_container(self, name: str) -> None:
        self._quiet(["stop", "--time", str(int(self.kill_grace)), name], self.kill_grace + 30)

    def _remove(self, name: str, network: str | None, workspace: Path | None) -> list[str]:
        """Remove the container, its network and the workspace; what was removed."""
        done = []
        if self._quiet(self._remove_container(name)) == 0:
            done.append(f"removed container {name}")
        if network and self._quiet(self._remove_network(network)) == 0:
            done.append(f"removed network {network}")
        if workspace is not None and workspace.is_dir():
            shutil.rmtree(workspace, ignore_errors=True)
            done.append(f"removed workspace {workspace}")
        return done

    # --- what a dead tack left ----------------------------------------------------------

    def end_leftovers(self, state: dict[str, Any]) -> list[str]:
        done = process.end_leftovers(state)  # a clone that was running
        name, network = state.get(CONTAINER), state.get(NETWORK)
        if isinstance(name, str) and name.startswith("tack-"):
            done += self._remove(name, network if isinstance(network, str) else None, None)
        return done

    def remove_strays(self) -> list[str]:
        """Every container and network labelled with this instance: at start,
        before any workflow runs, all of them are a dead tack's."""
        label = f"label={INSTANCE_LABEL}={self.instance}"
        done = []
        for kind, listing in (
            ("container", ["ps", "--all", "--filter", label, "--format", "{{.Names}}"]),
            ("network", ["network", "ls", "--filter", label, "--format", "{{.Name}}"]),
        ):
            listed = self._call(listing)
            for stray in listed.stdout.split() if listed is not None else []:
                if kind == "container":
                    remove = self._remove_container(stray)
                else:
                    remove = self._remove_network(stray)
                if self._quiet(remove) == 0:
                    done.append(f"removed {kind} {stray}")
        return done


class _ContainerRun:
    """One workflow in one container: the steps in order, each a numbered
    step of the workflow's log, until one ends the workflow."""

    def __init__(
        self,
        backend: ContainerBackend,
        job: Job,
        log: WorkflowLog,
        plan: ImagePlan,
        workspace: Path,
        name: str,
        network: str | None,
    ) -> None:
        self.backend, self.job, self.log, self.plan = backend, job, log, plan
        self.workspace, self.name, self.network = workspace, name, network
        self.tree, self.home = workspace / "workspace", workspace / "home"
        self.deadline = time.monotonic() + backend.timeout
        self.step_id = 0

    def until_done(self) -> Outcome:
        self.tree.mkdir()
        self.home.mkdir()
        if checkout.wants_clone(self.job):
            outcome = checkout.clone(
                self.job, self.log, self.tree, self.workspace, self.deadline,
                dev=self.backend.context.dev,
                timeout=self.backend.timeout,
                kill_grace=self.backend.kill_grace,
            )  # fmt: skip
            if outcome:
                return outcome
            self.step_id += 1
        pull = f"{self.backend.runtime} pull {self.plan.image}"
        outcome = self._step(PULL_STEP, pull, SYSTEM_STEP, self._start_container)
        if outcome:
            return outcome
        for step_name, command, env in setup_steps(self.plan):
            outcome = self._exec(step_name, command, env, SYSTEM_STEP)
            if outcome:
                return outcome
        for step in self.job.spec.steps:
            outcome = self._exec(step.name, step.command, step.environment, USER_STEP)
            if outcome:
                return outcome
        return Outcome("success")

    def _step(
        self, name: str, command: str, kind: int, body: Callable[[int], Outcome | None]
    ) -> Outcome | None:
        step_id = self.step_id
        self.log.start_step(step_id, name, kind, command)
        try:
            return body(step_id)
        finally:
            self.log.end_step(step_id, name, kind)
            self.step_id += 1

    def _say(self, step_id: int) -> process.OnLine:
        return lambda stream, line: self.log.data(step_id, line, stream)

    def _start_container(self, step_id: int) -> Outcome | None:
        """Pull the image unless it is here, create the network, start the container."""
        backend, say = self.backend, self._say(step_id)
        if not backend.have_image(self.plan.image):
            said: list[str] = []

            def keep(stream: str, line: str) -> None:
                said.append(line)
                say(stream, line)

            pull = ["pull", *backend.pull_flags(), self.plan.image]
            result = backend.runtime_run(self.job, pull, keep, self.deadline)
            outcome = checkout.outcome_of(result, "image pull", backend.timeout)
            if outcome and outcome.status == "failed":
                reason = said[-1] if said else "no output"
                return Outcome("failed", f"image pull failed: {reason[:500]}")
            if outcome:
                return outcome
        if self.network is not None:
            label = f"{INSTANCE_LABEL}={backend.instance}"
            create = ["network", "create", "--label", label, self.network]
            result = backend.runtime_run(self.job, create, say, self.deadline)
            if outcome := checkout.outcome_of(result, "network create", backend.timeout):
                return outcome
        argv = backend.run_argv(
            self.job, self.plan.image, self.tree, self.home, self.name, self.network
        )
        result = backend.runtime_run(self.job, argv, say, self.deadline)
        return checkout.outcome_of(result, "container start", backend.timeout)

    def _exec(self, name: str, command: str, step_env: dict, kind: int) -> Outcome | None:
        def body(step_id: int) -> Outcome | None:
            return self._exec_in_container(step_id, name, command, step_env)

        return self._step(name, command, kind, body)

    def _exec_in_container(
        self, step_id: int, name: str, command: str, step_env: dict[str, str]
    ) -> Outcome | None:
        backend = self.backend
        env = container_environment(self.job, step_env)
        skipped = [key for key in env if not _ENV_NAME.match(key)]
        for key in skipped:
            warning = f"tack: variable {key[:60]!r} not passed: not a valid name"
            self.log.data(step_id, warning, "stderr")
            del env[key]
        argv = ["exec", "--workdir", WORKSPACE_DIR]
        for key in env:
            argv += ["--env", key]  # the value comes from the runtime's environment
        argv += [self.name, "bash", "-c", command]
        result = backend.runtime_run(self.job, argv, self._say(step_id), self.deadline, env)
        if result.cancelled or result.timed_out:
            backend.stop_container(self.name)
        elif result.exit_code == 137:
            limit = f" (memory limit {backend.memory})" if backend.memory else ""
            return Outcome("failed", f"step {name!r} was killed (exit code 137){limit}", 137)
        return checkout.outcome_of(result, f"step {name!r}", backend.timeout)


def instance_label(context: Context) -> str:
    """Names this tack among others on the host: its hostname and state folder."""
    seed = f"{context.hostname}|{'|'.join(context.private_paths)}"
    return hashlib.sha256(seed.encode()).hexdigest()[:16]


def _ulimit(which: int, cap: int) -> str:
    """``limit:limit``: ``cap``, or tack's own hard limit when that is lower."""
    _, hard = resource.getrlimit(which)
    limit = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    return f"{limit}:{limit}"


class UnavailableBackend(Backend):
    """Stands in for an engine tack cannot run here, failing its workflows
    with one line that says what to install or configure."""

    type_name = ""

    def __init__(self, name: str, reason: str, context: Context) -> None:
        self.name = name
        self.context = context
        self.reason = reason

    def run(self, job: Job, log: WorkflowLog) -> Outcome:
        log.error(self.reason, "error")
        return Outcome("failed", self.reason)
