"""The container backend with a real podman: an image built here, served by a
real registry on 127.0.0.1 at the names nixery gives images, pulled by tack.

Steps run in real containers; clones come over smart HTTP from the knot
stand-in; limits are the kernel's. Skipped, with the reason, where podman or
docker-registry is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tack.backends import Context, Job, build
from tack.backends.container import INSTANCE_LABEL, nixery_image, plan_image

from . import containers
from .spindle_clients import EventsClient, read_log
from .standins import (
    OWNER,
    REPO,
    Clock,
    KnotStandin,
    TackProcess,
    commit,
    direct_job,
    make_git_repo,
    push_pipeline,
    repo,
    run_direct,
    tack_env,
    wait_until,
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
    return direct_job(raw, "nixery", secrets, workflow_id)


# --- the image a workflow gets ------------------------------------------------------------


def test_image_names_follow_the_official_spindle():
    plain = {"dependencies": {"nixpkgs": ["go", "gnumake"]}}
    assert plan_image(plain, "nixery.dev", None).image.endswith("go/gnumake/bash/git/coreutils/nix")
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
    outcome, text = run_direct(backend, job_for(raw), tmp_path / "logs")
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
    outcome, text = run_direct(backend, job_for(raw, {"TOKEN": secret}), tmp_path / "logs")
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
    outcome, text = run_direct(backend, job_for(raw), tmp_path / "logs")
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
    outcome, text = run_direct(backend, job_for(hog), tmp_path / "logs")
    assert outcome.status == "failed" and outcome.exit_code == 137, text
    assert "64m" in outcome.error
    forks = yaml("""
        steps:
          - name: Forks
            command: for i in $(seq 60); do sleep 5 & done; wait
    """)
    outcome, text = run_direct(backend, job_for(forks, workflow_id=2), tmp_path / "logs")
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
    outcome, text = run_direct(backend, job_for(raw), tmp_path / "logs")
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
    outcome, _ = run_direct(backend, job_for(raw), tmp_path / "logs")
    assert outcome.status == "timeout" and "3s" in outcome.error
    assert time.monotonic() - started < 30
    job = job_for(raw, workflow_id=2)
    threading.Timer(2.0, job.cancel.set).start()
    outcome, _ = run_direct(backend, job, tmp_path / "logs")
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
    outcome, text = run_direct(backend, job_for(raw), tmp_path / "logs")
    assert outcome.status == "failed"
    assert outcome.error.startswith("image pull failed:") and "manifest unknown" in outcome.error
    assert "never" not in text.replace('"Never"', "")


# --- through a real tack process ------------------------------------------------------

OFFICIAL_STYLE = """
when:
  - event: ["push", "pull_request"]
    branch: ["main"]

engine: nixery

dependencies:
  nixpkgs:
    - hello

environment:
  GREETING: "hello"

steps:
  - name: Show the checkout
    command: |
      echo "at $(pwd): $(cat .git/HEAD)"
      cat greeting.txt
  - name: Greet
    command: echo "$GREETING from the container"
"""


@pytest.fixture
def git_knot(tmp_path):
    standin = KnotStandin(git_root=tmp_path / "git")
    yield standin
    standin.close()


def tack_with_nixery(tmp_path: Path, jetstream, registry, **options) -> tuple[TackProcess, int]:
    """A real tack whose ``nixery`` engine is a container backend on ``registry``."""
    extra = "".join(f"{key} = {value!r}\n" for key, value in options.items())
    config = tmp_path / "tack.toml"
    config.write_text(
        "[backends.nixery]\n"
        'type = "container"\n'
        'runtime = "podman"\n'
        f'registry = "http://{registry.address}"\n'
        f'workspace_root = "{tmp_path}/workspaces"\n'
        "kill_grace = 1\n" + extra.replace("'", '"')
    )
    run = len(list(tmp_path.glob("tack-*.log")))
    env = tack_env(tmp_path, jetstream.url, TACK_CONFIG=str(config))
    proc = TackProcess(env, tmp_path / f"tack-{run}.log")
    return proc, proc.wait_for_log("listening")["port"]


def test_an_unchanged_official_workflow_runs_end_to_end(podman, tmp_path, jetstream, git_knot):
    registry, image = podman
    registry.push(image, "hello/bash/git/coreutils/nix")
    sha = make_git_repo(git_knot.git_root, OWNER, "hello", {"greeting.txt": "from the repo\n"})
    jetstream.add(commit(Clock(), OWNER, REPO, "r1", "create", repo("hello", git_knot.name)))
    proc, port = tack_with_nixery(tmp_path, jetstream, registry)
    try:
        wait_until(lambda: git_knot.open_connections == 1, timeout=20, what="knot subscription")
        client = EventsClient(port).start()
        record = push_pipeline(
            git_knot.name, OWNER, "hello", [("ci.yml", "nixery", OFFICIAL_STYLE)], sha=sha
        )
        record["workflows"][0]["clone"]["skip"] = False
        rkey = git_knot.send_pipeline(record)
        wait_until(lambda: client.statuses() == ["pending", "running", "success"], timeout=90)
        lines = read_log(port, f"/logs/{git_knot.name}/{rkey}/ci.yml").lines
        contents = [line["content"] for line in lines]
        assert f"at /tangled/workspace: {sha}" in contents
        assert "from the repo" in contents and "hello from the container" in contents
        systems = [
            line["content"]
            for line in lines
            if line["kind"] == "control" and line.get("step_kind") == 0
        ]
        assert systems[:2] == ["Clone repository", "Clone repository"]
        assert "Pull image" in systems and "Configure Nix" in systems
    finally:
        assert proc.terminate() == 0


def running_containers() -> list[str]:
    out = subprocess.run(
        ["podman", "ps", "--filter", "label=tack.workflow", "--format", "{{.Names}}"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return out.split()


def test_kill_9_mid_run_then_restart_removes_the_container(podman, tmp_path, jetstream, git_knot):
    registry, image = podman
    jetstream.add(commit(Clock(), OWNER, REPO, "r1", "create", repo("hello", git_knot.name)))
    proc, port = tack_with_nixery(tmp_path, jetstream, registry, image=image)
    hang = "steps:\n  - name: Hang\n    command: echo started; sleep 300\n"
    wait_until(lambda: git_knot.open_connections == 1, timeout=20, what="knot subscription")
    client = EventsClient(port).start()
    git_knot.send_pipeline(
        push_pipeline(git_knot.name, OWNER, "hello", [("hang.yml", "nixery", hang)])
    )
    wait_until(lambda: client.statuses() == ["pending", "running"], timeout=60)
    wait_until(
        lambda: [n for n in running_containers() if n.startswith("tack-")],
        timeout=60, what="the workflow's container",
    )  # fmt: skip
    ours = [name for name in running_containers() if name.startswith("tack-")]
    time.sleep(1.0)  # the step is under way
    os.kill(proc.proc.pid, signal.SIGKILL)
    proc.wait()
    assert set(ours) <= set(containers.containers_labelled("tack.workflow"))  # left behind

    proc, port = tack_with_nixery(tmp_path, jetstream, registry, image=image)
    try:
        after = EventsClient(port).start()
        wait_until(
            lambda: after.statuses("hang.yml") == ["pending", "running", "failed"], timeout=30
        )
        left = set(containers.containers_labelled("tack.workflow"))
        assert not (set(ours) & left), "the restart removed the dead run's container"
        assert not any(containers.networks_named(name) for name in ours)
        assert list((tmp_path / "workspaces").iterdir()) == []
    finally:
        assert proc.terminate() == 0
