"""``github-actions``: run a workflow as a GitHub Actions workflow run.

GitHub REST API (https://docs.github.com/en/rest/actions/workflows,
/actions/workflow-runs and /actions/workflow-jobs): a ``workflow_dispatch``
of a workflow in the repository that mirrors the Tangled repo. The dispatch
carries two inputs: ``tangled_run`` (a unique marker) and ``tangled`` (the
``TANGLED_*`` values and ``github: {inputs: {…}}`` from the workflow file,
as JSON). The GitHub workflow must show the marker in its run name
(``run-name: tangled ${{ inputs.tangled_run }}``), which is how tack finds
the run the dispatch created. Jobs become log steps; GitHub serves a job's
log once the job has finished. A Tangled cancel cancels the run.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from ..workflow import WorkflowError
from . import Context, Job
from .options import Options
from .remote import (
    RemoteCI,
    RemoteError,
    Snapshot,
    Unit,
    credential,
    field_of,
    items_of,
    new_lines,
)

_CONCLUSION = {
    "success": "success",
    "neutral": "success",
    "skipped": "cancelled",
    "cancelled": "cancelled",
    "timed_out": "timeout",
    "failure": "failed",
    "action_required": "failed",
    "stale": "failed",
    "startup_failure": "failed",
}


class GitHubBackend(RemoteCI):
    type_name = "github-actions"

    def __init__(self, name: str, options: Options, context: Context) -> None:
        super().__init__(name, options, context)
        self.repository = options.text("repository", required=True)  # owner/name
        if self.repository.count("/") != 1:
            raise options.fail("repository", "must be owner/name")
        self.workflow = options.text("workflow", required=True)  # file name or id
        self.token_env = options.env_name("token_env", required=True)
        self.api_url = options.url("api_url", "https://api.github.com")
        self.ref = options.text("ref")  # default: the pushed branch

    def _api(self):
        return self.http(
            self.api_url,
            {
                "Authorization": f"Bearer {credential(self.token_env)}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
            },
        )

    def _repo(self) -> str:
        owner, name = self.repository.split("/")
        return f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}"

    def trigger(self, job: Job) -> dict[str, Any]:
        extra = job.spec.document.get("github") or {}
        inputs = extra.get("inputs", {}) if isinstance(extra, dict) else None
        if not isinstance(inputs, dict):
            raise WorkflowError("github.inputs must be a mapping")
        marker = secrets.token_hex(8)
        values = {**job.env, "TANGLED_WORKFLOW": job.name}
        ref = self.ref or values.get("TANGLED_REF_NAME") or values["TANGLED_REPO_DEFAULT_BRANCH"]
        body = {
            "ref": ref,
            "inputs": {
                **{k: str(v) for k, v in inputs.items()},
                "tangled_run": marker,
                "tangled": json.dumps(values),
            },
        }
        since = datetime.fromtimestamp(time.time() - 60, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        workflow = quote(self.workflow, safe="")
        self._api().json(
            "POST",
            f"{self._repo()}/actions/workflows/{workflow}/dispatches",
            body,
            cancel=job.cancel,
        )
        return {
            "marker": marker,
            "since": since,
            "ref": ref,
            "web_url": f"https://github.com/{self.repository}/actions",
        }

    def _find_run(self, job: Job, run: dict[str, Any]) -> bool:
        """Fill in the run id once GitHub lists the run the dispatch made."""
        answer = self._api().json(
            "GET",
            f"{self._repo()}/actions/workflows/{quote(self.workflow, safe='')}/runs",
            params={
                "event": "workflow_dispatch",
                "branch": run["ref"],
                "created": f">={run['since']}",
                "per_page": 50,
            },
            cancel=job.cancel,
        )
        for item in items_of(answer, "workflow_runs"):
            title = f"{item.get('display_title', '')} {item.get('name', '')}"
            if run["marker"] in title:
                run["run_id"] = field_of(item, "id", int)
                run["web_url"] = str(item.get("html_url", run["web_url"]))
                return True
        return False

    def snapshot(self, job: Job, run: dict[str, Any]) -> Snapshot:
        if "run_id" not in run and not self._find_run(job, run):
            return Snapshot("pending")
        api = self._api()
        item = api.json("GET", f"{self._repo()}/actions/runs/{run['run_id']}", cancel=job.cancel)
        status = field_of(item, "status", str)
        jobs = items_of(
            api.json("GET", f"{self._repo()}/actions/runs/{run['run_id']}/jobs", cancel=job.cancel),
            "jobs",
        )
        units = [
            Unit(field_of(j, "id", str), str(j.get("name", "job")), j.get("status") == "completed")
            for j in jobs
        ]
        if status != "completed":
            return Snapshot(
                "pending" if status in ("queued", "requested", "waiting", "pending") else "running",
                units,
            )
        conclusion = item.get("conclusion")
        result = _CONCLUSION.get(conclusion, "failed")
        error = None if result == "success" else f"GitHub Actions run concluded {conclusion}"
        return Snapshot(result, units, error)

    def log_lines(self, job: Job, run: dict[str, Any], unit: Unit, offset: int):
        if not unit.done:
            return [], offset  # GitHub serves a job's log when the job has finished
        text = self._api().text(
            "GET", f"{self._repo()}/actions/jobs/{quote(unit.id)}/logs", cancel=job.cancel
        )
        return new_lines(text, offset, True)

    def cancel_remote(self, job: Job, run: dict[str, Any]) -> None:
        if "run_id" not in run and not self._find_run(job, run):
            raise RemoteError("the dispatched run was not found, so it could not be cancelled")
        self._api().json("POST", f"{self._repo()}/actions/runs/{run['run_id']}/cancel")
