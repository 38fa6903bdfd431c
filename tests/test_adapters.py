"""The GitHub Actions, GitLab CI, Buildkite, Tekton and sourcehut adapters
against API-shaped local servers (tests/ci_fakes.py cites the vendor
reference each one follows).

Every scenario runs against each: success, failure, cancel, timeout, resume
after a tack restart, 429 with Retry-After, 5xx then success, the retry
budget running out, malformed answers, and (for the original tack's
providers) a workflow written for the original tack, unchanged.
"""

from __future__ import annotations

import json

import pytest

from tack.store import Workflow

from .ci_fakes import (
    FAKES,
    SHA,
    TOKEN,
    FakeJob,
    Fault,
    backend_config,
    push_workflow,
    sent_values,
)
from .spindle_clients import EventsClient, read_log
from .standins import wait_until


@pytest.fixture(params=sorted(FAKES))
def ci(request):
    fake = FAKES[request.param]()
    yield fake
    fake.close()


@pytest.fixture
def ci_tack(serve_repo, ci, monkeypatch):
    monkeypatch.setenv("TACK_TEST_CI_TOKEN", TOKEN)
    return serve_repo(backend_config(ci))


def log_of(spindle, knot, rkey):
    return read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/ci.yml").lines


def test_success_with_jobs_as_steps_and_the_run_linked(ci_tack, ci, knot):
    client, rkey = push_workflow(ci_tack, knot, ci.workflow_raw)
    wait_until(lambda: client.statuses()[-1:] == ["success"], timeout=30)
    assert client.statuses() == ["pending", "running", "success"]
    values = sent_values(ci, ci.only_run())
    assert values["TANGLED_SHA"] == SHA and values["TANGLED_WORKFLOW"] == "ci.yml"
    lines = log_of(ci_tack, knot, rkey)
    assert f"{ci.name} run: " in lines[1]["content"]
    starts = [ln["content"] for ln in lines if ln.get("step_status") == "start"]
    assert starts == ["Trigger ci", "build", "test"]
    data = [
        (ln["step_id"], ln["content"]) for ln in lines if ln["kind"] == "data" and ln["step_id"]
    ]
    assert data == [(1, "compiling"), (1, "linking"), (1, "done"), (2, "1 passed"), (2, "2 passed")]
    log_file = ci_tack.logbook.path(Workflow.get(Workflow.rkey == rkey).id).read_text()
    assert TOKEN not in log_file


def test_failure_is_reported_with_the_failing_job(ci_tack, ci, knot):
    ci.job_template = [FakeJob("build", ["ok"]), FakeJob("test", ["boom"], exit_code=2)]
    client, _ = push_workflow(ci_tack, knot, ci.workflow_raw)
    wait_until(lambda: client.statuses()[-1:] == ["failed"], timeout=30)
    error = client.frames[-1]["event"]["error"]
    assert "fail" in error.lower()


def test_cancel_cancels_the_remote_run(ci_tack, ci, knot):
    ci.hold_runs = True
    client, rkey = push_workflow(ci_tack, knot, ci.workflow_raw)
    wait_until(lambda: ci.runs and client.statuses() == ["pending", "running"], timeout=30)
    workflow = Workflow.get(Workflow.rkey == rkey)
    wait_until(lambda: "run" in json.loads(Workflow.get_by_id(workflow.id).backend_state or "{}"))
    assert ci_tack.scheduler.cancel(workflow.id) == "cancelled"
    wait_until(lambda: ci.only_run().cancelled, timeout=15, what="the remote cancel")
    assert client.statuses() == ["pending", "running", "cancelled"]


def test_a_restarted_tack_resumes_the_same_run(ci_tack, ci, knot, make_spindle):
    ci.hold_runs = True
    client, rkey = push_workflow(ci_tack, knot, ci.workflow_raw)
    wait_until(lambda: ci.runs and client.statuses() == ["pending", "running"], timeout=30)
    wait_until(lambda: ci.only_run().phase >= 1, timeout=15, what="the first job to run")
    config_file = ci_tack.config.config_file
    ci_tack.stop()
    assert not ci.only_run().cancelled, "tack's own shutdown leaves the remote run alone"
    ci.only_run().held = False
    # A crash between copying lines and saving the offsets leaves lines in the
    # file that the saved state does not account for; they are copied again.
    workflow_id = Workflow.get(Workflow.rkey == rkey).id
    with open(ci_tack.logbook.path(workflow_id), "a") as orphan:
        line = {"kind": "data", "content": "compiling", "step_id": 1, "stream": "stdout"}
        orphan.write(json.dumps(line) + "\n")

    again = make_spindle(real_knots=True, TACK_CONFIG=config_file)
    after = EventsClient(again.server.port).start()
    wait_until(lambda: after.statuses()[-1:] == ["success"], timeout=30)
    assert len(ci.runs) == 1, "the run was not triggered twice"
    data = [ln["content"] for ln in log_of(again, knot, rkey) if ln["kind"] == "data"]
    for line in ("compiling", "linking", "done", "1 passed", "2 passed"):
        assert data.count(line) == 1, f"{line!r} copied {data.count(line)} times"


def test_429_with_retry_after_is_honoured(ci_tack, ci, knot):
    ci.faults = [Fault(429, retry_after="1")]
    client, _ = push_workflow(ci_tack, knot, ci.workflow_raw)
    wait_until(lambda: client.statuses()[-1:] == ["success"], timeout=30)
    first, second = ci.requests[0][0], ci.requests[1][0]
    assert second - first >= 0.9, "the retry waited as Retry-After asked"


def test_5xx_then_success(ci_tack, ci, knot):
    ci.faults = [Fault(503), Fault(502)]
    client, _ = push_workflow(ci_tack, knot, ci.workflow_raw)
    wait_until(lambda: client.statuses()[-1:] == ["success"], timeout=30)
    assert len(ci.runs) == 1


def test_retry_budget_spent_fails_with_a_clear_error(ci_tack, ci, knot):
    ci.faults = [Fault(503)] * 10
    client, _ = push_workflow(ci_tack, knot, ci.workflow_raw)
    wait_until(lambda: client.statuses()[-1:] == ["failed"], timeout=30)
    error = client.frames[-1]["event"]["error"]
    assert "HTTP 503" in error and "gave up after 4 attempts" in error


def test_malformed_answers_fail_the_workflow_not_tack(ci_tack, ci, knot):
    ci.malformed = 100
    client, _ = push_workflow(ci_tack, knot, ci.workflow_raw)
    wait_until(lambda: client.statuses()[-1:] == ["failed"], timeout=30)
    assert "malformed" in client.frames[-1]["event"]["error"]
    ci.malformed = 0  # tack carries on: the next workflow runs normally
    again, _ = push_workflow(ci_tack, knot, ci.workflow_raw)
    wait_until(lambda: again.statuses()[-1:] == ["success"], timeout=30)


def test_a_run_past_its_timeout_is_cancelled_and_reported(serve_repo, ci, knot, monkeypatch):
    monkeypatch.setenv("TACK_TEST_CI_TOKEN", TOKEN)
    ci.hold_runs = True
    spindle = serve_repo(backend_config(ci) + "timeout = 2\n")
    client, _ = push_workflow(spindle, knot, ci.workflow_raw)
    wait_until(lambda: client.statuses()[-1:] == ["timeout"], timeout=30)
    assert "did not finish within 2s" in client.frames[-1]["event"]["error"]
    wait_until(lambda: ci.only_run().cancelled, timeout=10, what="the remote run cancelled")


@pytest.fixture(params=["buildkite", "tekton", "sourcehut"])
def original_ci(request):
    """The providers the original tack had."""
    fake = FAKES[request.param]()
    yield fake
    fake.close()


def test_a_workflow_for_the_original_tack_runs_unchanged(
    serve_repo, original_ci, knot, monkeypatch
):
    ci = original_ci
    monkeypatch.setenv("TACK_TEST_CI_TOKEN", TOKEN)
    # No pipeline in the backend's block where the workflow names one.
    config = backend_config(ci).replace('pipeline = "tangled"\n', "")
    spindle = serve_repo(config.replace('pipeline = "build"\n', ""))
    client, _ = push_workflow(spindle, knot, ci.dialect_raw, engine="tack")
    wait_until(lambda: client.statuses()[-1:] == ["success"], timeout=30)
    run = ci.only_run()
    assert sent_values(ci, run)["TANGLED_SHA"] == SHA
    if ci.name == "tekton":
        spec = run.params["spec"]
        assert spec["pipelineRef"] == {"name": "build"}
        assert {"name": "target", "value": "release"} in spec["params"]
        assert spec["taskRunTemplate"] == {"serviceAccountName": "builder"}
        assert spec["workspaces"] == [{"name": "source", "emptyDir": {}}]
    if ci.name == "sourcehut":
        assert run.params["tags"] == ["tack", "ci"] and run.params["secrets"] is True
        assert run.params["note"] == "from the original tack"
        environment = sent_values(ci, run)
        assert environment["TACK_COMMIT"] == SHA and environment["TACK_WORKFLOW"] == "ci.yml"
