"""``buildbot``: run a workflow as a build of a Buildbot 4 builder.

Uses Buildbot's REST API (``/api/v2``): the force scheduler starts a build
with the ``TANGLED_*`` values (and ``buildbot: {properties: {…}}`` from the
workflow file) as properties; build requests, builds, steps and logs are
watched; a cancel stops the build (or cancels the request still queued).
The scheduler must declare every property it should accept: Buildbot
ignores the rest.

Results map as Buildbot defines them: SUCCESS, WARNINGS and SKIPPED are
``success``; FAILURE and EXCEPTION ``failed``; CANCELLED ``cancelled``; RETRY
means Buildbot starts another build, which is watched instead.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from . import Context, Job
from .options import Options
from .remote import RemoteCI, RemoteError, Snapshot, Unit, credential, extra_properties

_RESULTS = {0: "success", 1: "success", 2: "failed", 3: "success", 4: "failed", 6: "cancelled"}
RETRY = 5
LINES_PER_FETCH = 1000


class BuildbotBackend(RemoteCI):
    type_name = "buildbot"

    def __init__(self, name: str, options: Options, context: Context) -> None:
        super().__init__(name, options, context)
        self.url = options.url("url", required=True)
        self.builder = options.text("builder", required=True)
        self.scheduler = options.text("scheduler", required=True)
        self.auth_env = options.env_name("auth_header_env")
        self._builderid: int | None = None

    def _api(self):
        headers = {"Accept": "application/json"}
        auth = credential(self.auth_env)
        if auth:
            headers["Authorization"] = auth
        return self.http(f"{self.url}/api/v2", headers)

    # --- trigger ----------------------------------------------------------------------

    def trigger(self, job: Job) -> dict[str, Any]:
        api = self._api()
        builderid = self._builder_id(api, job)
        params = {
            "builderid": str(builderid),
            "reason": f"Tangled {job.pipeline_uri} {job.name}",
            **job.env,
            "TANGLED_WORKFLOW": job.name,
            **extra_properties(job, "buildbot"),
        }
        answer = api.json(
            "POST",
            f"/forceschedulers/{quote(self.scheduler, safe='')}",
            {"jsonrpc": "2.0", "method": "force", "id": 1, "params": params},
            cancel=job.cancel,
        )
        if not isinstance(answer, dict) or "error" in answer:
            message = answer.get("error", {}).get("message") if isinstance(answer, dict) else None
            raise RemoteError(
                f"force scheduler {self.scheduler} refused: {message or answer!r}"[:500]
            )
        try:
            brid = int(next(iter(answer["result"][1].values())))
        except (KeyError, IndexError, TypeError, ValueError, StopIteration, AttributeError):
            raise RemoteError("malformed answer from the force scheduler") from None
        return {"brid": brid, "web_url": f"{self.url}/#/buildrequests/{brid}"}

    def _builder_id(self, api, job: Job) -> int:
        if self._builderid is None:
            answer = api.json("GET", "/builders", params={"name": self.builder}, cancel=job.cancel)
            builders = _list(answer, "builders")
            if not builders:
                raise RemoteError(f"Buildbot has no builder named {self.builder!r}")
            self._builderid = _int(builders[0], "builderid")
        return self._builderid

    # --- watch --------------------------------------------------------------------------

    def snapshot(self, job: Job, run: dict[str, Any]) -> Snapshot:
        api = self._api()
        builds = _list(
            api.json("GET", f"/buildrequests/{run['brid']}/builds", cancel=job.cancel), "builds"
        )
        if not builds:
            request = _list(
                api.json("GET", f"/buildrequests/{run['brid']}", cancel=job.cancel), "buildrequests"
            )
            if request and request[0].get("complete") and request[0].get("results") == 6:
                return Snapshot("cancelled")
            return Snapshot("pending")
        build = max(builds, key=lambda b: _int(b, "number"))
        run["buildid"] = _int(build, "buildid")
        steps = _list(
            api.json("GET", f"/builds/{run['buildid']}/steps", cancel=job.cancel), "steps"
        )
        units = [
            Unit(
                str(_int(step, "stepid")), str(step.get("name", "step")), bool(step.get("complete"))
            )
            for step in steps
        ]
        if not build.get("complete") or build.get("results") == RETRY:
            return Snapshot("running", units)
        status = _RESULTS.get(build.get("results"), "failed")
        error = None if status == "success" else str(build.get("state_string") or "build failed")
        return Snapshot(status, units, error)

    def log_lines(self, job: Job, run: dict[str, Any], unit: Unit, offset: int):
        api = self._api()
        logs = _list(api.json("GET", f"/steps/{unit.id}/logs", cancel=job.cancel), "logs")
        stdio = next(
            (entry for entry in logs if entry.get("name") == "stdio"), logs[0] if logs else None
        )
        if stdio is None:
            return [], offset
        answer = api.json(
            "GET",
            f"/logs/{_int(stdio, 'logid')}/contents",
            params={"offset": offset, "limit": LINES_PER_FETCH},
            cancel=job.cancel,
        )
        lines: list[tuple[str, str]] = []
        consumed = 0
        for chunk in _list(answer, "logchunks"):
            for raw in str(chunk.get("content", "")).splitlines():
                consumed += 1
                if stdio.get("type") != "s":
                    lines.append(("stdout", raw))
                elif raw[:1] in ("o", "e"):  # "h" lines are Buildbot's own header (argv, env)
                    lines.append(("stderr" if raw[0] == "e" else "stdout", raw[1:]))
        return lines, offset + consumed

    def cancel_remote(self, job: Job, run: dict[str, Any]) -> None:
        api = self._api()
        body = {"jsonrpc": "2.0", "id": 1, "params": {"reason": "cancelled from Tangled"}}
        if "buildid" in run:
            api.json("POST", f"/builds/{run['buildid']}", {**body, "method": "stop"})
        else:
            api.json("POST", f"/buildrequests/{run['brid']}", {**body, "method": "cancel"})


def _list(answer: Any, key: str) -> list[dict]:
    value = answer.get(key) if isinstance(answer, dict) else None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise RemoteError(f"malformed Buildbot answer: no {key} list")
    return value


def _int(item: dict, key: str) -> int:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RemoteError(f"malformed Buildbot answer: {key} is not a number")
    return value
