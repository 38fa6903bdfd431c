"""The pipeline model every intake path produces and every surface reads.

A pipeline is the ``sh.tangled.pipeline`` record (``triggerMetadata`` and
``workflows``), whoever compiled it: an older knot, or tack itself from a ref
update, a pull request or ``triggerPipeline``. From it come the environment
every workflow gets (protocol-2026 §5.6) and the trigger the
``sh.tangled.ci.pipeline`` view shows. Everything here is pure.
"""

from __future__ import annotations

from typing import Any

NSID = "sh.tangled.pipeline"
KINDS = ("push", "pull_request", "manual")
TRIGGER_KEYS = {"push": "push", "pull_request": "pullRequest", "manual": "manual"}
CI_TRIGGER_TYPES = {
    "push": "sh.tangled.ci.trigger#push",
    "pull_request": "sh.tangled.ci.trigger#pullRequest",
    "manual": "sh.tangled.ci.trigger#manual",
}
MAX_WORKFLOW_NAME = 255


def is_workflow_name(value: Any) -> bool:
    """A workflow is named by its file name: any text a file name can be.

    Names never reach a path (logs are named by number), so only what cannot
    be a file name is refused: separators, NUL and other control characters.
    """
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_WORKFLOW_NAME
        and value not in (".", "..")
        and "/" not in value
        and all(ord(char) >= 32 and char != "\x7f" for char in value)
    )


def is_input_key(key: str) -> bool:
    """Any text can key a manual input, but it becomes ``TANGLED_INPUT_<KEY>``:
    an environment variable's name cannot hold ``=`` or NUL."""
    return 0 < len(key) <= 100 and "=" not in key and "\0" not in key


def trigger_data(record: dict) -> dict[str, Any]:
    trigger = record["triggerMetadata"]
    return trigger.get(TRIGGER_KEYS[trigger["kind"]]) or {}


def commit_sha(record: dict) -> str | None:
    """The commit a pipeline runs on: push newSha, PR sourceSha, manual sha."""
    trigger = record["triggerMetadata"]
    data = trigger_data(record)
    key = {"push": "newSha", "pull_request": "sourceSha", "manual": "sha"}[trigger["kind"]]
    return data.get(key) or None


def repo_path(repo: dict) -> str:
    """The repository's path on its knot: the repo DID today, owner/name before."""
    if repo.get("repoDid"):
        return repo["repoDid"]
    return f"{repo['did']}/{repo.get('repo', '')}"


def repo_url(repo: dict, dev: bool) -> str:
    return f"{'http' if dev else 'https'}://{repo['knot']}/{repo_path(repo)}"


def tangled_env(record: dict, pipeline_uri: str, dev: bool) -> dict[str, str]:
    """The CI and TANGLED_* variables, named as the official spindle names them."""
    trigger = record["triggerMetadata"]
    repo = trigger["repo"]
    kind = trigger["kind"]
    env = {
        "CI": "true",
        "TANGLED_PIPELINE_ID": pipeline_uri,
        "TANGLED_PIPELINE_KIND": kind,
        "TANGLED_PIPELINE_SOURCE": trigger.get("sourceRepo") or repo.get("repoDid") or repo["did"],
        "TANGLED_REPO_KNOT": repo["knot"],
        "TANGLED_REPO_DID": repo["did"],
        "TANGLED_REPO_NAME": repo.get("repo") or "",
        "TANGLED_REPO_REPO_DID": repo.get("repoDid") or "",
        "TANGLED_REPO_DEFAULT_BRANCH": repo.get("defaultBranch") or "",
        "TANGLED_REPO_URL": repo_url(repo, dev),
    }
    data = trigger_data(record)
    if kind == "push":
        env.update(_ref_env(data["ref"], data["newSha"]))
    elif kind == "pull_request":
        env.update(_ref_env(f"refs/heads/{data.get('sourceBranch', '')}", data["sourceSha"]))
        env.update(
            TANGLED_PR_SOURCE_BRANCH=data.get("sourceBranch", ""),
            TANGLED_PR_TARGET_BRANCH=data.get("targetBranch", ""),
            TANGLED_PR_SOURCE_SHA=data["sourceSha"],
            TANGLED_PIPELINE_SOURCE_BRANCH=data.get("sourceBranch", ""),
            TANGLED_PIPELINE_TARGET_BRANCH=data.get("targetBranch", ""),
        )
        if data.get("action"):
            env["TANGLED_PR_ACTION"] = data["action"]
    else:
        sha = data.get("sha")
        if sha and data.get("ref"):
            env.update(_ref_env(data["ref"], sha))
        elif sha:
            env.update(TANGLED_SHA=sha, TANGLED_COMMIT_SHA=sha)
        for pair in data.get("inputs", []):
            env[f"TANGLED_INPUT_{pair['key'].upper()}"] = pair["value"]
    return env


def _ref_env(ref: str, sha: str) -> dict[str, str]:
    if ref.startswith("refs/tags/"):
        ref_type, name = "tag", ref.removeprefix("refs/tags/")
    else:
        ref_type, name = "branch", ref.removeprefix("refs/heads/")
    return {
        "TANGLED_REF": ref,
        "TANGLED_REF_NAME": name,
        "TANGLED_REF_TYPE": ref_type,
        "TANGLED_SHA": sha,
        "TANGLED_COMMIT_SHA": sha,
    }


def ci_trigger(record: dict) -> dict[str, Any]:
    """The ``sh.tangled.ci.trigger`` union member for a pipeline record."""
    trigger = record["triggerMetadata"]
    kind = trigger["kind"]
    data = trigger_data(record)
    if kind == "push":
        fields = {key: data[key] for key in ("ref", "newSha", "oldSha")}
    elif kind == "pull_request":
        fields = {
            key: data[key]
            for key in ("targetBranch", "sourceSha", "sourceBranch", "action", "pull")
            if data.get(key)
        }
    else:
        fields = {key: data[key] for key in ("sha", "ref", "inputs") if data.get(key)}
    if trigger.get("sourceRepo") and kind != "push":
        fields["sourceRepo"] = trigger["sourceRepo"]
    return {"$type": CI_TRIGGER_TYPES[kind], **fields}
