"""The shell and command backends, run for real: git over smart HTTP from the
knot stand-in, bash, real process groups, real files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tack.backends import Context, build
from tack.workflow import parse

from .spindle_clients import EventsClient, read_log
from .standins import (
    OWNER,
    direct_job,
    fake_podman,
    push_pipeline,
    run_direct,
    tack_env,
    wait_until,
)

ALICE = "did:plc:alice"


def yaml(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def run_pipeline(spindle, knot, workflows, sha="a" * 40, clone_skip=True):
    client = EventsClient(spindle.server.port).start()
    record = push_pipeline(knot.name, OWNER, "hello", workflows, sha=sha)
    for workflow in record["workflows"]:
        workflow["clone"]["skip"] = clone_skip
    rkey = knot.send_pipeline(record)
    return client, rkey


def finished(client, name):
    statuses = client.statuses(name)
    return statuses and statuses[-1] in ("success", "failed", "timeout", "cancelled")


def no_process_matching(marker: str) -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return not any(marker in line and "ps -eo" not in line for line in out.splitlines())


# --- shell -------------------------------------------------------------------------------


def test_shell_clones_at_the_trigger_sha_and_runs_steps(serve_repo, knot, tmp_path):
    from .standins import make_git_repo

    sha = make_git_repo(knot.git_root, OWNER, "hello", {"hello.sh": "echo hello from the repo\n"})
    spindle = serve_repo()
    steps = yaml("""
        steps:
          - name: Which commit
            command: git rev-parse HEAD && test ! -e LATER
          - name: Run it
            command: bash hello.sh
    """)
    client, rkey = run_pipeline(
        spindle, knot, [("ci.yml", "shell", steps)], sha=sha, clone_skip=False
    )
    wait_until(lambda: finished(client, "ci.yml"), timeout=60)
    assert client.statuses("ci.yml") == ["pending", "running", "success"]
    log = read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/ci.yml")
    controls = [
        (ln["content"], ln["step_status"], ln["step_kind"])
        for ln in log.lines
        if ln["kind"] == "control"
    ]
    assert controls == [
        ("Clone repository", "start", 0),
        ("Clone repository", "end", 0),
        ("Which commit", "start", 1),
        ("Which commit", "end", 1),
        ("Run it", "start", 1),
        ("Run it", "end", 1),
    ]
    data = [ln["content"] for ln in log.lines if ln["kind"] == "data" and ln["step_id"] > 0]
    assert data == [sha, "hello from the repo"]
    assert list((tmp_path / "workspaces").iterdir()) == [], "workspace removed"


def make_repo_with_submodule(knot) -> str:
    """OWNER/hello on the knot: commit 1, then commit 2 (tagged ``v1``, with a
    submodule ``lib`` pointing at OWNER/lib on the same knot), then commit 3.
    Returns commit 2's sha, the one the pipeline names."""
    from .standins import make_git_repo

    lib_sha = make_git_repo(knot.git_root, OWNER, "lib", {"lib.txt": "from the submodule\n"})
    work = knot.git_root / "_work" / "hello"
    work.mkdir(parents=True)

    def git(*args: str) -> str:
        command = ["git", "-c", "user.name=T", "-c", "user.email=t@example.com", *args]
        return subprocess.run(
            command, cwd=work, check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q", "-b", "main")
    (work / "README").write_text("one\n")
    git("add", "-A")
    git("commit", "-qm", "one")
    url = f"http://{knot.name}/{OWNER}/lib"
    (work / ".gitmodules").write_text(f'[submodule "lib"]\n\tpath = lib\n\turl = {url}\n')
    git("update-index", "--add", "--cacheinfo", f"160000,{lib_sha},lib")
    git("add", ".gitmodules")
    git("commit", "-qm", "two")
    git("tag", "v1")
    target = git("rev-parse", "HEAD")
    (work / "README").write_text("three\n")
    git("commit", "-qam", "three")
    bare = knot.git_root / OWNER / "hello"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    subprocess.run(["git", "config", "uploadpack.allowAnySHA1InWant", "true"], cwd=bare, check=True)
    return target


def test_shell_clone_honours_depth_tags_and_submodules(serve_repo, knot):
    sha = make_repo_with_submodule(knot)
    spindle = serve_repo()
    probe = yaml("""
        steps:
          - name: Probe
            command: |
              echo "head=$(git rev-parse HEAD)"
              echo "commits=$(git rev-list --count HEAD)"
              echo "tags=$(git tag | tr '\\n' ' ')"
              if [ -e lib/lib.txt ]; then echo "lib=$(cat lib/lib.txt)"; else echo "lib=absent"; fi
    """)
    client = EventsClient(spindle.server.port).start()
    record = push_pipeline(
        knot.name, OWNER, "hello", [("deep.yml", "shell", probe), ("plain.yml", "shell", probe)]
    )
    record["triggerMetadata"]["push"]["newSha"] = sha
    record["workflows"][0]["clone"] = {"skip": False, "depth": 2, "submodules": True, "tags": True}
    # Depth 0 means the protocol's default of 1, not a full clone.
    record["workflows"][1]["clone"] = {
        "skip": False,
        "depth": 0,
        "submodules": False,
        "tags": False,
    }
    rkey = knot.send_pipeline(record)
    for name in ("deep.yml", "plain.yml"):
        wait_until(lambda name=name: finished(client, name), timeout=60, what=name)
        assert client.statuses(name) == ["pending", "running", "success"]

    def probe_output(name: str) -> list[str]:
        log = read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/{name}")
        return [ln["content"] for ln in log.lines if ln["kind"] == "data" and ln["step_id"] == 1]

    assert probe_output("deep.yml") == [
        f"head={sha}",
        "commits=2",
        "tags=v1 ",
        "lib=from the submodule",
    ]
    assert probe_output("plain.yml") == [f"head={sha}", "commits=1", "tags=", "lib=absent"]


def test_shell_streams_ordered_output_with_stream_names_and_env_precedence(serve_repo, knot):
    spindle = serve_repo()
    steps = yaml("""
        environment:
          LEVEL: workflow
          ONLY_WORKFLOW: present
          TANGLED_REPO_NAME: spoofed
        steps:
          - name: Count
            command: for i in $(seq 1 40); do echo "out $i"; done; echo "to stderr" >&2
          - name: Env
            environment:
              LEVEL: step
            command: echo "$LEVEL $ONLY_WORKFLOW $TANGLED_REPO_NAME $CI $TANGLED_SHA"
    """)
    client, rkey = run_pipeline(spindle, knot, [("ci.yml", "shell", steps)])
    wait_until(lambda: finished(client, "ci.yml"), timeout=30)
    assert client.statuses("ci.yml")[-1] == "success"
    lines = read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/ci.yml").lines
    out = [
        ln["content"]
        for ln in lines
        if ln["kind"] == "data" and ln["stream"] == "stdout" and ln["step_id"] == 0
    ]
    assert out == [f"out {i}" for i in range(1, 41)]
    assert [ln["content"] for ln in lines if ln.get("stream") == "stderr"] == ["to stderr"]
    env_line = [ln["content"] for ln in lines if ln["kind"] == "data" and ln["step_id"] == 1]
    assert env_line == ["step present hello true " + "a" * 40]


def test_shell_failing_step_stops_the_workflow_with_its_exit_code(serve_repo, knot):
    spindle = serve_repo()
    steps = yaml("""
        steps:
          - name: Fails
            command: echo before; exit 3
          - name: Never
            command: echo should not run
    """)
    client, rkey = run_pipeline(spindle, knot, [("ci.yml", "shell", steps)])
    wait_until(lambda: finished(client, "ci.yml"), timeout=30)
    last = client.frames[-1]["event"]
    assert (last["status"], last["exitCode"]) == ("failed", 3)
    assert "Fails" in last["error"]
    contents = [
        ln["content"]
        for ln in read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/ci.yml").lines
    ]
    assert "Never" not in contents and "should not run" not in contents


def test_shell_timeout_kills_the_whole_process_group(serve_repo, knot, tmp_path):
    config = f"""
[backends.shell]
type = "shell"
workspace_root = "{tmp_path}/workspaces"
timeout = 2
kill_grace = 1
"""
    spindle = serve_repo(config)
    steps = yaml("""
        steps:
          - name: Hangs
            command: sleep 311 & sleep 312
    """)
    client, _ = run_pipeline(spindle, knot, [("ci.yml", "shell", steps)])
    wait_until(lambda: finished(client, "ci.yml"), timeout=30)
    last = client.frames[-1]["event"]
    assert last["status"] == "timeout" and "2s" in last["error"]
    assert no_process_matching("sleep 311") and no_process_matching("sleep 312")


def test_shell_cancel_ends_the_run_and_its_processes(serve_repo, knot):
    spindle = serve_repo()
    steps = yaml("""
        steps:
          - name: Long
            command: echo started; sleep 321 & sleep 322
    """)
    client, rkey = run_pipeline(spindle, knot, [("ci.yml", "shell", steps)])
    wait_until(lambda: client.statuses("ci.yml") == ["pending", "running"], timeout=30)
    wait_until(lambda: not no_process_matching("sleep 322"), timeout=10, what="step started")
    from tack.store import Workflow

    workflow = Workflow.get(Workflow.rkey == rkey)
    assert spindle.scheduler.cancel(workflow.id) == "cancelled"
    wait_until(
        lambda: no_process_matching("sleep 321") and no_process_matching("sleep 322"), timeout=15
    )
    assert client.statuses("ci.yml") == ["pending", "running", "cancelled"]
    assert spindle.scheduler.cancel(workflow.id) == "already final"


def shell_backend(tmp_path: Path):
    """A shell backend with its workspaces under ``tmp_path``, built as tack builds it."""
    return build(
        "shell",
        {"type": "shell", "workspace_root": str(tmp_path / "ws")},
        Context("spindle.test", dev=True),
    )


def test_each_reader_of_a_workflow_file_gets_its_own_copy():
    """A file is parsed once and kept (it comes back on every push): what one
    reader changes in its copy, the next reader never sees."""
    raw = "environment:\n  A: '1'\nsteps:\n  - name: s\n    command: echo\n"
    first = parse(raw)
    first.document["environment"]["A"] = "changed"
    first.environment["B"] = "added"
    first.document["steps"].clear()
    second = parse(raw)
    assert second.document == {
        "environment": {"A": "1"},
        "steps": [{"name": "s", "command": "echo"}],
    }
    assert second.environment == {"A": "1"}
    assert [step.command for step in second.steps] == ["echo"]


def test_secrets_are_masked_in_every_form(tmp_path):
    """A real shell run of a job carrying secrets, straight through the backend."""
    backend = shell_backend(tmp_path)
    secret = "hunter2-very-secret"
    raw = yaml("""
        steps:
          - name: Leak
            command: echo "plain $TOKEN"; echo -n "$TOKEN" | base64; echo "cmd" >&2
    """)
    outcome, text = run_direct(
        backend, direct_job(raw, "shell", {"TOKEN": secret}), tmp_path / "logs"
    )
    assert outcome.status == "success"
    assert secret not in text
    import base64

    assert base64.b64encode(secret.encode()).decode().rstrip("=") not in text
    assert '"plain ***"' in text and text.count("***") == 2


# --- command -----------------------------------------------------------------------------

COMMAND_SCRIPT = """
import json, os, sys
job = json.load(sys.stdin)
print("workflow", job["workflow"], "of", job["pipeline_uri"].rsplit("/", 1)[1])
print("steps", [s["name"] for s in job["definition"]["steps"]])
print("repo", os.environ["TANGLED_REPO_NAME"], "level", os.environ.get("LEVEL"))
print("to stderr", file=sys.stderr)
sys.exit(job["definition"]["document"].get("exit", 0))
"""


def command_config(tmp_path: Path, script: Path, timeout: int = 60) -> str:
    return f"""
[backends.ci]
type = "command"
command = ["{sys.executable}", "{script}"]
timeout = {timeout}
kill_grace = 1

[aliases]
nixery = "ci"
"""


def test_command_backend_gets_json_and_env_and_its_exit_code_decides(serve_repo, knot, tmp_path):
    script = tmp_path / "ci.py"
    script.write_text(COMMAND_SCRIPT)
    spindle = serve_repo(command_config(tmp_path, script))
    good = yaml("""
        environment:
          LEVEL: five
        steps:
          - name: build
            command: make
    """)
    client, rkey = run_pipeline(
        spindle, knot, [("ok.yml", "nixery", good), ("bad.yml", "ci", "exit: 4\n")]
    )
    wait_until(lambda: finished(client, "ok.yml") and finished(client, "bad.yml"), timeout=30)
    assert client.statuses("ok.yml")[-1] == "success"
    bad = [f["event"] for f in client.frames if f["event"]["workflow"] == "bad.yml"][-1]
    assert (bad["status"], bad["exitCode"]) == ("failed", 4)
    lines = read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/ok.yml").lines
    stdout = [ln["content"] for ln in lines if ln.get("stream") == "stdout"]
    assert stdout == [f"workflow ok.yml of {rkey}", "steps ['build']", "repo hello level five"]
    assert [ln["content"] for ln in lines if ln.get("stream") == "stderr"] == ["to stderr"]


def test_command_backend_timeout(serve_repo, knot, tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(
        "import time, sys\nsys.stdin.read()\nprint('working', flush=True)\ntime.sleep(331)\n"
    )
    spindle = serve_repo(command_config(tmp_path, script, timeout=2))
    client, _ = run_pipeline(spindle, knot, [("ci.yml", "ci", "")])
    wait_until(lambda: finished(client, "ci.yml"), timeout=30)
    assert client.frames[-1]["event"]["status"] == "timeout"
    assert no_process_matching(str(script))


# --- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "phrase"),
    [
        ('[backends.x]\ntype = "gitlab"\n', "backends.x.type: must be one of"),
        ('[backends.x]\ntype = "command"\n', "backends.x.command: is required"),
        ('[backends.x]\ntype = "shell"\ntimeout = "soon"\n', "backends.x.timeout: must be"),
        ('[backends.x]\ntype = "shell"\ntimout = 5\n', "backends.x.timout: is not an option"),
        ('[backends.x]\ntype = "webhook"\nurl = "ftp://x"\nsecret_env = "S"\n', "backends.x.url"),
        (
            '[backends.x]\ntype = "webhook"\nurl = "http://x"\nsecret_env = "TACK_UNSET_SECRET"\n',
            "backends.x.secret_env: names environment variable TACK_UNSET_SECRET, which is not set",
        ),
        ('[backends.x]\ntype = "dummy"\n[aliases]\nnixery = "y"\n', "aliases.nixery: no backend"),
        ("[backends.x\n", "not valid TOML"),
        ("[other]\n", "other: unknown section"),
        (
            '[backends.x]\ntype = "github-actions"\nrepository = "bad"\nworkflow = "w"\n'
            'token_env = "PATH"\n',
            "backends.x.repository: must be owner/name",
        ),
        (
            '[backends.x]\ntype = "buildkite"\norganization = "a"\npipeline = "p"\n',
            "backends.x.token_env: is required",
        ),
        (
            '[backends.x]\ntype = "buildbot"\nurl = "http://b"\nbuilder = "b"\n',
            "backends.x.scheduler: is required",
        ),
        (
            '[backends.x]\ntype = "gitlab-ci"\nproject = "p"\ntoken_env = "PATH"\n'
            "poll_interval = 0\n",
            "backends.x.poll_interval: must be a number",
        ),
    ],
)
def test_bad_backend_configuration_exits_2_naming_the_key(tmp_path, toml, phrase):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    env = tack_env(tmp_path, "ws://127.0.0.1:9/subscribe", TACK_CONFIG=str(path))
    result = subprocess.run(
        [sys.executable, "-m", "tack"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and phrase in lines[0]
        and lines[0].startswith("tack: configuration error: TACK_CONFIG")
    )


def test_no_config_file_means_shell_and_a_container_backend_for_nixery(tmp_path, monkeypatch):
    """With podman or docker on PATH, ``engine: nixery`` gets a container
    backend; without either, a nixery workflow fails with one line saying
    what to install, and the shell backend still runs."""
    from tack.backends import NO_CONTAINER_RUNTIME, load

    tools = tmp_path / "bin"
    tools.mkdir()
    podman = fake_podman(tools)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    backends = load(None, Context("spindle.test", dev=False))
    assert sorted(backends.instances) == ["nixery", "shell"]
    assert backends.resolve("nixery").type_name == "container"
    assert backends.resolve("nixery").runtime == "podman"

    podman.unlink()
    monkeypatch.setenv("PATH", str(tools))  # neither podman nor docker
    backends = load(None, Context("spindle.test", dev=False))
    nixery = backends.resolve("nixery")
    job = direct_job("steps:\n  - name: build\n    command: go build\n", "nixery")
    outcome, text = run_direct(nixery, job, tmp_path / "logs")
    assert (outcome.status, outcome.error) == ("failed", NO_CONTAINER_RUNTIME)
    assert "install podman" in NO_CONTAINER_RUNTIME
    assert "needs a container runtime: install podman" in text


def test_shell_warns_in_the_log_about_dependencies_it_cannot_install(tmp_path):
    backend = shell_backend(tmp_path)
    raw = "dependencies:\n  nixpkgs: [go]\nsteps:\n  - name: s\n    command: 'true'\n"
    outcome, text = run_direct(backend, direct_job(raw, "shell"), tmp_path / "logs")
    assert outcome.status == "success"
    assert "does not install dependencies (nixpkgs: go)" in text


def test_process_environment_does_not_leak_tack_settings(tmp_path, monkeypatch):
    from tack.backends import process

    monkeypatch.setenv("TACK_SECRETS_KEY", "do-not-leak")
    env = process.base_environment(tmp_path)
    assert "TACK_SECRETS_KEY" not in env and env["HOME"] == str(tmp_path)
    assert os.environ["PATH"] == env["PATH"]


def test_the_shipped_example_configuration_loads(monkeypatch, tmp_path):
    from tack.backends import load

    fake_podman(tmp_path)  # the example names podman; only its presence is checked
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    for name in (
        "TACK_WEBHOOK_SECRET",
        "GITHUB_TOKEN",
        "GITLAB_TOKEN",
        "BUILDKITE_TOKEN",
        "BUILDKITE_WEBHOOK_SECRET",
        "K8S_TOKEN",
        "SRHT_TOKEN",
    ):
        monkeypatch.setenv(name, "s")
    example = Path(__file__).resolve().parent.parent / "scripts" / "tack.toml"
    backends = load(str(example), Context("spindle.example.com", dev=False))
    assert set(backends.instances) == {
        "shell",
        "nixery",
        "jenkins-cli",
        "ci",
        "dummy",
        "buildbot",
        "github",
        "gitlab",
        "buildkite",
        "tekton",
        "sourcehut",
    }
    assert backends.resolve("nixery").type_name == "container"
    assert backends.resolve("local") is backends.instances["shell"]
