"""Workflow definitions: the ``raw`` YAML of a pipeline's workflow, parsed safely.

The YAML comes from a repository, so it is untrusted: it is size-limited,
loaded with the safe loader (no Python objects), and checked for the shapes
tack relies on. Anything wrong fails that one workflow with a message the
repo owner can act on; it never reaches the process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

MAX_RAW_BYTES = 256 * 1024
MAX_STEPS = 200
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WorkflowError(Exception):
    """The workflow file cannot be run as written."""


@dataclass(frozen=True)
class Step:
    name: str
    command: str
    environment: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkflowSpec:
    steps: list[Step]
    environment: dict[str, str]
    document: dict[str, Any]  # the whole mapping, for keys a backend documents


def parse(raw: str) -> WorkflowSpec:
    if len(raw.encode("utf-8", errors="replace")) > MAX_RAW_BYTES:
        raise WorkflowError(f"workflow file is larger than {MAX_RAW_BYTES} bytes")
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise WorkflowError(f"invalid YAML: {exc}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise WorkflowError("workflow file must be a mapping at the top level")
    steps_raw = document.get("steps") or []
    if not isinstance(steps_raw, list):
        raise WorkflowError("steps must be a list")
    if len(steps_raw) > MAX_STEPS:
        raise WorkflowError(f"more than {MAX_STEPS} steps")
    steps = [_step(index, item) for index, item in enumerate(steps_raw, start=1)]
    return WorkflowSpec(steps, environment(document.get("environment"), "environment"), document)


def _step(index: int, item: Any) -> Step:
    where = f"steps[{index}]"
    if not isinstance(item, dict):
        raise WorkflowError(f"{where} must be a mapping with name and command")
    name = item.get("name", f"step {index}")
    command = item.get("command")
    if not isinstance(name, str) or not name.strip():
        raise WorkflowError(f"{where}.name must be a non-empty string")
    if not isinstance(command, str) or not command.strip():
        raise WorkflowError(f"{where}.command must be a non-empty string")
    return Step(name, command, environment(item.get("environment"), f"{where}.environment"))


def environment(value: Any, where: str) -> dict[str, str]:
    """A mapping of variable names to scalar values, as strings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WorkflowError(f"{where} must be a mapping of NAME: value")
    result = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise WorkflowError(f"{where}: {key!r} is not a valid variable name")
        if isinstance(item, dict | list):
            raise WorkflowError(f"{where}.{key} must be a string, number or boolean")
        if isinstance(item, bool):
            item = "true" if item else "false"
        result[key] = "" if item is None else str(item)
    return result
