"""``sh.tangled.ci``: the XRPC surface today's appview reads (protocol-2026 §3).

Queries are public: ``queryPipelines``, ``getPipeline`` and
``describeWorkflowDefinition``. Procedures need service auth naming the
method (``lxm``) and push rights on the repo (its owner or a collaborator):
``triggerPipeline`` compiles the repo's workflows at a commit and accepts a
pipeline exactly as intake does; ``cancelPipeline`` ends workflows through
their backends. Pipelines are shown as ``sh.tangled.ci.pipeline`` objects
(``view.py``). Errors carry the lexicons' names.
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import Any

from .. import logs
from ..auth import ServiceAuth
from ..config import is_did
from ..intake.accept import Acceptor, compile_pipeline
from ..intake.compiler import MANUAL, PR_ACTIONS, PULL_REQUEST, Trigger
from ..intake.fetch import FetchError, WorkflowFetcher
from ..pipelines import KINDS, is_input_key
from ..scheduler import Scheduler
from ..statuses import FINAL
from ..store import Directory, Pipeline, Repo, Workflow, pipeline_uri
from . import view
from .xrpc import XrpcError, xrpc_route

log = logs.get("ci")

NSID = "sh.tangled.ci"
MAX_LIMIT, DEFAULT_LIMIT = 250, 50
MAX_COMMITS = 250
MAX_NAMES = 50
_COMMIT = re.compile(r"^([0-9a-f]{40}|[0-9a-f]{64})$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_TID = re.compile(r"^[A-Za-z0-9._:~-]{1,512}$")
_PULL_URI = re.compile(r"^at://did:[a-z]+:[A-Za-z0-9._:%-]+/sh\.tangled\.repo\.pull/[^/]{1,512}$")
TRIGGER_MANUAL = "sh.tangled.ci.trigger#manual"
TRIGGER_PULL_REQUEST = "sh.tangled.ci.trigger#pullRequest"


class CiApi:
    def __init__(
        self,
        auth: ServiceAuth,
        directory: Directory,
        acceptor: Acceptor,
        fetcher: WorkflowFetcher,
        scheduler: Scheduler,
    ) -> None:
        self._auth = auth
        self._directory = directory
        self._acceptor = acceptor
        self._fetcher = fetcher
        self._scheduler = scheduler

    def routes(self) -> tuple[dict, dict]:
        """(GET routes, POST routes) keyed by path."""
        repeated = frozenset({"commits", "kinds"})
        get = {
            f"/xrpc/{NSID}.queryPipelines": xrpc_route(
                self.query_pipelines, "GET", None, repeated=repeated
            ),
            f"/xrpc/{NSID}.getPipeline": xrpc_route(self.get_pipeline, "GET", None),
            f"/xrpc/{NSID}.describeWorkflowDefinition": xrpc_route(
                self.describe_workflow_definition, "GET", None
            ),
        }
        post = {
            f"/xrpc/{NSID}.triggerPipeline": xrpc_route(
                self.trigger_pipeline, "POST", self._auth, require_lxm=True
            ),
            f"/xrpc/{NSID}.cancelPipeline": xrpc_route(
                self.cancel_pipeline, "POST", self._auth, require_lxm=True
            ),
        }
        return get, post

    # --- queries ---------------------------------------------------------------------------

    def query_pipelines(self, _caller: None, params: dict) -> dict:
        repo_did = _did_param(params, "repo")
        commits = params.get("commits") or []
        kinds = params.get("kinds") or []
        if len(commits) > MAX_COMMITS or not all(_COMMIT.match(c) for c in commits):
            raise XrpcError(
                400, "InvalidRequest", f"commits must be at most {MAX_COMMITS} commit ids"
            )
        if not all(kind in KINDS for kind in kinds):
            raise XrpcError(400, "InvalidRequest", f"kinds must be among {', '.join(KINDS)}")
        limit = _int_param(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        before = _cursor_param(params)
        page, total = view.query(repo_did, commits, kinds, limit, before)
        result: dict[str, Any] = {"pipelines": [p.view for p in page], "total": total}
        if len(page) == limit and total > limit:
            result["cursor"] = str(page[-1].seq)
        return result

    def get_pipeline(self, _caller: None, params: dict) -> dict:
        rkey = params.get("pipeline")
        if not isinstance(rkey, str) or not _TID.match(rkey):
            raise XrpcError(400, "InvalidRequest", "pipeline must be a pipeline id (TID)")
        found = view.by_id(rkey)
        if found is None:
            raise XrpcError(404, "PipelineNotFound", f"no pipeline {rkey}")
        return found.view

    def describe_workflow_definition(self, _caller: None, params: dict) -> dict:
        repo = self._served_repo(_did_param(params, "repo"))
        sha = params.get("sha")
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise XrpcError(400, "InvalidRequest", "sha must be 40 lowercase hex characters")
        source = params.get("sourceRepo")
        if source is not None and source != repo.repo_did:
            # tack reads workflows only from the repo itself; a fork's would
            # be a different definition, which it cannot vouch for.
            return {"derived": False}
        files = self._workflow_files(repo, sha)
        return {"derived": True, "hash": definition_hash(files), "workflows": sorted(files)}

    # --- procedures --------------------------------------------------------------------------

    def trigger_pipeline(self, caller: str, params: dict) -> dict:
        repo = self._pushable_repo(caller, params)
        kind, data = _trigger_param(params.get("trigger"), repo)
        names = _names_param(params, "workflows")
        sha = data["sha"] if kind == MANUAL else data["sourceSha"]
        new = compile_pipeline(
            self._fetcher,
            repo,
            Trigger(kind, data),
            self._workflow_files(repo, sha),
            names,
            ids={"did": caller, "repo_did": repo.repo_did, "sha": sha, "via": "trigger"},
        )
        if new is None:
            raise XrpcError(400, "InvalidRequest", "no workflows to run at this commit")
        rkey = self._acceptor.accept(new)
        assert rkey is not None  # nothing to deduplicate against: always new
        return {"pipeline": pipeline_uri(repo.knot, rkey)}

    def cancel_pipeline(self, caller: str, params: dict) -> None:
        repo = self._pushable_repo(caller, params)
        rkey = params.get("pipeline")
        if not isinstance(rkey, str) or not _TID.match(rkey):
            raise XrpcError(400, "InvalidRequest", "pipeline must be a pipeline id (TID)")
        names = _names_param(params, "workflows")
        pipeline = (
            Pipeline.select()
            .where((Pipeline.rkey == rkey) & (Pipeline.repo_did == (repo.repo_did or repo.did)))
            .first()
        )
        if pipeline is None:
            raise XrpcError(404, "PipelineNotFound", f"no pipeline {rkey} in this repo")
        workflows = list(
            Workflow.select().where((Workflow.knot == pipeline.knot) & (Workflow.rkey == rkey))
        )
        if names is not None:
            unknown = sorted(set(names) - {w.name for w in workflows})
            if unknown:
                raise XrpcError(404, "WorkflowNotFound", f"no workflow {unknown[0]!r} here")
            workflows = [w for w in workflows if w.name in names]
        for workflow in workflows:
            if workflow.status in FINAL:
                continue
            outcome = self._scheduler.cancel(workflow.id)
            log.info(
                "workflow cancel asked",
                extra={
                    "did": caller,
                    "pipeline": rkey,
                    "workflow": workflow.name,
                    "outcome": outcome,
                },
            )
        return None

    # --- helpers -----------------------------------------------------------------------------

    def _served_repo(self, repo_did: str) -> Repo:
        repo = self._directory.repo_by_did(repo_did)
        if repo is None:
            raise XrpcError(400, "RepoNotFound", "this spindle serves no repo with that DID")
        return repo

    def _pushable_repo(self, caller: str, params: dict) -> Repo:
        repo = self._served_repo(_did_param(params, "repo"))
        if not self._directory.may_push(repo, caller):
            raise XrpcError(
                403, "AccessControl", "only the repo's owner and collaborators may do this"
            )
        return repo

    def _workflow_files(self, repo: Repo, sha: str) -> dict[str, str]:
        try:
            return self._fetcher.workflow_files(repo.knot, repo.knot_path, sha)
        except FetchError as exc:
            if exc.transient:
                raise XrpcError(502, "UpstreamFailure", f"reading workflows: {exc}") from None
            raise XrpcError(400, "InvalidRequest", f"reading workflows: {exc}") from None


def definition_hash(files: dict[str, str]) -> str:
    """The official fingerprint: sha256 over the files sorted by name, each
    as its name, a NUL, its length (uint64, little-endian) and its content."""
    digest = hashlib.sha256()
    for name in sorted(files):
        content = files[name].encode("utf-8")
        digest.update(name.encode("utf-8") + b"\0" + struct.pack("<Q", len(content)) + content)
    return f"sha256:{digest.hexdigest()}"


def _did_param(params: dict, key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or len(value) > 2048 or not is_did(value):
        raise XrpcError(400, "InvalidRequest", f"{key} must be a DID")
    return value


def _int_param(params: dict, key: str, default: int, low: int, high: int) -> int:
    raw = params.get(key)
    if raw is None:
        return default
    if not (isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 6):
        raise XrpcError(400, "InvalidRequest", f"{key} must be a whole number")
    value = int(raw)
    if not low <= value <= high:
        raise XrpcError(400, "InvalidRequest", f"{key} must be from {low} to {high}")
    return value


def _cursor_param(params: dict) -> int | None:
    raw = params.get("cursor")
    if raw is None or raw == "":
        return None
    if not (isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 19):
        raise XrpcError(400, "InvalidRequest", "cursor is not one this spindle gave out")
    return int(raw)


def _names_param(params: dict, key: str) -> set[str] | None:
    names = params.get(key)
    if names is None or names == []:
        return None
    if (
        not isinstance(names, list)
        or len(names) > MAX_NAMES
        or not all(isinstance(n, str) and 0 < len(n) <= 255 for n in names)
    ):
        raise XrpcError(400, "InvalidRequest", f"{key} must be a list of workflow names")
    return set(names)


def _trigger_param(trigger: Any, repo: Repo) -> tuple[str, dict]:
    """(kind, triggerMetadata data) of a manual or pull request trigger."""
    if not isinstance(trigger, dict):
        raise XrpcError(400, "InvalidRequest", "trigger must be an object")
    source = trigger.get("sourceRepo")
    if source is not None and source != repo.repo_did:
        raise XrpcError(400, "InvalidRequest", "runs from another repo (a fork) are not supported")
    kind = trigger.get("$type")
    if kind == TRIGGER_MANUAL:
        return MANUAL, _manual(trigger)
    if kind == TRIGGER_PULL_REQUEST:
        return PULL_REQUEST, _pull_request(trigger)
    raise XrpcError(
        400, "InvalidRequest", f"trigger.$type must be {TRIGGER_MANUAL} or {TRIGGER_PULL_REQUEST}"
    )


def _manual(trigger: dict) -> dict:
    data: dict[str, Any] = {"sha": _sha_field(trigger, "sha")}
    ref = trigger.get("ref")
    if ref is not None:
        if not isinstance(ref, str) or not 0 < len(ref) <= 2560:
            raise XrpcError(400, "InvalidRequest", "trigger.ref must be a ref name")
        data["ref"] = ref
    inputs = trigger.get("inputs") or []
    if not isinstance(inputs, list) or len(inputs) > 100:
        raise XrpcError(400, "InvalidRequest", "trigger.inputs must be at most 100 pairs")
    pairs = []
    for pair in inputs:
        key = pair.get("key") if isinstance(pair, dict) else None
        value = pair.get("value") if isinstance(pair, dict) else None
        if not isinstance(key, str) or not is_input_key(key):
            raise XrpcError(400, "InvalidRequest", "each input needs a key (no '=' or NUL)")
        if not isinstance(value, str) or len(value) > 4096:
            raise XrpcError(400, "InvalidRequest", f"input {key!r} needs a string value")
        pairs.append({"key": key, "value": value})
    if pairs:
        data["inputs"] = pairs
    return data


def _pull_request(trigger: dict) -> dict:
    data: dict[str, Any] = {"sourceSha": _sha_field(trigger, "sourceSha")}
    for key, required in (("targetBranch", True), ("sourceBranch", False)):
        value = trigger.get(key)
        if value is None and not required:
            continue
        if not isinstance(value, str) or not 0 < len(value) <= 255:
            raise XrpcError(400, "InvalidRequest", f"trigger.{key} must be a branch name")
        data[key] = value
    action = trigger.get("action")
    if action is not None:
        if action not in PR_ACTIONS:
            raise XrpcError(400, "InvalidRequest", f"trigger.action must be one of {PR_ACTIONS}")
        data["action"] = action
    pull = trigger.get("pull")
    if pull is not None:
        if not isinstance(pull, str) or not _PULL_URI.match(pull):
            raise XrpcError(400, "InvalidRequest", "trigger.pull must be a pull request at-uri")
        data["pull"] = pull
    return data


def _sha_field(trigger: dict, key: str) -> str:
    value = trigger.get(key)
    if not isinstance(value, str) or not _SHA.match(value):
        raise XrpcError(400, "InvalidRequest", f"trigger.{key} must be 40 lowercase hex characters")
    return value
