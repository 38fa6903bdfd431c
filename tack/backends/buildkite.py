"""``buildkite``: run a workflow as a build of a Buildkite pipeline.

Buildkite REST API v2 (https://buildkite.com/docs/apis/rest-api/builds and
/jobs): create a build for the commit with the ``TANGLED_*`` values (and
``env`` from the workflow's ``buildkite:`` or ``tack.buildkite`` block) as
build env, on the pipeline the workflow names or else the configured one;
follow the build's script jobs, one log step each; cancel the build on a
Tangled cancel. Buildkite's notification webhooks (api/webhooks.py) make
tack look at a build at once; polling stays, as the fallback and for resume.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from ..workflow import WorkflowError
from . import Context, Job, provider_options
from .options import Options
from .remote import (
    RemoteCI,
    RemoteError,
    Snapshot,
    Unit,
    credential,
    extra_properties,
    field_of,
    items_of,
    new_lines,
)

PIPELINE_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

_FINAL_BUILD = {
    "passed": "success",
    "failed": "failed",
    "canceled": "cancelled",
    "skipped": "cancelled",
    "not_run": "failed",
    "finished": "failed",
}
_DONE_JOB = {
    "passed",
    "failed",
    "canceled",
    "timed_out",
    "skipped",
    "broken",
    "expired",
    "finished",
    "not_run",
}


class BuildkiteBackend(RemoteCI):
    type_name = "buildkite"

    def __init__(self, name: str, options: Options, context: Context) -> None:
        super().__init__(name, options, context)
        self.organization = options.text("organization", required=True)
        self.pipeline = options.text("pipeline")  # else each workflow names its own
        self.token_env = options.env_name("token_env", required=True)
        self.api_url = options.url("api_url", "https://api.buildkite.com")
        # Notification webhooks (https://buildkite.com/docs/apis/webhooks/pipelines):
        # the plain token, the HMAC signing secret, or both.
        self.webhook_token_env = options.env_name("webhook_token_env")
        self.webhook_secret_env = options.env_name("webhook_secret_env")
        self.webhook_max_age = options.number("webhook_max_age", 300, 10, 3600)

    @property
    def takes_webhooks(self) -> bool:
        return bool(self.webhook_token_env or self.webhook_secret_env)

    def _api(self):
        return self.http(self.api_url, {"Authorization": f"Bearer {credential(self.token_env)}"})

    def _pipeline_in(self, run: dict[str, Any]) -> str:
        """The run's pipeline (runs saved before pipelines could be named per
        workflow are on the configured one)."""
        return run.get("pipeline") or self.pipeline or ""

    def _builds(self, run: dict[str, Any]) -> str:
        org = quote(self.organization, safe="")
        pipeline = quote(self._pipeline_in(run), safe="")
        return f"/v2/organizations/{org}/pipelines/{pipeline}/builds"

    def _pipeline_of(self, job: Job) -> str:
        named = provider_options(job, "buildkite").get("pipeline")
        if named is not None and not (isinstance(named, str) and PIPELINE_SLUG.match(named)):
            raise WorkflowError("buildkite pipeline must be a pipeline slug such as my-app-ci")
        pipeline = named or self.pipeline
        if not pipeline:
            raise WorkflowError(
                f"no Buildkite pipeline: name one in the workflow (tack.buildkite.pipeline) "
                f"or set backends.{self.name}.pipeline"
            )
        return pipeline

    def watch_key(self, run: dict[str, Any]) -> tuple[str, int]:
        return (self._pipeline_in(run), run["number"])

    def trigger(self, job: Job) -> dict[str, Any]:
        env = job.env
        pipeline = self._pipeline_of(job)
        body = {
            "commit": env.get("TANGLED_SHA", "HEAD"),
            "branch": env.get("TANGLED_REF_NAME", env["TANGLED_REPO_DEFAULT_BRANCH"]),
            "message": f"Tangled {job.name} ({job.pipeline_uri})",
            "env": {**env, "TANGLED_WORKFLOW": job.name, **extra_properties(job, "buildkite")},
        }
        run = {"pipeline": pipeline}
        build = self._api().json("POST", self._builds(run), body, cancel=job.cancel)
        number = field_of(build, "number", int)
        return run | {"number": number, "web_url": str(build.get("web_url", ""))}

    def snapshot(self, job: Job, run: dict[str, Any]) -> Snapshot:
        build = self._api().json("GET", f"{self._builds(run)}/{run['number']}", cancel=job.cancel)
        state = field_of(build, "state", str)
        jobs = [j for j in items_of(build, "jobs") if j.get("type", "script") == "script"]
        units = [
            Unit(
                field_of(j, "id", str),
                str(j.get("name") or j.get("command") or "job"),
                j.get("state") in _DONE_JOB,
            )
            for j in jobs
        ]
        status = _FINAL_BUILD.get(state)
        if status is None:
            return Snapshot("pending" if state in ("scheduled", "creating") else "running", units)
        failed = next(
            (j for j in jobs if j.get("state") in ("failed", "timed_out", "broken")), None
        )
        exit_code = failed.get("exit_status") if failed else None
        error = None
        if status == "failed":
            error = f"Buildkite build {state}" + (
                f": job {failed.get('name')!r} failed" if failed else ""
            )
        return Snapshot(status, units, error, exit_code if isinstance(exit_code, int) else None)

    def log_lines(self, job: Job, run: dict[str, Any], unit: Unit, offset: int):
        answer = self._api().json(
            "GET",
            f"{self._builds(run)}/{run['number']}/jobs/{quote(unit.id, safe='')}/log",
            cancel=job.cancel,
        )
        content = answer.get("content") if isinstance(answer, dict) else None
        if content is None:
            return [], offset
        if not isinstance(content, str):
            raise RemoteError("malformed Buildkite answer: log content is not text")
        return new_lines(content, offset, unit.done)

    def cancel_remote(self, job: Job, run: dict[str, Any]) -> None:
        self._api().json("PUT", f"{self._builds(run)}/{run['number']}/cancel")
