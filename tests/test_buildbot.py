"""The buildbot adapter against a real Buildbot 4 master and worker.

Both come from PyPI (buildbot, buildbot-worker, buildbot-www) and run on
127.0.0.1 for the module. The builder clones the knot's repository (served
by the knot stand-in over smart HTTP) at the revision tack passes and runs a
command taken from a property the workflow file may set.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tack.store import Workflow

from .spindle_clients import EventsClient, read_log
from .standins import OWNER, make_git_repo, push_pipeline, wait_until

BIN = Path(sys.executable).parent

MASTER_CFG = textwrap.dedent("""
    from buildbot.plugins import schedulers, steps, util, worker

    c = BuildmasterConfig = {{}}
    c["workers"] = [worker.Worker("w1", "pass")]
    c["protocols"] = {{"pb": {{"port": "tcp:{pb}:interface=127.0.0.1"}}}}
    names = ["TANGLED_REPO_URL", "TANGLED_SHA", "TANGLED_REPO_NAME", "TANGLED_WORKFLOW", "COMMAND"]
    c["schedulers"] = [schedulers.ForceScheduler(
        name="tangled", builderNames=["tangled"],
        properties=[util.StringParameter(name=n, default="") for n in names])]
    f = util.BuildFactory()
    f.addStep(steps.ShellCommand(name="clone", command=util.Interpolate(
        "rm -rf src && git init -q src && cd src && "
        "git fetch -q --depth=1 %(prop:TANGLED_REPO_URL)s %(prop:TANGLED_SHA)s && "
        "git checkout -q FETCH_HEAD && git rev-parse HEAD")))
    f.addStep(steps.ShellCommand(name="build", command=util.Interpolate(
        "cd src && %(prop:COMMAND:~sh hello.sh)s")))
    c["builders"] = [util.BuilderConfig(name="tangled", workernames=["w1"], factory=f)]
    c["www"] = {{"port": "tcp:{http}:interface=127.0.0.1"}}
    c["buildbotURL"] = "http://127.0.0.1:{http}/"
    c["db"] = {{"db_url": "sqlite:///state.sqlite"}}
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def buildbot(tmp_path_factory):
    root = tmp_path_factory.mktemp("buildbot")
    pb, http = free_port(), free_port()
    master, worker = root / "master", root / "worker"
    subprocess.run([BIN / "buildbot", "create-master", "-q", str(master)], check=True)
    (master / "master.cfg").write_text(MASTER_CFG.format(pb=pb, http=http))
    subprocess.run(
        [
            BIN / "buildbot-worker",
            "create-worker",
            "-q",
            str(worker),
            f"127.0.0.1:{pb}",
            "w1",
            "pass",
        ],
        check=True,
    )
    subprocess.run(
        [BIN / "buildbot", "start", str(master)], check=True, capture_output=True, timeout=120
    )
    subprocess.run(
        [BIN / "buildbot-worker", "start", str(worker)], check=True, capture_output=True, timeout=60
    )
    url = f"http://127.0.0.1:{http}"

    def worker_connected() -> bool:
        with urllib.request.urlopen(f"{url}/api/v2/workers", timeout=5) as response:
            return any(w["connected_to"] for w in json.load(response)["workers"])

    wait_until(worker_connected, timeout=60, what="the Buildbot worker to connect")
    yield url
    subprocess.run([BIN / "buildbot-worker", "stop", str(worker)], capture_output=True, timeout=60)
    subprocess.run([BIN / "buildbot", "stop", str(master)], capture_output=True, timeout=60)


@pytest.fixture
def buildbot_tack(buildbot, serve_repo, knot):
    sha = make_git_repo(knot.git_root, OWNER, "hello", {"hello.sh": "echo hello from buildbot\n"})
    config = f"""
[backends.buildbot]
type = "buildbot"
url = "{buildbot}"
builder = "tangled"
scheduler = "tangled"
poll_interval = 0.3
"""
    return serve_repo(config), sha


def run(spindle, knot, sha, raw="steps: []\n"):
    client = EventsClient(spindle.server.port).start()
    rkey = knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "hello", [("ci.yml", "buildbot", raw)], sha=sha)
    )
    return client, rkey


def test_a_passing_build(buildbot_tack, knot):
    spindle, sha = buildbot_tack
    client, rkey = run(spindle, knot, sha)
    wait_until(lambda: client.statuses()[-1:] == ["success"], timeout=90)
    assert client.statuses() == ["pending", "running", "success"]
    lines = read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/ci.yml").lines
    assert lines[1]["content"].startswith("buildbot run: http://127.0.0.1:")
    steps = [
        ln["content"] for ln in lines if ln["kind"] == "control" and ln["step_status"] == "start"
    ]
    assert steps == ["Trigger buildbot", "worker_preparation", "clone", "build"]
    data = [ln["content"] for ln in lines if ln["kind"] == "data" and ln["step_id"] > 0]
    assert sha in data and "hello from buildbot" in data
    assert not any(line.startswith(("argv:", " HOME=")) for line in data), (
        "header lines are dropped"
    )


def test_a_failing_build(buildbot_tack, knot):
    spindle, sha = buildbot_tack
    client, _ = run(
        spindle, knot, sha, "buildbot:\n  properties:\n    COMMAND: echo broken >&2; exit 3\n"
    )
    wait_until(lambda: client.statuses()[-1:] == ["failed"], timeout=90)
    assert "failed" in client.frames[-1]["event"]["error"]


def test_cancel_stops_the_build(buildbot_tack, knot, buildbot):
    spindle, sha = buildbot_tack
    client, rkey = run(spindle, knot, sha, "buildbot:\n  properties:\n    COMMAND: sleep 300\n")
    workflow = wait_until(lambda: Workflow.get_or_none(Workflow.rkey == rkey), what="intake")

    def build_running() -> bool:
        state = json.loads(Workflow.get_by_id(workflow.id).backend_state or "{}")
        return "buildid" in state.get("run", {}) or _running_builds(buildbot) > 0

    wait_until(build_running, timeout=60, what="the build to start")
    assert spindle.scheduler.cancel(workflow.id) == "cancelled"
    wait_until(
        lambda: _running_builds(buildbot) == 0, timeout=60, what="Buildbot to stop the build"
    )
    assert client.statuses()[-1] == "cancelled"


def _running_builds(url: str) -> int:
    with urllib.request.urlopen(f"{url}/api/v2/builds?complete=false", timeout=5) as response:
        return len(json.load(response)["builds"])


def test_tack_restart_while_the_build_runs(buildbot_tack, knot, make_spindle, buildbot):
    spindle, sha = buildbot_tack
    raw = "buildbot:\n  properties:\n    COMMAND: sleep 4; echo finished after the restart\n"
    _, rkey = run(spindle, knot, sha, raw)
    wait_until(lambda: _running_builds(buildbot) > 0, timeout=60, what="the build to start")
    config_file = spindle.config.config_file
    spindle.stop()

    again = make_spindle(real_knots=True, TACK_CONFIG=config_file)
    after = EventsClient(again.server.port).start()
    wait_until(lambda: after.statuses()[-1:] == ["success"], timeout=90)
    assert after.statuses() == ["pending", "running", "success"]
    lines = read_log(again.server.port, f"/logs/{knot.name}/{rkey}/ci.yml").lines
    data = [ln["content"] for ln in lines if ln["kind"] == "data"]
    assert data.count("finished after the restart") == 1
    assert data.count(sha) == 1, "no log line was copied twice"
    assert _running_builds(buildbot) == 0
    time.sleep(0.1)
