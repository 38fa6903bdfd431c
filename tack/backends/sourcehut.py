"""``sourcehut``: run a workflow as a builds.sr.ht job.

Through the builds GraphQL API at ``<instance>/query``
(https://man.sr.ht/builds.sr.ht/graphql.md; schema:
https://git.sr.ht/~sircmpwn/builds.sr.ht/tree/master/item/api/graph/schema.graphqls):

- ``submit`` the workflow's build manifest (``tack.sourcehut.manifest`` or
  ``sourcehut: {manifest: …}``) with its ``tags``, ``note`` and ``secrets``
  options, the ``TANGLED_*`` values and the original tack's ``TACK_*`` ones
  merged into the manifest's ``environment`` (the manifest's own win);
- watch ``job(id)``: its status, and its tasks, which become log steps whose
  lines come from each task's ``log.fullURL``;
- ``cancel(jobId)`` on a Tangled cancel; resume by the saved job id.

The token is sent to the instance's host, and to a log URL only on that
host or one the operator lists in ``log_hosts`` (logs.sr.ht for
builds.sr.ht): a log URL is data from the API, not a place to hand
credentials.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import yaml

from ..workflow import WorkflowError, load_document
from . import Context, Job, provider_options
from .options import Options
from .remote import RemoteCI, RemoteError, Snapshot, Unit, credential, field_of, new_lines

_SUBMIT = """mutation Submit($manifest: String!, $tags: [String!], $note: String,
  $secrets: Boolean) {
  submit(manifest: $manifest, tags: $tags, note: $note, secrets: $secrets) { id }
}"""
_JOB = """query Job($id: Int!) {
  job(id: $id) { id status tasks { name status log { fullURL } } }
}"""
_CANCEL = """mutation Cancel($id: Int!) { cancel(jobId: $id) { id } }"""

_STATUS = {
    "PENDING": "pending",
    "QUEUED": "pending",
    "RUNNING": "running",
    "SUCCESS": "success",
    "FAILED": "failed",
    "TIMEOUT": "timeout",
    "CANCELLED": "cancelled",
}
_TASK_DONE = {"SUCCESS", "FAILED"}
MAX_TAGS = 10
MAX_NOTE = 4096
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class SourcehutBackend(RemoteCI):
    type_name = "sourcehut"

    def __init__(self, name: str, options: Options, context: Context) -> None:
        super().__init__(name, options, context)
        self.token_env = options.env_name("token_env", required=True)
        self.instance = options.url("instance", "https://builds.sr.ht")
        own_host = urlsplit(self.instance).hostname or ""
        default_log_hosts = ["logs.sr.ht"] if own_host == "builds.sr.ht" else []
        log_hosts = options.strings("log_hosts") or default_log_hosts
        self.token_hosts = frozenset([own_host, *(host.lower() for host in log_hosts)])

    def _query(self, job: Job, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        """A GraphQL call; its ``data``, or RemoteError with the API's words."""
        api = self.http(self.instance, {"Authorization": f"Bearer {credential(self.token_env)}"})
        answer = api.json(
            "POST", "/query", {"query": query, "variables": variables}, cancel=job.cancel
        )
        if not isinstance(answer, dict):
            raise RemoteError("malformed answer: not a GraphQL response")
        errors = answer.get("errors")
        if errors:
            first = errors[0] if isinstance(errors, list) and errors else {}
            message = first.get("message") if isinstance(first, dict) else None
            raise RemoteError(f"sourcehut: {str(message or errors)[:500]}")
        return field_of(answer, "data", dict)

    def trigger(self, job: Job) -> dict[str, Any]:
        block = provider_options(job, "sourcehut")
        self._check_instance(block.get("instance"))
        variables = {
            "manifest": _manifest(job, block.get("manifest")),
            "tags": _tags(block.get("tags", ["tack"])),
            "note": _note(job, block.get("note")),
            "secrets": _flag(block.get("secrets", False)),
        }
        submitted = field_of(self._query(job, _SUBMIT, variables), "submit", dict)
        job_id = field_of(submitted, "id", int)
        return {"job": job_id, "web_url": f"{self.instance} job #{job_id}"}

    def _check_instance(self, instance: Any) -> None:
        """The original tack let a workflow name its instance; here that
        only may repeat the configured one, since the operator's token goes
        wherever the job is submitted."""
        if instance is not None and str(instance).rstrip("/") != self.instance:
            raise WorkflowError(
                f"sourcehut instance: this spindle submits jobs to {self.instance} only"
            )

    def snapshot(self, job: Job, run: dict[str, Any]) -> Snapshot:
        found = self._query(job, _JOB, {"id": run["job"]}).get("job")
        if not isinstance(found, dict):
            raise RemoteError(f"sourcehut job {run['job']} is gone")
        status = _STATUS.get(field_of(found, "status", str))
        if status is None:
            raise RemoteError(f"malformed answer: unknown job status {found['status'][:50]!r}")
        tasks = found.get("tasks")
        if not isinstance(tasks, list):
            raise RemoteError("malformed answer: tasks is not a list")
        units, failed = [], None
        for index, task in enumerate(tasks):
            unit = _unit(index, task)
            if unit is not None:
                units.append(unit)
            if isinstance(task, dict) and task.get("status") == "FAILED" and failed is None:
                failed = task.get("name")
        if status == "failed":
            return Snapshot(status, units, f"sourcehut job failed in task {failed or '?'}")
        if status in ("timeout", "cancelled"):
            return Snapshot(status, units, f"sourcehut job ended: {status}")
        return Snapshot(status, units)

    def log_lines(self, job: Job, run: dict[str, Any], unit: Unit, offset: int):
        url = unit.log_url
        if not url:
            return [], offset
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError("malformed answer: a task's log URL is not an http(s) URL")
        headers = {}
        if parts.hostname in self.token_hosts:
            headers["Authorization"] = f"Bearer {credential(self.token_env)}"
        origin = f"{parts.scheme}://{parts.netloc}"
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        text = self.http(origin, headers).text("GET", path or "/", cancel=job.cancel)
        return new_lines(text, offset, unit.done)

    def cancel_remote(self, job: Job, run: dict[str, Any]) -> None:
        self._query(job, _CANCEL, {"id": run["job"]})


def _unit(index: int, task: Any) -> Unit | None:
    """A task as a log step once it started (pending and skipped ones never ran)."""
    if not isinstance(task, dict) or task.get("status") in (None, "PENDING", "SKIPPED"):
        return None
    name = str(task.get("name") or f"task {index}")[:200]
    log = task.get("log")
    url = log.get("fullURL") if isinstance(log, dict) else None
    done = task["status"] in _TASK_DONE
    return Unit(str(index), name, done, url if isinstance(url, str) else None)


def _manifest(job: Job, manifest: Any) -> str:
    """The build manifest with the Tangled and original-tack values in its environment."""
    if not isinstance(manifest, str) or not manifest.strip():
        raise WorkflowError("sourcehut needs a build manifest: tack.sourcehut.manifest")
    try:
        # The workflow file's own guards: size, no aliases (a few hundred
        # bytes of nested ones expand to gigabytes), the safe loader.
        document = load_document(manifest)[0]
    except WorkflowError as exc:
        raise WorkflowError(f"tack.sourcehut.manifest: {exc}") from None
    if not document:
        raise WorkflowError("tack.sourcehut.manifest must be a mapping (image, tasks, …)")
    own = document.get("environment") or {}
    if not isinstance(own, dict):
        raise WorkflowError("tack.sourcehut.manifest: environment must be a mapping")
    document["environment"] = {**_job_values(job), **own}
    return yaml.dump(document, Dumper=_DUMPER, sort_keys=False)


def _job_values(job: Job) -> dict[str, str]:
    """TANGLED_* as the official spindle names them, and the original tack's TACK_*."""
    env = job.env
    return {
        **env,
        "TANGLED_WORKFLOW": job.name,
        "TACK_KNOT": job.knot,
        "TACK_PIPELINE_RKEY": job.rkey,
        "TACK_WORKFLOW": job.name,
        "TACK_WORKFLOW_RAW": str(job.workflow.get("raw", "")),
        "TACK_ACTOR": env.get("TANGLED_REPO_DID", ""),
        "TACK_COMMIT": env.get("TANGLED_SHA", ""),
        "TACK_BRANCH": env.get("TANGLED_REF", ""),
    }


def _tags(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_TAGS:
        raise WorkflowError(f"tack.sourcehut.tags must be a list of at most {MAX_TAGS} tags")
    return [str(tag)[:128] for tag in value]


def _note(job: Job, value: Any) -> str:
    if value is None:
        return f"tangled: {job.name} @ {job.env.get('TANGLED_SHA', '')[:8]}"
    return str(value)[:MAX_NOTE]


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise WorkflowError("tack.sourcehut.secrets must be true or false")
    return value
