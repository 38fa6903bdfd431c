"""Pipeline records a Dec 2025 knot compiles itself (``sh.tangled.pipeline``).

Knots of that era send the compiled pipeline on their event stream; tack
still takes them (under the knot's rkey) so an operator need not know which
knot is which. Everything here is pure; a record that fails raises
``Rejected`` with a reason fit for a log line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..config import is_did
from ..pipelines import KINDS, is_input_key, is_workflow_name

MAX_WORKFLOWS = 64
MAX_RAW = 256 * 1024
_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPO_NAME = re.compile(r"^[A-Za-z0-9._-]{1,255}$")


class Rejected(Exception):
    """A pipeline tack will not run; the message says why."""


@dataclass(frozen=True)
class PipelineRecord:
    record: dict[str, Any]
    kind: str
    knot: str
    owner: str
    repo_name: str | None
    repo_did: str | None
    workflows: list[dict[str, Any]]


def _obj(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise Rejected(f"{where} must be an object")
    return value


def _str(obj: dict, key: str, where: str, *, required: bool = True, limit: int = 1024) -> Any:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise Rejected(f"{where}.{key} must be a string of at most {limit} characters")
    return value


def _sha(obj: dict, key: str, where: str) -> str:
    value = _str(obj, key, where, limit=40)
    if not _SHA.match(value):
        raise Rejected(f"{where}.{key} must be 40 lowercase hex characters")
    return value


def validate(record: Any) -> PipelineRecord:
    record = _obj(record, "record")
    trigger = _obj(record.get("triggerMetadata"), "triggerMetadata")
    kind = trigger.get("kind")
    if kind not in KINDS:
        raise Rejected(f"triggerMetadata.kind must be one of {', '.join(KINDS)}")
    repo = _obj(trigger.get("repo"), "triggerMetadata.repo")
    knot = _str(repo, "knot", "repo", limit=260).lower()
    owner = _str(repo, "did", "repo", limit=2048)
    if not is_did(owner):
        raise Rejected("repo.did is not a DID")
    _str(repo, "defaultBranch", "repo", limit=255)
    repo_name = _str(repo, "repo", "repo", required=False, limit=255)
    if repo_name is not None and not _REPO_NAME.match(repo_name):
        raise Rejected("repo.repo is not a valid repository name")
    repo_did = _str(repo, "repoDid", "repo", required=False, limit=2048)
    if repo_did is not None and not is_did(repo_did):
        raise Rejected("repo.repoDid is not a DID")
    if repo_name is None and repo_did is None:
        raise Rejected("repo names neither repo nor repoDid")
    _validate_trigger(kind, trigger)
    workflows = record.get("workflows")
    if not isinstance(workflows, list) or not workflows:
        raise Rejected("workflows must be a non-empty list")
    if len(workflows) > MAX_WORKFLOWS:
        raise Rejected(f"more than {MAX_WORKFLOWS} workflows")
    names = [_validate_workflow(i, w) for i, w in enumerate(workflows)]
    if len(set(names)) != len(names):
        raise Rejected("workflow names are not unique")
    return PipelineRecord(record, kind, knot, owner, repo_name, repo_did, workflows)


def _validate_trigger(kind: str, trigger: dict) -> None:
    if kind == "push":
        push = _obj(trigger.get("push"), "push")
        _str(push, "ref", "push")
        _sha(push, "newSha", "push")
        _sha(push, "oldSha", "push")
    elif kind == "pull_request":
        pr = _obj(trigger.get("pullRequest"), "pullRequest")
        for key in ("sourceBranch", "targetBranch", "action"):
            _str(pr, key, "pullRequest")
        _sha(pr, "sourceSha", "pullRequest")
    else:
        manual = _obj(trigger.get("manual", {}), "manual")
        inputs = manual.get("inputs", [])
        if not isinstance(inputs, list) or len(inputs) > 100:
            raise Rejected("manual.inputs must be a list of at most 100 pairs")
        for pair in inputs:
            pair = _obj(pair, "manual.inputs[]")
            key = _str(pair, "key", "manual.inputs[]", limit=100)
            _str(pair, "value", "manual.inputs[]", limit=4096)
            if not is_input_key(key):
                raise Rejected(f"manual input key {key[:100]!r} cannot name a variable")


def _validate_workflow(index: int, workflow: Any) -> str:
    where = f"workflows[{index}]"
    workflow = _obj(workflow, where)
    name = workflow.get("name")
    if not is_workflow_name(name):
        raise Rejected(f"{where}.name must be a file name of 1 to 255 characters")
    _str(workflow, "engine", where, limit=100)
    _str(workflow, "raw", where, limit=MAX_RAW)
    clone = _obj(workflow.get("clone", {}), f"{where}.clone")
    for key in ("skip", "submodules", "tags"):
        if key in clone and not isinstance(clone[key], bool):
            raise Rejected(f"{where}.clone.{key} must be a boolean")
    depth = clone.get("depth", 1)
    if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= 1_000_000:
        raise Rejected(f"{where}.clone.depth must be a non-negative integer")
    return name
