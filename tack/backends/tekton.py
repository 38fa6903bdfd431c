"""``tekton``: run a workflow as a Tekton ``PipelineRun`` in Kubernetes.

Through Kubernetes' REST API (https://kubernetes.io/docs/reference/kubernetes-api/)
and Tekton's v1 resources (https://tekton.dev/docs/pipelines/pipelineruns/):

- create a ``tekton.dev/v1`` PipelineRun of an existing Pipeline (the
  workflow's ``tack.tekton.pipeline``, else the configured one) with the
  ``TANGLED_*`` values as params, plus the workflow's own params, workspace
  bindings and service account;
- watch its ``Succeeded`` condition: True is success; False is failed, or
  timeout for ``PipelineRunTimeout``, or cancelled for the cancel reasons;
- each step of each TaskRun is a log step, its lines read from
  ``pods/{pod}/log?container=step-<name>`` while it runs;
- cancel by patching ``spec.status: Cancelled``; resume by the saved name.

Credentials: in a cluster, the pod's service account (token re-read at each
call, since bound tokens rotate, and its CA); outside, ``api_url`` with a
bearer token from ``token_env`` and an optional ``ca_file``.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..config import ConfigError
from ..workflow import WorkflowError
from . import Context, Job, provider_options
from .options import Options
from .remote import RemoteCI, RemoteError, Snapshot, Unit, credential, field_of, new_lines

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Kubernetes object names (DNS-1123 subdomain) and Tekton param names.
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,252}$")
MAX_PARAMS = 100
MAX_WORKSPACES = 20

_CANCELLED = {"Cancelled", "CancelledRunFinally", "StoppedRunFinally", "PipelineRunCancelled"}
_PENDING = {"", "Pending", "PipelineRunPending", "ResolvingPipelineRef"}


class TektonBackend(RemoteCI):
    type_name = "tekton"

    def __init__(self, name: str, options: Options, context: Context) -> None:
        super().__init__(name, options, context)
        self.namespace = options.text("namespace", "default")
        self.pipeline = options.text("pipeline")  # else each workflow names its own
        self.service_account = options.text("service_account")
        self.dashboard_url = options.url("dashboard_url")
        self.api_url = options.url("api_url")
        self.token_env = options.env_name("token_env")
        ca_file = options.text("ca_file")
        account_dir = Path(options.text("service_account_dir", SERVICE_ACCOUNT_DIR))
        for key, value in (("namespace", self.namespace), ("pipeline", self.pipeline)):
            if value is not None and not K8S_NAME.match(value):
                raise options.fail(key, "must be a Kubernetes name such as ci or build")
        self._token_file: Path | None = None
        if self.api_url is None:
            self.api_url, self._token_file, ca_file = _in_cluster(options, account_dir)
        self._tls = _trust(options, ca_file) if ca_file else None

    # --- talking to the cluster --------------------------------------------------------

    def _api(self):
        token = credential(self.token_env)
        if self._token_file is not None:
            try:
                token = self._token_file.read_text().strip()
            except OSError as exc:
                raise RemoteError(
                    f"cannot read the service account token: {exc.strerror}"
                ) from None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http(self.api_url, headers, self._tls)

    def _runs(self) -> str:
        return f"/apis/tekton.dev/v1/namespaces/{quote(self.namespace)}/pipelineruns"

    # --- RemoteCI ----------------------------------------------------------------------

    def trigger(self, job: Job) -> dict[str, Any]:
        body = self._pipeline_run(job)
        created = self._api().json("POST", self._runs(), body, cancel=job.cancel)
        name = field_of(field_of(created, "metadata", dict), "name", str)
        if not K8S_NAME.match(name):
            raise RemoteError("malformed answer: the PipelineRun's name is not a Kubernetes name")
        link = f"{self.api_url}{self._runs()}/{name}"
        if self.dashboard_url:
            link = f"{self.dashboard_url}/#/namespaces/{self.namespace}/pipelineruns/{name}"
        return {"name": name, "web_url": link}

    def snapshot(self, job: Job, run: dict[str, Any]) -> Snapshot:
        api = self._api()
        pipeline_run = api.json("GET", f"{self._runs()}/{run['name']}", cancel=job.cancel)
        status = pipeline_run.get("status", {}) if isinstance(pipeline_run, dict) else None
        if not isinstance(status, dict):
            raise RemoteError("malformed answer: not a PipelineRun with a status")
        units: list[Unit] = []
        failed_step: dict = {}
        for child in _list(status, "childReferences"):
            if child.get("kind", "TaskRun") != "TaskRun":
                continue
            name = field_of(child, "name", str)
            task_run = api.json("GET", self._task_run(name), cancel=job.cancel)
            task_status = task_run.get("status") if isinstance(task_run, dict) else None
            task_status = task_status if isinstance(task_status, dict) else {}
            pod = task_status.get("podName")
            for step in _list(task_status, "steps"):
                unit = _unit(child, pod, step)
                if unit is not None:
                    units.append(unit)
                exit_code = (step.get("terminated") or {}).get("exitCode")
                if isinstance(exit_code, int) and exit_code and not failed_step:
                    failed_step = {"name": unit.name if unit else "?", "exit_code": exit_code}
        return _outcome(status, units, failed_step)

    def _task_run(self, name: str) -> str:
        if not K8S_NAME.match(name):
            raise RemoteError("malformed answer: a TaskRun name is not a Kubernetes name")
        return f"/apis/tekton.dev/v1/namespaces/{quote(self.namespace)}/taskruns/{name}"

    def log_lines(self, job: Job, run: dict[str, Any], unit: Unit, offset: int):
        pod, container = unit.id.split("/", 1)
        text = self._api().text(
            "GET",
            f"/api/v1/namespaces/{quote(self.namespace)}/pods/{pod}/log",
            params={"container": container},
            cancel=job.cancel,
        )
        return new_lines(text, offset, unit.done)

    def cancel_remote(self, job: Job, run: dict[str, Any]) -> None:
        self._api().json(
            "PATCH",
            f"{self._runs()}/{run['name']}",
            {"spec": {"status": "Cancelled"}},
            content_type="application/merge-patch+json",
        )

    # --- the PipelineRun ---------------------------------------------------------------

    def _pipeline_run(self, job: Job) -> dict[str, Any]:
        block = provider_options(job, "tekton")
        pipeline = block.get("pipeline") or self.pipeline
        if not pipeline:
            raise WorkflowError(
                "no Tekton Pipeline: name one in the workflow (tack.tekton.pipeline) "
                f"or set backends.{self.name}.pipeline"
            )
        if not isinstance(pipeline, str) or not K8S_NAME.match(pipeline):
            raise WorkflowError("tekton pipeline must be a Kubernetes name such as build")
        params = {**job.env, "TANGLED_WORKFLOW": job.name, **_params(block.get("params"))}
        spec: dict[str, Any] = {
            "pipelineRef": {"name": pipeline},
            "params": [{"name": key, "value": value} for key, value in params.items()],
            "timeouts": {"pipeline": f"{int(self.timeout)}s"},
        }
        workspaces = _workspaces(block.get("workspaces"))
        if workspaces:
            spec["workspaces"] = workspaces
        account = block.get("serviceAccountName", block.get("service_account"))
        account = account or self.service_account
        if account is not None:
            if not isinstance(account, str) or not K8S_NAME.match(account):
                raise WorkflowError("tekton serviceAccountName must be a Kubernetes name")
            spec["taskRunTemplate"] = {"serviceAccountName": account}
        return {
            "apiVersion": "tekton.dev/v1",
            "kind": "PipelineRun",
            "metadata": {
                "generateName": "tack-",
                "namespace": self.namespace,
                "labels": {
                    "app.kubernetes.io/managed-by": "tack",
                    "tack.workflow-id": str(job.workflow_id),
                },
            },
            "spec": spec,
        }


def _in_cluster(options: Options, account_dir: Path) -> tuple[str, Path, str | None]:
    """The in-cluster API address, token file and CA, as a pod sees them."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token = account_dir / "token"
    if not host or not token.is_file():
        raise options.fail(
            "api_url",
            "is required outside a Kubernetes cluster (no KUBERNETES_SERVICE_HOST or "
            f"no service account token at {token})",
        )
    if not port.isdigit():
        raise options.fail("api_url", f"KUBERNETES_SERVICE_PORT is not a port: {port!r}")
    host = f"[{host}]" if ":" in host else host
    ca = account_dir / "ca.crt"
    return f"https://{host}:{port}", token, str(ca) if ca.is_file() else None


def _trust(options: Options, ca_file: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "TACK_CONFIG", f"backends.{options.name}.ca_file: cannot load {ca_file}: {exc}"
        ) from None


def _list(item: dict, key: str) -> list[dict]:
    value = item.get(key) or []
    if not isinstance(value, list):
        raise RemoteError(f"malformed answer: {key} is not a list")
    return [entry for entry in value if isinstance(entry, dict)]


def _unit(child: dict, pod: Any, step: dict) -> Unit | None:
    """A step as a log step, once it has a container that started."""
    name, container = step.get("name"), step.get("container")
    if not (isinstance(name, str) and isinstance(container, str) and isinstance(pod, str)):
        return None
    if "running" not in step and "terminated" not in step:
        return None
    if not K8S_NAME.match(pod) or not K8S_NAME.match(container):
        raise RemoteError("malformed answer: a pod or container name is not a Kubernetes name")
    task = child.get("pipelineTaskName")
    label = name if task in (None, name) else f"{task}/{name}"
    return Unit(f"{pod}/{container}", label, "terminated" in step)


def _outcome(status: dict, units: list[Unit], failed_step: dict) -> Snapshot:
    succeeded = next((c for c in _list(status, "conditions") if c.get("type") == "Succeeded"), None)
    if succeeded is None:
        return Snapshot("pending", units)
    state, reason = succeeded.get("status"), str(succeeded.get("reason") or "")
    message = str(succeeded.get("message") or reason)[:500]
    if state == "True":
        return Snapshot("success", units)
    if state != "False":
        return Snapshot("pending" if reason in _PENDING else "running", units)
    if reason == "PipelineRunTimeout":
        return Snapshot("timeout", units, f"Tekton {reason}: {message}")
    if reason in _CANCELLED:
        return Snapshot("cancelled", units, f"Tekton {reason}: {message}")
    where = f" (step {failed_step['name']})" if failed_step else ""
    return Snapshot(
        "failed", units, f"Tekton {reason}{where}: {message}", failed_step.get("exit_code")
    )


def _params(value: Any) -> dict[str, Any]:
    """The workflow's own params: names to strings or lists of strings."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_PARAMS:
        raise WorkflowError(f"tekton params must be a mapping of at most {MAX_PARAMS} names")
    params: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not PARAM_NAME.match(key):
            raise WorkflowError(f"tekton params: {str(key)[:50]!r} is not a param name")
        if isinstance(item, list):
            params[key] = [str(part) for part in item]
        elif isinstance(item, dict):
            raise WorkflowError(f"tekton params.{key} must be a string or a list")
        else:
            params[key] = "" if item is None else str(item)
    return params


def _workspaces(value: Any) -> list[dict]:
    """Workspace bindings as Tekton spells them, each with a name."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_WORKSPACES:
        raise WorkflowError(f"tekton workspaces must be a list of at most {MAX_WORKSPACES}")
    for binding in value:
        name = binding.get("name") if isinstance(binding, dict) else None
        if not isinstance(name, str) or not PARAM_NAME.match(name):
            raise WorkflowError("tekton workspaces: each binding needs a name")
    return value
