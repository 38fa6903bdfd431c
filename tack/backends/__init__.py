"""Backends: where a workflow actually runs.

A workflow's ``engine:`` names a backend instance the operator configured.
Adding a CI is one module here: subclass ``Backend``, implement ``run`` (and
``resume`` if the remote run survives a tack restart), and register the class
in ``TYPES``. The scheduler owns statuses; a backend only reports log lines
through ``WorkflowLog`` and returns an ``Outcome``:

- ``run(job, log)`` blocks until the workflow is over and returns its outcome.
  It must watch ``job.cancel`` and return ``Outcome("cancelled")`` promptly
  once it is set, and enforce its own timeout (``Outcome("timeout")``).
- ``job.save_state(dict)`` persists what the backend needs to find its run
  again (a remote build id); after a restart ``resume(job, log)`` gets the
  same job with ``job.state`` filled in, and returns None if it cannot resume.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..workflow import WorkflowSpec
from ..worklogs import WorkflowLog


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
    state: dict[str, Any] = field(default_factory=dict)
    save_state: Callable[[dict[str, Any]], None] = lambda state: None


class Backend:
    type_name: ClassVar[str] = ""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name = name
        self.options = options

    def run(self, job: Job, log: WorkflowLog) -> Outcome:
        raise NotImplementedError

    def resume(self, job: Job, log: WorkflowLog) -> Outcome | None:
        """Pick up a run a previous tack process started; None: not possible."""
        return None


class Backends:
    """The configured backend instances and the engine aliases that point at them."""

    def __init__(self, instances: dict[str, Backend], aliases: dict[str, str] | None = None):
        self.instances = instances
        self.aliases = aliases or {}

    def resolve(self, engine: str) -> Backend | None:
        return self.instances.get(self.aliases.get(engine, engine))


def default_backends() -> Backends:
    from .dummy import DummyBackend

    return Backends({"dummy": DummyBackend("dummy", {})})
