"""Backends: where a workflow actually runs.

A workflow's ``engine:`` names a backend instance the operator configured.
Adding a CI is one module here: subclass ``Backend``, implement ``run`` (and
``resume`` if the remote run survives a tack restart), and register the class
in ``TYPES``. The scheduler owns statuses; a backend only reports log lines
through ``WorkflowLog`` and returns an ``Outcome``:

- ``run(job, log)`` blocks until the workflow is over and returns its outcome.
  It must watch ``job.cancel`` and return ``Outcome("cancelled")`` promptly
  once it is set, and enforce its own timeout (``Outcome("timeout")``). When
  ``job.stopping`` is set too, tack is shutting down: a backend driving an
  outside CI returns without cancelling the remote run.
- ``job.save_state(dict)`` persists what the backend needs to find its run
  again (a remote build id), merged key by key into what was saved before;
  after a restart ``resume(job, log)`` gets the same job with ``job.state``
  filled in, and returns None if it cannot resume.
  Saving ``log.checkpoint(state)`` also records the log's size: before a
  resume the log is cut back to it, so lines the backend wrote after its last
  save, which it will write again from the saved state, appear once.
"""

from __future__ import annotations

import os
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import ConfigError
from ..workflow import WorkflowSpec
from ..worklogs import WorkflowLog
from .options import Options

if TYPE_CHECKING:
    from ..api.callbacks import CallbackHub


@dataclass
class Context:
    """What backends may need from the rest of tack."""

    hostname: str
    dev: bool
    callbacks: CallbackHub | None = None
    # tack's own state (database, key file, logs): what a sandbox hides.
    private_paths: tuple[str, ...] = ()
    # Defaults of container backends from the official spindle's settings
    # (registry, timeout, memory), for a drop-in switch.
    container_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def public_url(self) -> str:
        return f"{'http' if self.dev else 'https'}://{self.hostname}"

    @classmethod
    def for_config(cls, config: Any) -> Context:
        """The context of a configured tack: its name and its state's folders."""
        state = {
            os.path.dirname(os.path.abspath(config.db_path)),
            os.path.abspath(config.log_dir),
            os.path.dirname(os.path.abspath(config.key_file)),
        }
        defaults: dict[str, Any] = {}
        if config.nixery_registry:
            defaults["registry"] = config.nixery_registry
        if config.nixery_timeout:
            defaults["timeout"] = config.nixery_timeout
        if config.nixery_memory_mb:
            defaults["memory"] = f"{config.nixery_memory_mb}m"
        return cls(
            config.hostname,
            config.dev,
            private_paths=tuple(sorted(state)),
            container_defaults=defaults,
        )


@dataclass
class Outcome:
    status: str  # success | failed | timeout | cancelled
    error: str | None = None
    exit_code: int | None = None


@dataclass
class Job:
    workflow_id: int
    knot: str
    rkey: str
    name: str
    engine: str
    pipeline_uri: str
    pipeline: dict[str, Any]  # the pipeline record as the knot sent it
    workflow: dict[str, Any]  # this workflow's entry in it (name, engine, clone, raw)
    spec: WorkflowSpec
    env: dict[str, str]  # CI and TANGLED_* variables (protocol §2)
    secrets: dict[str, str] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    # Set together with ``cancel`` when tack itself shuts down: stop watching,
    # but leave a remote run alone, since the next start resumes it.
    stopping: threading.Event = field(default_factory=threading.Event)
    state: dict[str, Any] = field(default_factory=dict)
    save_state: Callable[[dict[str, Any]], None] = lambda state: None


def job_environment(job: Job, step_env: dict[str, str] | None = None) -> dict[str, str]:
    """What every backend gives a step (protocol §2): workflow env < step env
    < TANGLED_* < secrets, later sources winning."""
    env = dict(job.spec.environment)
    env.update(step_env or {})
    env.update(job.env)
    env.update(job.secrets)
    return env


class Backend:
    type_name: ClassVar[str] = ""

    def __init__(self, name: str, options: Options, context: Context) -> None:
        """Read and check every option here, so mistakes stop tack at start-up."""
        self.name = name
        self.context = context

    def run(self, job: Job, log: WorkflowLog) -> Outcome:
        raise NotImplementedError

    def resume(self, job: Job, log: WorkflowLog) -> Outcome | None:
        """Pick up a run a previous tack process started; None: not possible."""
        return None

    def end_leftovers(self, state: dict[str, Any]) -> list[str]:
        """End what a dead tack's run of this backend left (its saved
        ``state`` says what), before the workflow is reported; what was done."""
        from . import process

        return process.end_leftovers(state)

    def remove_strays(self) -> list[str]:
        """At start, before any workflow runs: remove what this backend's runs
        left that no saved state names (containers); what was removed."""
        return []


class Backends:
    """The configured backend instances and the engine aliases that point at them."""

    def __init__(self, instances: dict[str, Backend], aliases: dict[str, str] | None = None):
        self.instances = instances
        self.aliases = aliases or {}

    def resolve(self, engine: str) -> Backend | None:
        return self.instances.get(self.aliases.get(engine, engine))


def _types() -> dict[str, type[Backend]]:
    from .buildbot import BuildbotBackend
    from .buildkite import BuildkiteBackend
    from .command import CommandBackend
    from .container import ContainerBackend
    from .dummy import DummyBackend
    from .github import GitHubBackend
    from .gitlab import GitLabBackend
    from .shell import ShellBackend
    from .webhook import WebhookBackend

    classes = (
        ShellBackend,
        ContainerBackend,
        CommandBackend,
        WebhookBackend,
        DummyBackend,
        BuildbotBackend,
        GitHubBackend,
        GitLabBackend,
        BuildkiteBackend,
    )
    return {cls.type_name: cls for cls in classes}


def build(name: str, raw: dict[str, Any], context: Context) -> Backend:
    types = _types()
    kind = raw.get("type")
    if kind not in types:
        raise ConfigError(
            "TACK_CONFIG", f"backends.{name}.type: must be one of {', '.join(sorted(types))}"
        )
    options = Options(name, raw)
    backend = types[kind](name, options, context)
    options.finish()
    return backend


def default_backends(context: Context) -> Backends:
    """Without ``tack.toml``: a shell backend named shell, and for ``engine:
    nixery`` (nearly every Tangled workflow) a container backend named nixery
    when podman or docker is installed; without either, nixery workflows
    fail with one line saying what to install."""
    from .container import UnavailableBackend, find_runtime

    instances = {"shell": build("shell", {"type": "shell"}, context)}
    if find_runtime() is not None:
        instances["nixery"] = build("nixery", {"type": "container"}, context)
    else:
        instances["nixery"] = UnavailableBackend("nixery", NO_CONTAINER_RUNTIME, context)
    return Backends(instances)


NO_CONTAINER_RUNTIME = (
    'engine "nixery" needs a container runtime: install podman (or docker), '
    "or configure a backend for nixery in TACK_CONFIG"
)


def load(path: str | None, context: Context) -> Backends:
    """The backends ``tack.toml`` configures; with no file, ``default_backends``."""
    if path is None:
        return default_backends(context)
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("TACK_CONFIG", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("TACK_CONFIG", f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"backends", "aliases"})
    if unknown:
        raise ConfigError(
            "TACK_CONFIG", f"{unknown[0]}: unknown section (expected backends, aliases)"
        )
    sections = document.get("backends", {})
    if not isinstance(sections, dict) or not sections:
        raise ConfigError("TACK_CONFIG", "backends: at least one [backends.NAME] table is required")
    instances = {}
    for name, raw in sections.items():
        if not isinstance(raw, dict):
            raise ConfigError("TACK_CONFIG", f"backends.{name}: must be a table")
        instances[name] = build(name, raw, context)
    aliases = document.get("aliases", {})
    if not isinstance(aliases, dict):
        raise ConfigError("TACK_CONFIG", "aliases: must be a table of engine = backend")
    for engine, target in aliases.items():
        if target not in instances:
            raise ConfigError("TACK_CONFIG", f"aliases.{engine}: no backend named {target!r}")
    return Backends(instances, dict(aliases))
