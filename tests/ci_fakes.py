"""Local servers shaped like the hosted CIs' REST APIs, for the adapters' tests.

The hosted CIs cannot be reached from the test machines, so each of these
implements the endpoints the adapter uses, with request and response shapes
taken from the vendor's published API reference:

- Buildkite REST API v2, builds and jobs:
  https://buildkite.com/docs/apis/rest-api/builds
  https://buildkite.com/docs/apis/rest-api/jobs#get-a-jobs-log-output
- GitLab REST API v4, pipelines and jobs:
  https://docs.gitlab.com/ee/api/pipelines.html#create-a-new-pipeline
  https://docs.gitlab.com/ee/api/jobs.html#list-pipeline-jobs
  https://docs.gitlab.com/ee/api/jobs.html#get-a-log-file
- GitHub REST API, Actions:
  https://docs.github.com/en/rest/actions/workflows#create-a-workflow-dispatch-event
  https://docs.github.com/en/rest/actions/workflow-runs#list-workflow-runs-for-a-workflow
  https://docs.github.com/en/rest/actions/workflow-jobs#list-jobs-for-a-workflow-run
  https://docs.github.com/en/rest/actions/workflow-jobs#download-job-logs-for-a-workflow-run
- Tekton on Kubernetes: the PipelineRun and TaskRun resources of tekton.dev/v1
  https://tekton.dev/docs/pipelines/pipelineruns/ (spec, status.conditions
  Succeeded with its reasons, status.childReferences, cancelling by
  spec.status: Cancelled), https://tekton.dev/docs/pipelines/taskruns/
  (status.podName, status.steps with running/terminated), served as
  Kubernetes serves custom resources:
  https://kubernetes.io/docs/reference/using-api/api-concepts/ (create,
  get, merge-patch with application/merge-patch+json) and the pod log:
  https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#read-log-of-the-specified-pod
- builds.sr.ht GraphQL, POST /query with a bearer token:
  https://man.sr.ht/builds.sr.ht/graphql.md and the schema
  https://git.sr.ht/~sircmpwn/builds.sr.ht/tree/master/item/api/graph/schema.graphqls
  (submit, job(id) with status and tasks { name status log { fullURL } },
  cancel(jobId), JobStatus and TaskStatus values)

One run model serves them all: a run advances one phase per status poll
(queued, then each job in turn, then finished) unless it is held; the test
can inject HTTP failures (429 with Retry-After, 5xx) and malformed bodies.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

from .spindle_clients import EventsClient
from .standins import OWNER, push_pipeline

TOKEN = "ci-api-token-123"
SHA = "c0ffee" + "0" * 34  # the commit the tests push


def push_workflow(spindle, knot, raw: str, engine: str = "ci") -> tuple[EventsClient, str]:
    """Push one workflow ``ci.yml`` to ``spindle`` through ``knot``: an /events
    client that saw it from the start, and the pipeline's rkey."""
    client = EventsClient(spindle.server.port).start()
    record = push_pipeline(knot.name, OWNER, "hello", [("ci.yml", engine, raw)], sha=SHA)
    return client, knot.send_pipeline(record)


@dataclass
class FakeJob:
    name: str
    lines: list[str]
    exit_code: int = 0


@dataclass
class FakeRun:
    number: int
    jobs: list[FakeJob]
    params: dict
    phase: int = 0  # 0 queued; i in 1..len(jobs): job i-1 runs; len(jobs)+1: finished
    held: bool = False  # keep running (in the first job) until released
    cancelled: bool = False

    def tick(self) -> None:
        """One status poll: the next phase; a held run starts its first job and stays there."""
        if self.cancelled or self.phase > len(self.jobs):
            return
        if not self.held or self.phase == 0:
            self.phase += 1

    @property
    def finished(self) -> bool:
        return self.cancelled or self.phase > len(self.jobs)

    @property
    def outcome(self) -> str:
        """running | success | failed | cancelled"""
        if self.cancelled:
            return "cancelled"
        if not self.finished:
            return "running" if self.phase else "queued"
        return "failed" if any(job.exit_code for job in self.jobs) else "success"

    def job_state(self, index: int) -> str:
        """pending | running | success | failed | cancelled"""
        if index < self.phase - 1:
            return "failed" if self.jobs[index].exit_code else "success"
        if self.cancelled:
            return "cancelled"
        return "running" if index == self.phase - 1 else "pending"

    def job_log(self, index: int) -> str:
        lines = self.jobs[index].lines
        state = self.job_state(index)
        shown = lines if state in ("success", "failed", "cancelled") else lines[: len(lines) // 2]
        if state == "pending":
            shown = []
        return "".join(line + "\n" for line in shown)


@dataclass
class Fault:
    status: int
    retry_after: str | None = None
    body: bytes = b'{"message": "try again"}'


class FakeCI:
    """Base of the three vendor servers: routing, auth, faults, the run model."""

    name = ""
    routes: list[tuple[str, str, str]] = []  # (method, path regex, handler name)
    malformed_methods = ("GET",)  # the requests that read a run's state
    # The workflow file the shared scenarios push, and one in the original
    # tack's dialect (engine: tack, tack: {<provider>: …}).
    workflow_raw = "steps: []\n"
    dialect_raw = ""
    ends_in_timeout = False  # the CI itself stops the run at its end, as out of time

    def __init__(
        self, jobs: list[FakeJob] | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.job_template = jobs or [
            FakeJob("build", ["compiling", "linking", "done"]),
            FakeJob("test", ["1 passed", "2 passed"]),
        ]
        self.runs: dict[int, FakeRun] = {}
        self.hold_runs = False
        self.faults: list[Fault] = []
        self.malformed = 0
        self.requests: list[tuple[float, str, str]] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake._dispatch(self, "GET")

            def do_POST(self) -> None:
                fake._dispatch(self, "POST")

            def do_PUT(self) -> None:
                fake._dispatch(self, "PUT")

            def do_PATCH(self) -> None:
                fake._dispatch(self, "PATCH")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()

    def only_run(self) -> FakeRun:
        assert len(self.runs) == 1, f"expected one run, found {len(self.runs)}"
        return next(iter(self.runs.values()))

    def new_run(self, params: dict, jobs: list[FakeJob] | None = None) -> FakeRun:
        number = len(self.runs) + 1
        run = FakeRun(
            number,
            [FakeJob(j.name, list(j.lines), j.exit_code) for j in (jobs or self.job_template)],
            params,
            held=self.hold_runs,
        )
        self.runs[number] = run
        return run

    # --- the routes most vendors share: create a run, look at it --------------------

    def render(self, run: FakeRun) -> dict:
        """The run as the vendor's API shows it."""
        raise NotImplementedError

    def create(self, body, query):
        return 201, self.render(self.new_run(body)), {}

    def get(self, body, query, number):
        run = self.runs[int(number)]
        run.tick()
        return 200, self.render(run), {}

    # --- plumbing ---------------------------------------------------------------

    def authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        raise NotImplementedError

    def _dispatch(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length) or b"null") if length else None
        with self.lock:
            self.requests.append((time.monotonic(), method, parts.path))
            self.headers.append(dict(handler.headers))
            fault = self.faults.pop(0) if self.faults else None
            malformed = self.malformed > 0 and method in self.malformed_methods
            if malformed:
                self.malformed -= 1
        if fault:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return _send(handler, fault.status, fault.body, headers)
        if not self.authorized(handler):
            return _send(handler, 401, b'{"message": "Bad credentials"}')
        if malformed:
            return _send(handler, 200, b"<html>this is not JSON</html>")
        for verb, pattern, name in self.routes:
            match = re.fullmatch(pattern, parts.path)
            if verb == method and match:
                with self.lock:
                    status, payload, headers = getattr(self, name)(
                        body, parse_qs(parts.query), **match.groupdict()
                    )
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                return _send(handler, status, data, headers)
        return _send(handler, 404, b'{"message": "Not Found"}')


def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict | None = None):
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


# --- Buildkite -------------------------------------------------------------------------

_BK = r"/v2/organizations/acme/pipelines/tangled/builds"
_BK_JOB_STATE = {
    "pending": "scheduled",
    "running": "running",
    "success": "passed",
    "failed": "failed",
    "cancelled": "canceled",
}
_BK_BUILD_STATE = {
    "queued": "scheduled",
    "running": "running",
    "success": "passed",
    "failed": "failed",
    "cancelled": "canceled",
}


class BuildkiteFake(FakeCI):
    name = "buildkite"
    dialect_raw = (
        'when:\n  - event: ["push", "pull_request"]\n    branch: ["main"]\n'
        "engine: tack\ntack:\n  buildkite:\n    pipeline: tangled\n"
    )
    routes = [
        ("POST", _BK, "create"),
        ("GET", _BK + r"/(?P<number>\d+)", "get"),
        ("GET", _BK + r"/(?P<number>\d+)/jobs/(?P<job>[\w-]+)/log", "log"),
        ("PUT", _BK + r"/(?P<number>\d+)/cancel", "cancel"),
    ]

    def authorized(self, handler) -> bool:
        return handler.headers.get("Authorization") == f"Bearer {TOKEN}"

    def render(self, run: FakeRun) -> dict:
        return {
            "id": f"build-{run.number}",
            "number": run.number,
            "web_url": f"https://buildkite.com/acme/tangled/builds/{run.number}",
            "state": _BK_BUILD_STATE[run.outcome],
            "commit": run.params.get("commit"),
            "jobs": [
                {
                    "id": f"job-{run.number}-{i}",
                    "type": "script",
                    "name": job.name,
                    "state": _BK_JOB_STATE[run.job_state(i)],
                    "exit_status": job.exit_code
                    if run.job_state(i) in ("success", "failed")
                    else None,
                }
                for i, job in enumerate(run.jobs)
            ],
        }

    def log(self, body, query, number, job):
        run = self.runs[int(number)]
        index = int(job.rsplit("-", 1)[1])
        return 200, {"url": "…", "content": run.job_log(index), "size": 0}, {}

    def cancel(self, body, query, number):
        self.runs[int(number)].cancelled = True
        return 200, self.render(self.runs[int(number)]), {}


# --- GitLab -------------------------------------------------------------------------------

_GL = r"/api/v4/projects/acme%2Ftangled"
_GL_JOB = {
    "pending": "pending",
    "running": "running",
    "success": "success",
    "failed": "failed",
    "cancelled": "canceled",
}
_GL_PIPELINE = {
    "queued": "pending",
    "running": "running",
    "success": "success",
    "failed": "failed",
    "cancelled": "canceled",
}


class GitLabFake(FakeCI):
    name = "gitlab-ci"
    routes = [
        ("POST", _GL + r"/pipeline", "create"),
        ("GET", _GL + r"/pipelines/(?P<number>\d+)", "get"),
        ("GET", _GL + r"/pipelines/(?P<number>\d+)/jobs", "jobs"),
        ("GET", _GL + r"/jobs/(?P<job>\d+)/trace", "trace"),
        ("POST", _GL + r"/pipelines/(?P<number>\d+)/cancel", "cancel"),
    ]

    def authorized(self, handler) -> bool:
        return handler.headers.get("PRIVATE-TOKEN") == TOKEN

    def render(self, run: FakeRun) -> dict:
        return {
            "id": run.number,
            "status": _GL_PIPELINE[run.outcome],
            "ref": run.params.get("ref"),
            "web_url": f"https://gitlab.com/acme/tangled/-/pipelines/{run.number}",
        }

    def jobs(self, body, query, number):
        run = self.runs[int(number)]
        return (
            200,
            [
                {
                    "id": run.number * 100 + i,
                    "name": job.name,
                    "stage": "test",
                    "status": _GL_JOB[run.job_state(i)],
                }
                for i, job in enumerate(run.jobs)
            ],
            {},
        )

    def trace(self, body, query, job):
        run = self.runs[int(job) // 100]
        return 200, run.job_log(int(job) % 100).encode(), {"Content-Type": "text/plain"}

    def cancel(self, body, query, number):
        self.runs[int(number)].cancelled = True
        return 200, self.render(self.runs[int(number)]), {}


# --- GitHub Actions ---------------------------------------------------------------------------

_GH = r"/repos/acme/tangled/actions"
_GH_CONCLUSION = {"success": "success", "failed": "failure", "cancelled": "cancelled"}


class GitHubFake(FakeCI):
    name = "github-actions"
    routes = [
        ("POST", _GH + r"/workflows/ci\.yml/dispatches", "dispatch"),
        ("GET", _GH + r"/workflows/ci\.yml/runs", "list_runs"),
        ("GET", _GH + r"/runs/(?P<number>\d+)", "get"),
        ("GET", _GH + r"/runs/(?P<number>\d+)/jobs", "jobs"),
        ("GET", _GH + r"/jobs/(?P<job>\d+)/logs", "logs_redirect"),
        ("GET", r"/blob/(?P<job>\d+)", "blob"),
        ("POST", _GH + r"/runs/(?P<number>\d+)/cancel", "cancel"),
    ]

    def authorized(self, handler) -> bool:
        if handler.path.startswith("/blob/"):  # the signed log download: no API token there
            return "Authorization" not in handler.headers
        return handler.headers.get("Authorization") == f"Bearer {TOKEN}"

    def dispatch(self, body, query):
        inputs = body["inputs"]
        assert set(inputs) >= {"tangled_run", "tangled"}
        self.new_run(body)
        return 204, b"", {}

    def render(self, run: FakeRun) -> dict:
        finished = run.finished
        return {
            "id": run.number,
            "name": "tangled ci",
            "display_title": f"tangled {run.params['inputs']['tangled_run']}",
            "status": "completed" if finished else ("queued" if run.phase == 0 else "in_progress"),
            "conclusion": _GH_CONCLUSION[run.outcome] if finished else None,
            "html_url": f"https://github.com/acme/tangled/actions/runs/{run.number}",
        }

    def list_runs(self, body, query):
        runs = [self.render(run) for run in self.runs.values()]
        return 200, {"total_count": len(runs), "workflow_runs": runs}, {}

    def jobs(self, body, query, number):
        run = self.runs[int(number)]
        jobs = []
        for i, job in enumerate(run.jobs):
            state = run.job_state(i)
            done = state in ("success", "failed", "cancelled")
            jobs.append(
                {
                    "id": run.number * 100 + i,
                    "name": job.name,
                    "status": "completed"
                    if done
                    else ("queued" if state == "pending" else "in_progress"),
                    "conclusion": _GH_CONCLUSION.get(state) if done else None,
                }
            )
        return 200, {"total_count": len(jobs), "jobs": jobs}, {}

    def logs_redirect(self, body, query, job):
        # GitHub answers 302 to a short-lived download URL on another host;
        # "localhost" is another host than "127.0.0.1" to the client, so the
        # API token must not follow (the blob route refuses it if it does).
        port = self.server.server_address[1]
        return 302, b"", {"Location": f"http://localhost:{port}/blob/{job}"}

    def blob(self, body, query, job):
        run = self.runs[int(job) // 100]
        return 200, run.job_log(int(job) % 100).encode(), {"Content-Type": "text/plain"}

    def cancel(self, body, query, number):
        self.runs[int(number)].cancelled = True
        return 202, {}, {}


# --- Tekton ---------------------------------------------------------------------------------

_TK = r"/apis/tekton.dev/v1/namespaces/ci"


class TektonFake(FakeCI):
    name = "tekton"
    routes = [
        ("POST", _TK + r"/pipelineruns", "create"),
        ("GET", _TK + r"/pipelineruns/tack-run(?P<number>\d+)", "get"),
        ("PATCH", _TK + r"/pipelineruns/tack-run(?P<number>\d+)", "patch"),
        ("GET", _TK + r"/taskruns/tack-run(?P<number>\d+)-(?P<index>\d+)", "task_run"),
        (
            "GET",
            r"/api/v1/namespaces/ci/pods/tack-run(?P<number>\d+)-(?P<index>\d+)-pod/log",
            "log",
        ),
    ]
    dialect_raw = (
        'when:\n  - event: ["push"]\n    branch: ["main"]\nengine: tack\ntack:\n'
        "  tekton:\n    pipeline: build\n    params:\n      target: release\n"
        "    serviceAccountName: builder\n"
        "    workspaces:\n      - name: source\n        emptyDir: {}\n"
    )

    def authorized(self, handler) -> bool:
        return handler.headers.get("Authorization") == f"Bearer {TOKEN}"

    def render(self, run: FakeRun) -> dict:
        name = f"tack-run{run.number}"
        condition = {
            "queued": None,
            "running": ("Unknown", "Running"),
            "success": ("True", "Succeeded"),
            "failed": ("False", "Failed"),
            "cancelled": ("False", "Cancelled"),
        }[run.outcome]
        if self.ends_in_timeout and run.finished and not run.cancelled:
            condition = ("False", "PipelineRunTimeout")
        status: dict = {
            "childReferences": [
                {
                    "apiVersion": "tekton.dev/v1",
                    "kind": "TaskRun",
                    "name": f"{name}-{i}",
                    "pipelineTaskName": job.name,
                }
                for i, job in enumerate(run.jobs)
                if run.job_state(i) != "pending"
            ]
        }
        if condition:
            status["conditions"] = [
                {
                    "type": "Succeeded",
                    "status": condition[0],
                    "reason": condition[1],
                    "message": f"Tasks Completed: {condition[1]}",
                }
            ]
        return {
            "apiVersion": "tekton.dev/v1",
            "kind": "PipelineRun",
            "metadata": {"name": name, "namespace": "ci"},
            "spec": run.params["spec"],
            "status": status,
        }

    def create(self, body, query):
        assert body["apiVersion"] == "tekton.dev/v1" and body["kind"] == "PipelineRun"
        return super().create(body, query)

    def patch(self, body, query, number):
        if self.headers[-1].get("Content-Type") != "application/merge-patch+json":
            return 415, {"kind": "Status", "code": 415}, {}
        if body == {"spec": {"status": "Cancelled"}}:
            self.runs[int(number)].cancelled = True
        return 200, self.render(self.runs[int(number)]), {}

    def task_run(self, body, query, number, index):
        run, i = self.runs[int(number)], int(index)
        job, state = run.jobs[i], run.job_state(i)
        step: dict = {"name": job.name, "container": f"step-{job.name}"}
        if state == "running":
            step["running"] = {"startedAt": "2026-11-27T00:00:00Z"}
        elif state != "pending":
            code = job.exit_code if state != "cancelled" else 137
            step["terminated"] = {"exitCode": code, "reason": "Completed" if not code else "Error"}
        return (
            200,
            {
                "kind": "TaskRun",
                "status": {"podName": f"tack-run{number}-{i}-pod", "steps": [step]},
            },
            {},
        )

    def log(self, body, query, number, index):
        run, i = self.runs[int(number)], int(index)
        if query.get("container") != [f"step-{run.jobs[i].name}"]:
            return 400, {"kind": "Status", "message": "container not found"}, {}
        return 200, run.job_log(i).encode(), {"Content-Type": "text/plain"}


# --- sourcehut --------------------------------------------------------------------------------

_SRHT_JOB = {
    "queued": "QUEUED",
    "running": "RUNNING",
    "success": "SUCCESS",
    "failed": "FAILED",
    "cancelled": "CANCELLED",
}
_SRHT_TASK = {
    "pending": "PENDING",
    "running": "RUNNING",
    "success": "SUCCESS",
    "failed": "FAILED",
    "cancelled": "FAILED",
}
SRHT_MANIFEST = "image: alpine/edge\ntasks:\n  - build: make\n  - test: make check\n"


class SourcehutFake(FakeCI):
    name = "sourcehut"
    routes = [
        ("POST", r"/query", "graphql"),
        ("GET", r"/logs/(?P<number>\d+)/(?P<index>\d+)", "log"),
        ("GET", r"/elsewhere/(?P<number>\d+)/(?P<index>\d+)", "log"),
    ]
    malformed_methods = ("GET", "POST")
    # Log URLs on another host ("localhost" is another host than 127.0.0.1 to
    # the client), which must not be handed the API token.
    logs_elsewhere = False
    workflow_raw = "sourcehut:\n  manifest: |\n" + "".join(
        f"    {line}\n" for line in SRHT_MANIFEST.splitlines()
    )
    dialect_raw = (
        'when:\n  - event: ["push"]\n    branch: ["main"]\nengine: tack\ntack:\n'
        "  sourcehut:\n    tags: [tack, ci]\n    note: from the original tack\n"
        "    secrets: true\n    manifest: |\n"
        + "".join(f"      {line}\n" for line in SRHT_MANIFEST.splitlines())
    )

    def authorized(self, handler) -> bool:
        if handler.path.startswith("/elsewhere/"):
            return "Authorization" not in handler.headers
        return handler.headers.get("Authorization") == f"Bearer {TOKEN}"

    def graphql(self, body, query):
        text, variables = body["query"], body.get("variables") or {}
        if "submit(" in text:
            run = self.new_run(variables)
            return 200, {"data": {"submit": {"id": run.number}}}, {}
        if "cancel(" in text:
            run = self.runs[variables["id"]]
            run.cancelled = True
            return 200, {"data": {"cancel": {"id": run.number}}}, {}
        if "job(" in text:
            run = self.runs.get(variables["id"])
            if run is None:
                return 200, {"errors": [{"message": "no such job"}], "data": {"job": None}}, {}
            run.tick()
            return 200, {"data": {"job": self.render(run)}}, {}
        return 200, {"errors": [{"message": "unknown query"}], "data": None}, {}

    def render(self, run: FakeRun) -> dict:
        return {
            "id": run.number,
            "status": "TIMEOUT"
            if self.ends_in_timeout and run.finished and not run.cancelled
            else _SRHT_JOB[run.outcome],
            "tasks": [
                {
                    "name": job.name,
                    "status": _SRHT_TASK[run.job_state(i)],
                    "log": {"fullURL": self._log_url(run.number, i)},
                }
                for i, job in enumerate(run.jobs)
            ],
        }

    def _log_url(self, number: int, index: int) -> str:
        if self.logs_elsewhere:
            return f"http://localhost:{self.server.server_address[1]}/elsewhere/{number}/{index}"
        return f"{self.url}/logs/{number}/{index}"

    def log(self, body, query, number, index):
        return (
            200,
            self.runs[int(number)].job_log(int(index)).encode(),
            {"Content-Type": "text/plain"},
        )


FAKES = {
    fake.name: fake for fake in (BuildkiteFake, GitLabFake, GitHubFake, TektonFake, SourcehutFake)
}


def backend_config(fake: FakeCI) -> str:
    """The tack.toml block that points an adapter at ``fake``."""
    common = (
        'token_env = "TACK_TEST_CI_TOKEN"\npoll_interval = 0.1\nretry_initial = 0.05\n'
        "attempts = 4\n"
    )
    if fake.name == "buildkite":
        body = f'organization = "acme"\npipeline = "tangled"\napi_url = "{fake.url}"\n'
    elif fake.name == "tekton":
        body = f'namespace = "ci"\npipeline = "build"\napi_url = "{fake.url}"\n'
    elif fake.name == "sourcehut":
        body = f'instance = "{fake.url}"\n'
    elif fake.name == "gitlab-ci":
        body = f'project = "acme/tangled"\napi_url = "{fake.url}"\n'
    else:
        body = f'repository = "acme/tangled"\nworkflow = "ci.yml"\napi_url = "{fake.url}"\n'
    return f'[backends.ci]\ntype = "{fake.name}"\n{body}{common}'


def sent_values(fake: FakeCI, run: FakeRun) -> dict:
    """The TANGLED_* values the adapter passed, however the vendor carries them."""
    if fake.name == "buildkite":
        return run.params["env"]
    if fake.name == "gitlab-ci":
        return {v["key"]: v["value"] for v in run.params["variables"]}
    if fake.name == "tekton":
        return {p["name"]: p["value"] for p in run.params["spec"]["params"]}
    if fake.name == "sourcehut":
        return yaml.safe_load(run.params["manifest"])["environment"]
    return json.loads(run.params["inputs"]["tangled"])


def self_signed_tls(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 127.0.0.1 and the certificate a client must trust."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "ca.crt", folder / "server.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file
