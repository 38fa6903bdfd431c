"""Workflow definitions: the ``raw`` YAML of a pipeline's workflow, parsed safely.

The YAML comes from a repository, so it is untrusted: it is size-limited,
loaded with the safe loader (no Python objects), and checked for the shapes
tack relies on. Anything wrong fails that one workflow with a message the
repo owner can act on; it never reaches the process.
"""

from __future__ import annotations

import copy
import functools
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


UNREADABLE = "\0unreadable: "  # how intake marks a file it could not read as text
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TEXT_LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


def load_document(raw: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The workflow file as typed YAML, and as text (every scalar as written).

    The typed form answers ``engine``, ``when`` and ``clone``; the text form
    gives environment values and step fields exactly as the file spells them
    (``3.10`` stays ``3.10``, ``yes`` stays ``yes``), as the official spindle
    reads them into strings. Any failure to understand the file, whatever
    the parser raises, is a WorkflowError.

    The same file comes back on every push, and is read at intake and again
    by its worker: small files are parsed once and kept (a realistic one
    took 290 µs; a copy takes 40). Each caller gets its own copy, free to
    change.
    """
    if len(raw) > KEPT_RAW_CHARS:
        return _load_document(raw)
    return copy.deepcopy(_load_kept(raw))


# Files parsed once and kept: at most this many, each at most this long
# (realistic workflow files are a few hundred bytes).
KEPT_DOCUMENTS = 128
KEPT_RAW_CHARS = 8192


@functools.lru_cache(maxsize=KEPT_DOCUMENTS)
def _load_kept(raw: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``_load_document``, kept (what it raises is not: bad files are rare)."""
    return _load_document(raw)


def _load_document(raw: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if raw.startswith(UNREADABLE):
        raise WorkflowError(raw.removeprefix(UNREADABLE))
    if len(raw.encode("utf-8", errors="replace")) > MAX_RAW_BYTES:
        raise WorkflowError(f"workflow file is larger than {MAX_RAW_BYTES} bytes")
    if "*" in raw and _has_alias(raw):
        # An alias repeats what its anchor holds: a few hundred bytes of
        # nested aliases expand to gigabytes ("billion laughs").
        raise WorkflowError("YAML aliases (*name) are not allowed in workflow files")
    try:
        document = yaml.load(raw, Loader=_LOADER)  # a safe loader: no Python objects
        text = yaml.load(raw, Loader=_TEXT_LOADER)  # every scalar a string
    except yaml.YAMLError as exc:
        raise WorkflowError(f"invalid YAML: {exc}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        # Values the safe loader cannot build (a date like 2024-13-45) or
        # nesting too deep: the file is wrong, not tack.
        raise WorkflowError(f"invalid YAML: {type(exc).__name__}: {str(exc)[:200]}") from None
    if document is None:
        document, text = {}, {}
    if not isinstance(document, dict) or not isinstance(text, dict):
        raise WorkflowError("workflow file must be a mapping at the top level")
    return document, text


def _has_alias(raw: str) -> bool:
    """Whether the document uses an alias, from the parser's events (so an
    asterisk in a string or a comment does not count)."""
    try:
        return any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(raw, Loader=_LOADER))
    except yaml.YAMLError:
        return False  # the loader will say what is wrong with it


def parse(raw: str) -> WorkflowSpec:
    document, text = load_document(raw)
    steps_raw = document.get("steps") or []
    if not isinstance(steps_raw, list):
        raise WorkflowError("steps must be a list")
    if len(steps_raw) > MAX_STEPS:
        raise WorkflowError(f"more than {MAX_STEPS} steps")
    steps_text = text.get("steps") or []
    steps = [
        _step(index, item, steps_text[index - 1]) for index, item in enumerate(steps_raw, start=1)
    ]
    env = environment(document.get("environment"), "environment", text.get("environment"))
    return WorkflowSpec(steps, env, document)


def _step(index: int, item: Any, text: Any) -> Step:
    where = f"steps[{index}]"
    if not isinstance(item, dict) or not isinstance(text, dict):
        raise WorkflowError(f"{where} must be a mapping with name and command")
    name = _scalar_text(item.get("name"), text.get("name")) or f"step {index}"
    command = _scalar_text(item.get("command"), text.get("command"))
    if not name.strip():
        raise WorkflowError(f"{where}.name must be a non-empty string")
    if command is None or not command.strip():
        raise WorkflowError(f"{where}.command must be a non-empty string")
    env = environment(item.get("environment"), f"{where}.environment", text.get("environment"))
    return Step(name, command, env)


def _scalar_text(value: Any, text: Any) -> str | None:
    """A scalar as the file wrote it; None when absent or not a scalar."""
    if value is None or isinstance(value, dict | list) or not isinstance(text, str):
        return None
    return text


def environment(value: Any, where: str, text: Any = None) -> dict[str, str]:
    """A mapping of variable names to scalar values, as the file spells them."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WorkflowError(f"{where} must be a mapping of NAME: value")
    text = text if isinstance(text, dict) else {}
    result = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise WorkflowError(f"{where}: {key!r} is not a valid variable name")
        if isinstance(item, dict | list):
            raise WorkflowError(f"{where}.{key} must be a string, number or boolean")
        spelled = text.get(key)
        if item is None:
            result[key] = ""
        elif isinstance(spelled, str):
            result[key] = spelled
        else:
            result[key] = "true" if item is True else "false" if item is False else str(item)
    return result
