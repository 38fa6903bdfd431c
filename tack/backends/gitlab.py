"""``gitlab-ci``: run a workflow as a GitLab CI pipeline.

GitLab REST API v4 (https://docs.gitlab.com/ee/api/pipelines.html and
https://docs.gitlab.com/ee/api/jobs.html): create a pipeline on a ref of the
project that mirrors the Tangled repo, with the ``TANGLED_*`` values (and
``gitlab: {variables: {…}}`` from the workflow file) as variables; follow its
jobs, one log step each, reading their traces; cancel the pipeline on a
Tangled cancel. GitLab runs the ref's head, so a job that must build the exact
commit checks out ``$TANGLED_SHA``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from . import Context, Job
from .options import Options
from .remote import (
    RemoteCI,
    Snapshot,
    Unit,
    credential,
    extra_properties,
    field_of,
    items_of,
    new_lines,
)

_FINAL = {"success": "success", "failed": "failed", "canceled": "cancelled", "skipped": "cancelled"}
_WAITING = {"created", "waiting_for_resource", "preparing", "pending", "scheduled"}
_DONE_JOB = {"success", "failed", "canceled", "skipped", "manual"}


class GitLabBackend(RemoteCI):
    type_name = "gitlab-ci"

    def __init__(self, name: str, options: Options, context: Context) -> None:
        super().__init__(name, options, context)
        self.project = options.text("project", required=True)  # numeric id or group/name
        self.token_env = options.env_name("token_env", required=True)
        self.api_url = options.url("api_url", "https://gitlab.com")
        self.ref = options.text("ref")  # default: the pushed branch

    def _api(self):
        return self.http(f"{self.api_url}/api/v4", {"PRIVATE-TOKEN": credential(self.token_env)})

    def _project(self) -> str:
        return f"/projects/{quote(self.project, safe='')}"

    def trigger(self, job: Job) -> dict[str, Any]:
        env = {**job.env, "TANGLED_WORKFLOW": job.name, **extra_properties(job, "gitlab")}
        ref = self.ref or env.get("TANGLED_REF_NAME") or env["TANGLED_REPO_DEFAULT_BRANCH"]
        body = {"ref": ref, "variables": [{"key": k, "value": v} for k, v in env.items()]}
        pipeline = self._api().json("POST", f"{self._project()}/pipeline", body, cancel=job.cancel)
        return {"id": field_of(pipeline, "id", int), "web_url": str(pipeline.get("web_url", ""))}

    def snapshot(self, job: Job, run: dict[str, Any]) -> Snapshot:
        api = self._api()
        pipeline = api.json("GET", f"{self._project()}/pipelines/{run['id']}", cancel=job.cancel)
        status = field_of(pipeline, "status", str)
        jobs = items_of(
            api.json(
                "GET",
                f"{self._project()}/pipelines/{run['id']}/jobs",
                params={"per_page": 100},
                cancel=job.cancel,
            ),
            "",
        )
        jobs.sort(key=lambda j: j.get("id", 0))
        units = [
            Unit(field_of(j, "id", str), str(j.get("name", "job")), j.get("status") in _DONE_JOB)
            for j in jobs
        ]
        if status in _FINAL:
            failed = [str(j.get("name")) for j in jobs if j.get("status") == "failed"]
            error = (
                f"GitLab pipeline failed: {', '.join(failed) or status}"
                if status == "failed"
                else None
            )
            return Snapshot(_FINAL[status], units, error)
        return Snapshot("pending" if status in _WAITING else "running", units)

    def log_lines(self, job: Job, run: dict[str, Any], unit: Unit, offset: int):
        trace = self._api().text(
            "GET", f"{self._project()}/jobs/{quote(unit.id)}/trace", cancel=job.cancel
        )
        return new_lines(trace, offset, unit.done)

    def cancel_remote(self, job: Job, run: dict[str, Any]) -> None:
        self._api().json("POST", f"{self._project()}/pipelines/{run['id']}/cancel")
