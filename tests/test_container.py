"""The container backend with a real podman: an image built here, served by a
real registry on 127.0.0.1 at the names nixery gives images, pulled by tack.

Steps run in real containers; clones come over smart HTTP from the knot
stand-in; limits are the kernel's. Skipped, with the reason, where podman or
docker-registry is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import base64
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tack.backends import Context, Job, build
from tack.backends.container import INSTANCE_LABEL, nixery_image, plan_image
from tack.pipelines import tangled_env
from tack.workflow import parse
from tack.worklogs import LogBook

from . import containers
from .standins import (
    OWNER,
    push_pipeline,
)


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """(registry, base image name) once per module; skip where podman cannot run."""
    reason = containers.problem()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("containers")
    image = containers.import_image(work)
    registry = containers.Registry(work)
    yield registry, image
    registry.close()


def yaml(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def container_backend(tmp_path: Path, registry, **options):
    raw = {
        "type": "container",
        "runtime": "podman",
        "registry": f"http://{registry.address}",
        "workspace_root": str(tmp_path / "ws"),
        "kill_grace": 1,
        **options,
    }
    context = Context("spindle.test", dev=True, private_paths=(str(tmp_path / "state"),))
    return build("container", raw, context)


def job_for(raw: str, secrets: dict[str, str] | None = None, workflow_id: int = 1) -> Job:
    record = push_pipeline("knot.test", OWNER, "hello", [("ci.yml", "nixery", raw)])
    return Job(
        workflow_id=workflow_id,
        knot="knot.test",
        rkey="3l",
        name="ci.yml",
        engine="nixery",
        pipeline_uri="at://x",
        pipeline=record,
        workflow={"name": "ci.yml", "engine": "nixery", "raw": raw, "clone": {"skip": True}},
        spec=parse(raw),
        env=tangled_env(record, "at://x", True),
        secrets=secrets or {},
        cancel=threading.Event(),
    )


def run_job(backend, job: Job, tmp_path: Path):
    book = LogBook(tmp_path / "logs")
    log = book.open(job.workflow_id, job.secrets.values())
    outcome = backend.run(job, log)
    log.close()
    return outcome, book.path(job.workflow_id).read_text()


# --- the image a workflow gets ------------------------------------------------------------


def test_image_names_follow_the_official_spindle():
    plain = {"dependencies": {"nixpkgs": ["go", "gnumake"]}}
    assert plan_image(plain, "nixery.dev", None).image.endswith(
        "go/gnumake/bash/git/coreutils/nix"
    )
    assert plan_image({}, "reg.test", None).image.endswith("reg.test/bash/git/coreutils/nix") or (
        plan_image({}, "reg.test", None).image == nixery_image("reg.test", [])
    )
    assert plan_image({}, "reg.test", "debian:12").image == "debian:12"
    assert plan_image({"image": "alpine:3"}, "reg.test", None).image == "alpine:3"
    flakes = plan_image({"dependencies": {"github:me/tools": ["fmt"]}}, "reg.test", None)
    assert flakes.flake_packages == ("github:me/tools#fmt",)
    from tack.backends.container import UnusableWorkflow

    for bad in ({"dependencies": {"nixpkgs": ["go; rm -rf /"]}}, {"image": "a b"}):
        with pytest.raises(UnusableWorkflow):
            plan_image(bad, "reg.test", None)


# --- one job, straight through the backend ------------------------------------------------


def test_steps_run_in_the_pulled_nixery_image_with_the_spindle_layout(podman, tmp_path):
    registry, image = podman
    pushed = registry.push(image, "hello/bash/git/coreutils/nix")
    backend = container_backend(tmp_path, registry)
    raw = yaml("""
        dependencies:
          nixpkgs:
            - hello
        environment:
          LEVEL: "3.10"
        steps:
          - name: Where
            command: pwd; echo "home=$HOME"; echo "level=$LEVEL repo=$TANGLED_REPO_NAME"
          - name: Who
            command: hostname 2>/dev/null || cat /etc/hostname; id -u
    """)
    outcome, text = run_job(backend, job_for(raw), tmp_path)
    assert outcome.status == "success", text
    assert "/tangled/workspace" in text and "home=/tangled/home" in text
    assert "level=3.10 repo=hello" in text
    assert f"{backend.runtime} pull {pushed}" in text  # the system step names the image
    assert containers.containers_labelled(f"{INSTANCE_LABEL}={backend.instance}") == []


def test_secrets_reach_the_step_by_name_and_are_masked(podman, tmp_path):
    registry, image = podman
    backend = container_backend(tmp_path, registry, image=image, network="none")
    secret = "hunter2-very-secret\nsecond line"
    raw = yaml("""
        steps:
          - name: Leak
            command: echo "plain $TOKEN"; printf %s "$TOKEN" | base64 -w0; echo; cat /proc/1/cmdline
    """)
    outcome, text = run_job(backend, job_for(raw, {"TOKEN": secret}), tmp_path)
    assert outcome.status == "success", text
    assert "hunter2" not in text
    assert base64.b64encode(secret.encode()).decode().rstrip("=") not in text
    assert '"plain ***' in text


def test_a_step_cannot_see_tacks_files_environment_or_processes(podman, tmp_path, monkeypatch):
    registry, image = podman
    state = tmp_path / "state"
    state.mkdir()
    (state / "spindle.db").write_text("the database")
    (state / "secrets.key").write_text("the key")
    monkeypatch.setenv("TACK_SECRET_PROBE", "tack-only-value")
    backend = container_backend(tmp_path, registry, image=image, network="none")
    raw = yaml(f"""
        steps:
          - name: Look
            command: |
              cat {state}/spindle.db {state}/secrets.key 2>&1 || echo "no tack files"
              env | grep -c TACK_SECRET_PROBE || true
              ls /proc | grep -c '^[0-9]' > /tmp/n; echo "processes=$(cat /tmp/n)"
    """)
    outcome, text = run_job(backend, job_for(raw), tmp_path)
    assert outcome.status == "success", text
    assert "the database" not in text and "the key" not in text
    assert "no tack files" in text
    assert "tack-only-value" not in text
    assert '"0"' in text  # the probe variable is not in the step's environment
    processes = int(text.rsplit("processes=", 1)[1].split('"')[0])
    assert processes < 10  # the container's own, not the host's


def test_memory_and_pids_limits_are_enforced(podman, tmp_path):
    registry, image = podman
    backend = container_backend(tmp_path, registry, image=image, memory="64m", pids=20)
    hog = yaml("""
        steps:
          - name: Hog
            command: head -c 400m /dev/zero | tail > /dev/null
    """)
    outcome, text = run_job(backend, job_for(hog), tmp_path)
    assert outcome.status == "failed" and outcome.exit_code == 137, text
    assert "64m" in outcome.error
    forks = yaml("""
        steps:
          - name: Forks
            command: for i in $(seq 60); do sleep 5 & done; wait
    """)
    outcome, text = run_job(backend, job_for(forks, workflow_id=2), tmp_path)
    assert "Resource temporarily unavailable" in text, text


def test_a_failing_step_fails_the_workflow_with_its_exit_code(podman, tmp_path):
    registry, image = podman
    backend = container_backend(tmp_path, registry, image=image)
    raw = yaml("""
        steps:
          - name: Fails
            command: echo before; exit 7
          - name: Never
            command: echo never ran
    """)
    outcome, text = run_job(backend, job_for(raw), tmp_path)
    assert (outcome.status, outcome.exit_code) == ("failed", 7)
    assert "Fails" in outcome.error and "never ran" not in text


def test_timeout_and_cancel_stop_the_container_and_remove_everything(podman, tmp_path):
    registry, image = podman
    backend = container_backend(tmp_path, registry, image=image, timeout=3)
    raw = yaml("""
        steps:
          - name: Hangs
            command: echo started; sleep 300
    """)
    started = time.monotonic()
    outcome, _ = run_job(backend, job_for(raw), tmp_path)
    assert outcome.status == "timeout" and "3s" in outcome.error
    assert time.monotonic() - started < 30
    job = job_for(raw, workflow_id=2)
    threading.Timer(2.0, job.cancel.set).start()
    outcome, _ = run_job(backend, job, tmp_path)
    assert outcome.status == "cancelled"
    label = f"{INSTANCE_LABEL}={backend.instance}"
    assert containers.containers_labelled(label) == []
    assert containers.networks_named("tack-1-") == [] and containers.networks_named("tack-2-") == []
    assert list((tmp_path / "ws").iterdir()) == []


def test_a_failed_pull_fails_the_workflow_with_the_runtimes_message(podman, tmp_path):
    registry, _ = podman
    backend = container_backend(tmp_path, registry)
    raw = yaml("""
        dependencies:
          nixpkgs: [not-in-this-registry]
        steps:
          - name: Never
            command: echo never
    """)
    outcome, text = run_job(backend, job_for(raw), tmp_path)
    assert outcome.status == "failed"
    assert outcome.error.startswith("image pull failed:") and "manifest unknown" in outcome.error
    assert "never" not in text.replace('"Never"', "")
