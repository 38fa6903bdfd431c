"""XRPC methods the Tangled appview calls (protocol §5), and who may call them.

Every method but ``sh.tangled.owner`` needs atproto service auth (auth.py).
The caller must be the repo's owner or one of its collaborators, as the
collaborator records *that owner wrote* say (from the jetstream store; no
PDS round trip). Bodies are size-limited and type-checked; errors are
``{"error": Name, "message": ...}`` with a 4xx status.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from .. import logs
from ..auth import AuthError, ServiceAuth
from ..scheduler import Scheduler
from ..secrets import KEY_RE, MAX_KEY, MAX_VALUE, DuplicateSecret, SecretStore, TooManySecrets
from ..store import Directory, Pipeline, Repo, Workflow

if TYPE_CHECKING:
    from .server import Handler

log = logs.get("xrpc")

_REPO_URI = re.compile(
    r"^at://(?P<did>did:[a-z]+:[A-Za-z0-9._:%-]+)/sh\.tangled\.repo/(?P<rkey>[A-Za-z0-9._:~-]{1,512})$"
)
_PIPELINE_URI = re.compile(
    r"^at://did:web:(?P<knot>[A-Za-z0-9.:%-]{1,260})/sh\.tangled\.pipeline/(?P<rkey>[A-Za-z0-9._:~-]{1,512})$"
)
MAX_BODY = 4096


class XrpcError(Exception):
    def __init__(self, status: int, name: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.name = name


Implementation = Callable[[str | None, dict], Any]


def xrpc_route(
    implementation: Implementation,
    verb: str,
    auth: ServiceAuth | None,
    *,
    require_lxm: bool = False,
    repeated: frozenset[str] = frozenset(),
    max_body: int = MAX_BODY,
):
    """A route for one XRPC method: parameters or body in, JSON (or an
    ``{"error", "message"}`` body) out.

    ``auth`` None: a public query, ``caller`` is None. Otherwise the token is
    checked before the method runs. Query parameters named in ``repeated``
    arrive as lists, the others as their first value. ``implementation``
    returns the output object, or None for an empty 200.
    """

    def route(handler: Handler, query: dict) -> None:
        nsid = handler.path.split("?", 1)[0].removeprefix("/xrpc/")
        try:
            # The body is read (size-limited) before anything else, so an
            # early refusal never leaves it on a kept-alive connection.
            if verb == "POST":
                params = handler.read_json(max_body)
                if params is None:
                    return  # read_json answered already
                if not isinstance(params, dict):
                    raise XrpcError(400, "InvalidRequest", "body must be a JSON object")
            else:
                params = {k: (v if k in repeated else v[0]) for k, v in query.items() if v}
            caller = None
            if auth is not None:
                caller = auth.caller(handler.headers.get("Authorization"), nsid, require_lxm)
            result = implementation(caller, params)
        except AuthError as exc:
            send_error(handler, XrpcError(401, "AuthenticationRequired", str(exc)))
            return
        except XrpcError as exc:
            log.info("xrpc refused", extra={"method": nsid, "error": exc.name, "reason": str(exc)})
            send_error(handler, exc)
            return
        if result is None:
            handler.send_body(HTTPStatus.OK, b"", "application/json")
        else:
            handler.send_json(HTTPStatus.OK, result)

    return route


class Xrpc:
    def __init__(
        self, auth: ServiceAuth, directory: Directory, secrets: SecretStore, scheduler: Scheduler
    ) -> None:
        self._auth = auth
        self._directory = directory
        self._secrets = secrets
        self._scheduler = scheduler

    def routes(self) -> tuple[dict, dict]:
        """(GET routes, POST routes) keyed by path."""
        get = {"/xrpc/sh.tangled.repo.listSecrets": self._method(self.list_secrets, "GET")}
        post = {
            "/xrpc/sh.tangled.repo.addSecret": self._method(self.add_secret, "POST"),
            "/xrpc/sh.tangled.repo.removeSecret": self._method(self.remove_secret, "POST"),
            "/xrpc/sh.tangled.pipeline.cancelPipeline": self._method(self.cancel, "POST"),
        }
        return get, post

    def _method(self, implementation, verb: str):
        return xrpc_route(implementation, verb, self._auth)

    # --- methods --------------------------------------------------------------------

    def add_secret(self, caller: str, params: dict) -> dict:
        repo = self._authorized_repo(caller, params)
        key = _key(params)
        value = params.get("value")
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_VALUE:
            raise XrpcError(400, "InvalidRequest", f"value must be 1 to {MAX_VALUE} characters")
        try:
            self._secrets.add(repo.at_uri, key, value, caller)
        except DuplicateSecret:
            raise XrpcError(400, "DuplicateSecret", f"secret {key} already exists") from None
        except TooManySecrets as exc:
            raise XrpcError(400, "TooManySecrets", f"a repo holds at most {exc} secrets") from None
        log.info("secret added", extra={"repo": repo.at_uri, "key": key, "did": caller})
        return {}

    def remove_secret(self, caller: str, params: dict) -> dict:
        repo = self._authorized_repo(caller, params)
        key = _key(params)
        if not self._secrets.remove(repo.at_uri, key):
            raise XrpcError(404, "SecretNotFound", f"no secret {key} for this repo")
        log.info("secret removed", extra={"repo": repo.at_uri, "key": key, "did": caller})
        return {}

    def list_secrets(self, caller: str, params: dict) -> dict:
        repo = self._authorized_repo(caller, params)
        return {"secrets": self._secrets.listing(repo.at_uri)}

    def cancel(self, caller: str, params: dict) -> dict:
        repo = self._authorized_repo(caller, params)
        uri, name = params.get("pipeline"), params.get("workflow")
        match = _PIPELINE_URI.match(uri) if isinstance(uri, str) else None
        if not match or not isinstance(name, str) or not 0 < len(name) <= 255:
            raise XrpcError(
                400,
                "InvalidRequest",
                "pipeline must be a pipeline at-uri, workflow a workflow name",
            )
        knot, rkey = match["knot"].lower(), match["rkey"]
        pipeline = Pipeline.get_or_none((Pipeline.knot == knot) & (Pipeline.rkey == rkey))
        if pipeline is None or (pipeline.repo_owner, pipeline.repo_name) != (repo.did, repo.name):
            raise XrpcError(404, "PipelineNotFound", "no such pipeline for this repo")
        workflow = Workflow.get_or_none(
            (Workflow.knot == knot) & (Workflow.rkey == rkey) & (Workflow.name == name)
        )
        if workflow is None:
            raise XrpcError(404, "WorkflowNotFound", f"no workflow {name} in this pipeline")
        outcome = self._scheduler.cancel(workflow.id)
        if outcome == "already final":
            status = Workflow.get_by_id(workflow.id).status
            raise XrpcError(
                409, "AlreadyFinished", f"workflow already ended: {status}; nothing changed"
            )
        log.info(
            "workflow cancelled",
            extra={"knot": knot, "rkey": rkey, "workflow": name, "did": caller},
        )
        return {}

    # --- who may ----------------------------------------------------------------------

    def _authorized_repo(self, caller: str, params: dict) -> Repo:
        uri = params.get("repo")
        match = _REPO_URI.match(uri) if isinstance(uri, str) else None
        if not match:
            raise XrpcError(
                400, "InvalidRequest", "repo must be an at-uri of a sh.tangled.repo record"
            )
        repo = Repo.get_or_none((Repo.did == match["did"]) & (Repo.rkey == match["rkey"]))
        # A repo record anyone can write is not enough: only repos this
        # spindle serves (their owner is the owner or a member) hold secrets.
        if repo is None or not self._directory.is_member(repo.did):
            raise XrpcError(404, "RepoNotFound", "this spindle serves no such repo")
        if caller != repo.did and not self._directory.is_collaborator(repo, caller):
            raise XrpcError(403, "Forbidden", "only the repo owner and its collaborators may")
        return repo


def _key(params: dict) -> str:
    key = params.get("key")
    if not isinstance(key, str) or len(key) > MAX_KEY or not KEY_RE.match(key):
        raise XrpcError(
            400,
            "InvalidRequest",
            f"key must match [A-Za-z_][A-Za-z0-9_]* and be at most {MAX_KEY} characters",
        )
    return key


def send_error(handler: Handler, error: XrpcError) -> None:
    handler.send_json(error.status, {"error": error.name, "message": str(error)})
