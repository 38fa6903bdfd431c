"""Backends: where a workflow actually runs.

A workflow's ``engine:`` names a backend instance the operator configured,
or, in the original tack's dialect, says ``engine: tack`` and names the
backend's type as the single key of a ``tack:`` block (``Backends.route``).
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .. import logs
from ..config import ConfigError
from ..workflow import WorkflowError, WorkflowSpec, load_document
from ..worklogs import WorkflowLog
from .options import Options

if TYPE_CHECKING:
    from ..api.callbacks import CallbackHub

log = logs.get("backends")


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


class CancelFlag(threading.Event):
    """A workflow's cancel flag. Setting it also sets ``news``, the event a
    backend waiting for word of a remote run (its poll timer, or a CI's
    notification) sleeps on, so a cancel is never left waiting a poll."""

    def __init__(self) -> None:
        super().__init__()
        self.news = threading.Event()

    def set(self) -> None:
        super().set()
        self.news.set()


@dataclass
class Job:
    workflow_id: int
    knot: str
    rkey: str
    name: str
    engine: str
    pipeline_uri: str
    # The pipeline record as the knot sent it (or tack compiled it), shared
    # by every job of the pipeline: read it, never change it.
    pipeline: dict[str, Any]
    workflow: dict[str, Any]  # this workflow's entry in it (name, engine, clone, raw)
    spec: WorkflowSpec
    env: dict[str, str]  # CI and TANGLED_* variables (protocol §2)
    secrets: dict[str, str] = field(default_factory=dict)
    cancel: CancelFlag = field(default_factory=CancelFlag)
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


# The original tack's dialect: ``engine: tack`` with a ``tack:`` block whose
# single key is a backend type (``tack: {buildkite: {pipeline: app}}``).
DIALECT_ENGINE = "tack"


class Backends:
    """The configured backend instances and the engine aliases that point at them."""

    def __init__(self, instances: dict[str, Backend], aliases: dict[str, str] | None = None):
        self.instances = instances
        self.aliases = aliases or {}

    def resolve(self, engine: str) -> Backend | None:
        return self.instances.get(self.aliases.get(engine, engine))

    def route(self, engine: str, raw: str | None) -> Backend:
        """The backend a workflow runs on, from its engine and, for the
        original tack's dialect, its ``tack:`` block; WorkflowError saying
        why there is none. A backend or alias named "tack" is the operator's
        explicit choice and wins over the dialect."""
        backend = self.resolve(engine)
        if backend is not None:
            return backend
        if engine != DIALECT_ENGINE or raw is None:
            raise WorkflowError(f'unknown engine "{engine}"')
        kind = dialect_provider(load_document(raw)[0])
        candidates = [b for b in self.instances.values() if b.type_name == kind]
        if len(candidates) > 1:
            candidates = [b for b in candidates if b.name == kind]
            if not candidates:
                raise WorkflowError(
                    f"engine tack: several {kind} backends are configured and none is named "
                    f'"{kind}"'
                )
        if not candidates:
            raise WorkflowError(f"engine tack: no {kind} backend is configured on this spindle")
        return candidates[0]


def dialect_provider(document: dict[str, Any]) -> str:
    """The backend type a ``tack:`` block names: its single key."""
    block = document.get(DIALECT_ENGINE)
    if not isinstance(block, dict) or len(block) != 1:
        raise WorkflowError(
            "engine tack needs a tack: block with exactly one provider, "
            "e.g. tack: {buildkite: {pipeline: my-app-ci}}"
        )
    kind = next(iter(block))
    if kind not in _types():
        raise WorkflowError(
            f"tack: {str(kind)[:50]!r} is not a provider (one of {', '.join(sorted(_types()))})"
        )
    return kind


def provider_options(job: Job, type_name: str) -> dict[str, Any]:
    """A workflow's options for its backend: the original tack's
    ``tack.<type>`` block when it uses that dialect, else the ``<type>:``
    block; a mapping either way (empty when absent)."""
    document = job.spec.document
    tack_block = document.get(DIALECT_ENGINE)
    where = type_name
    if isinstance(tack_block, dict) and type_name in tack_block:
        section, where = tack_block[type_name], f"tack.{type_name}"
    else:
        section = document.get(type_name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise WorkflowError(f"{where} must be a mapping")
    return section


def _types() -> dict[str, type[Backend]]:
    from .buildbot import BuildbotBackend
    from .buildkite import BuildkiteBackend
    from .command import CommandBackend
    from .container import ContainerBackend
    from .dummy import DummyBackend
    from .github import GitHubBackend
    from .gitlab import GitLabBackend
    from .shell import ShellBackend
    from .sourcehut import SourcehutBackend
    from .tekton import TektonBackend
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
        TektonBackend,
        SourcehutBackend,
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
    for name, (variables, table) in original_tack_tables(os.environ).items():
        try:
            instances[name] = build(name, table, context)
        except ConfigError as exc:
            raise ConfigError(variables, str(exc).split(": ", 1)[1]) from None
    return Backends(instances)


def original_tack_tables(env: Mapping[str, str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The backends the original tack's provider variables configure, as
    tack.toml tables (with the variables to name in an error), so its
    operators switch without writing a tack.toml."""
    tables: dict[str, tuple[str, dict[str, Any]]] = {}
    if env.get("TACK_BUILDKITE_TOKEN"):
        table: dict[str, Any] = {"type": "buildkite", "token_env": "TACK_BUILDKITE_TOKEN"}
        if not env.get("TACK_BUILDKITE_ORG"):
            raise ConfigError("TACK_BUILDKITE_ORG", "is required with TACK_BUILDKITE_TOKEN")
        table["organization"] = env["TACK_BUILDKITE_ORG"]
        if env.get("TACK_BUILDKITE_PIPELINE"):
            table["pipeline"] = env["TACK_BUILDKITE_PIPELINE"]
        mode = env.get("TACK_BUILDKITE_WEBHOOK_MODE", "token").strip().lower() or "token"
        if mode not in ("token", "signature"):
            raise ConfigError(
                "TACK_BUILDKITE_WEBHOOK_MODE", f"must be token or signature ({mode!r})"
            )
        if env.get("TACK_BUILDKITE_WEBHOOK_SECRET"):
            key = "webhook_token_env" if mode == "token" else "webhook_secret_env"
            table[key] = "TACK_BUILDKITE_WEBHOOK_SECRET"
        tables["buildkite"] = ("TACK_BUILDKITE_*", table)
    if env.get("TACK_TEKTON_ENABLED", "").strip().lower() in ("1", "true", "yes", "on"):
        namespace = env.get("TACK_TEKTON_NAMESPACE") or "default"
        tables["tekton"] = ("TACK_TEKTON_*", {"type": "tekton", "namespace": namespace})
    if env.get("TACK_SOURCEHUT_TOKEN"):
        table = {"type": "sourcehut", "token_env": "TACK_SOURCEHUT_TOKEN"}
        if env.get("TACK_SOURCEHUT_INSTANCE"):
            table["instance"] = env["TACK_SOURCEHUT_INSTANCE"]
        tables["sourcehut"] = ("TACK_SOURCEHUT_*", table)
    return tables


NO_CONTAINER_RUNTIME = (
    'engine "nixery" needs a container runtime: install podman (or docker), '
    "or configure a backend for nixery in TACK_CONFIG"
)


def load(path: str | None, context: Context) -> Backends:
    """The backends ``tack.toml`` configures; with no file, ``default_backends``."""
    if path is None:
        return default_backends(context)
    ignored = sorted(variables for variables, _ in original_tack_tables(os.environ).values())
    if ignored:
        log.warning(
            "the original tack's provider variables are ignored: TACK_CONFIG configures "
            "the backends",
            extra={"variables": ignored},
        )
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
