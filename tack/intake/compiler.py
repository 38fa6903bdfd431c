"""The ``when`` compiler: which of a repo's workflow files a trigger runs.

Semantics are the official spindle's (protocol-2026 §5.5): a workflow runs
when any of its ``when`` constraints matches, or always when it has none;
manual triggers skip matching. A constraint matches when its ``event`` lists
the trigger's kind and, for a push, the ref matches ``branch`` (refs/heads/*)
or ``tag`` (refs/tags/*); for a pull request, the target branch matches
``branch`` and the action is in ``types`` (default opened, reopened,
synchronize; a missing action counts as opened); and, when ``paths`` is set,
some changed file matches one of its globs. Globs are doublestar globs: ``*``
stays within one path segment, ``**`` crosses them.

A file that cannot be understood (bad YAML, no ``engine``) still yields a
compiled workflow, carrying the error, so that one workflow fails visibly and
its siblings run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wcmatch import glob

from ..workflow import WorkflowError, load_document

PUSH, PULL_REQUEST, MANUAL = "push", "pull_request", "manual"
KINDS = (PUSH, PULL_REQUEST, MANUAL)
DEFAULT_PR_ACTIONS = ("opened", "reopened", "synchronize")
PR_ACTIONS = ("opened", "reopened", "closed", "merged", "synchronize")
_GLOB_FLAGS = glob.GLOBSTAR | glob.DOTGLOB | glob.BRACE
MAX_ENGINE = 100


@dataclass(frozen=True)
class Trigger:
    """What started a pipeline: the kind and its ``triggerMetadata`` data."""

    kind: str
    data: dict[str, Any]  # push: ref/oldSha/newSha; pull_request: …; manual: sha/ref/inputs
    changed_files: tuple[str, ...] = ()

    @property
    def action(self) -> str:
        return self.data.get("action") or "opened"


@dataclass(frozen=True)
class CompiledWorkflow:
    """One workflow of a pipeline as the ``sh.tangled.pipeline`` record carries it;
    ``error`` set means it fails at once with that message."""

    name: str
    engine: str
    clone: dict[str, Any]
    raw: str
    error: str | None = None

    def entry(self) -> dict[str, Any]:
        return {"name": self.name, "engine": self.engine, "clone": self.clone, "raw": self.raw}


def compile_workflows(files: dict[str, str], trigger: Trigger) -> list[CompiledWorkflow]:
    """The workflows ``trigger`` runs, in file-name order; [] when none matches."""
    compiled = []
    for name in sorted(files):
        workflow = _compile_one(name, files[name], trigger)
        if workflow is not None:
            compiled.append(workflow)
    return compiled


def _compile_one(name: str, raw: str, trigger: Trigger) -> CompiledWorkflow | None:
    try:
        document, _ = load_document(raw)
        engine = _engine(document)
        clone = _clone(document.get("clone"))
        when = _constraints(document.get("when"))
    except WorkflowError as exc:
        # Unparseable: fail this one visibly rather than guess whether it matched.
        return CompiledWorkflow(name, "", _clone(None), raw, f"{name}: {exc}")
    if not matches(when, trigger):
        return None
    return CompiledWorkflow(name, engine, clone, raw)


def _engine(document: dict) -> str:
    engine = document.get("engine")
    if engine is None or engine == "":
        raise WorkflowError("engine is required")
    if not isinstance(engine, str) or len(engine) > MAX_ENGINE:
        raise WorkflowError(f"engine must be a string of at most {MAX_ENGINE} characters")
    return engine


def _clone(value: Any) -> dict[str, Any]:
    """Clone options with the official defaults: submodules and tags on unless set false."""
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise WorkflowError("clone must be a mapping")
    options: dict[str, Any] = {"skip": False, "depth": 1, "submodules": True, "tags": True}
    for key in ("skip", "submodules", "tags"):
        if value.get(key) is not None:
            if not isinstance(value[key], bool):
                raise WorkflowError(f"clone.{key} must be true or false")
            options[key] = value[key]
    depth = value.get("depth", 1)
    if depth is None:
        depth = 1
    if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= 1_000_000:
        raise WorkflowError("clone.depth must be a non-negative whole number")
    options["depth"] = depth
    return options


@dataclass(frozen=True)
class Constraint:
    event: tuple[str, ...]
    branch: tuple[str, ...]
    tag: tuple[str, ...]
    types: tuple[str, ...]
    paths: tuple[str, ...]


def _constraints(value: Any) -> list[Constraint]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise WorkflowError("when must be a list of constraints")
    constraints = []
    for index, item in enumerate(value):
        where = f"when[{index}]"
        if not isinstance(item, dict):
            raise WorkflowError(f"{where} must be a mapping")
        constraints.append(
            Constraint(
                event=_string_list(item.get("event"), f"{where}.event"),
                branch=_string_list(item.get("branch"), f"{where}.branch"),
                tag=_string_list(item.get("tag"), f"{where}.tag"),
                types=_string_list(item.get("types"), f"{where}.types"),
                paths=_string_list(item.get("paths"), f"{where}.paths"),
            )
        )
    return constraints


def _string_list(value: Any, where: str) -> tuple[str, ...]:
    """A scalar or a list of scalars, as the official StringList accepts."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise WorkflowError(f"{where} must be a string or a list of strings")


def matches(constraints: list[Constraint], trigger: Trigger) -> bool:
    if trigger.kind == MANUAL or not constraints:
        return True
    return any(_constraint_matches(c, trigger) for c in constraints)


def _constraint_matches(constraint: Constraint, trigger: Trigger) -> bool:
    if trigger.kind not in constraint.event:
        return False
    if trigger.kind == PULL_REQUEST:
        if not _any_glob(trigger.data.get("targetBranch", ""), constraint.branch):
            return False
        if trigger.action not in (constraint.types or DEFAULT_PR_ACTIONS):
            return False
    if trigger.kind == PUSH and not _ref_matches(trigger.data.get("ref", ""), constraint):
        return False
    if constraint.paths:
        return any(_any_glob(path, constraint.paths) for path in trigger.changed_files)
    return True


def _ref_matches(ref: str, constraint: Constraint) -> bool:
    if ref.startswith("refs/heads/"):
        return _any_glob(ref.removeprefix("refs/heads/"), constraint.branch)
    if ref.startswith("refs/tags/"):
        return _any_glob(ref.removeprefix("refs/tags/"), constraint.tag)
    return False


def _any_glob(name: str, patterns: tuple[str, ...]) -> bool:
    return any(glob.globmatch(name, pattern, flags=_GLOB_FLAGS) for pattern in patterns)
