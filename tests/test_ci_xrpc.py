"""``sh.tangled.ci`` as today's appview uses it, against a real ``python -m tack``.

One tack process serves the module: a current knot stand-in with real git
repositories, a jetstream stand-in with the repo and collaborator records, a
PLC directory serving the callers' DID documents, and clients written from
the lexicons (CBOR decoded with cbor2). Each test pushes its own commits.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import websocket

from .appview_client import CI, AppviewClient
from .identities import SPINDLE_DID, DocumentHost, Identity
from .spindle_clients import EventsClient, http_get, read_log
from .standins import (
    COLLABORATOR,
    OWNER,
    REPO,
    Clock,
    GitRepo,
    JetstreamStandin,
    KnotStandin,
    TackProcess,
    commit,
    db_rows,
    plc_did,
    repo,
    tack_env,
    wait_until,
)

REPO_DID = "did:plc:repoone"
OTHER_DID = "did:plc:repotwo"
ALICE = plc_did("alice")  # collaborator on REPO_DID
BOB = plc_did("bob")  # nobody here
CAROL = plc_did("carol")  # collaborator on OTHER_DID only
TRIGGER, CANCEL = f"{CI}.triggerPipeline", f"{CI}.cancelPipeline"
NEVER = "when:\n  - event: pull_request\n    branch: no-such-branch\n"
FILES = {
    ".tangled/workflows/quick.yml": (
        "engine: shell\nclone:\n  skip: true\nsteps:\n"
        "  - name: Count\n    command: for i in 1 2 3; do echo line $i; sleep 0.3; done\n"
        "  - name: Odd\n    command: printf 'a\\342\\200\\250b\\n'\n"
    ),
    ".tangled/workflows/fail.yml": (
        "engine: shell\nclone:\n  skip: true\nsteps:\n"
        "  - name: Fail\n    command: echo about to fail; exit 3\n"
    ),
    ".tangled/workflows/slow.yml": (
        f"engine: dummy\n{NEVER}dummy:\n  delay: 30\nsteps:\n  - name: Wait\n    command: wait\n"
    ),
    ".tangled/workflows/inputs.yml": (
        f"engine: shell\n{NEVER}clone:\n  skip: true\nsteps:\n"
        '  - name: Greet\n    command: echo "hello $TANGLED_INPUT_GREETING at $TANGLED_SHA"\n'
        "  - name: Inputs\n    command: env | grep ^TANGLED_INPUT_ | sort\n"
    ),
}
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


@dataclass
class World:
    tack: TackProcess
    client: AppviewClient
    port: int
    knot: KnotStandin
    git: GitRepo
    owner: Identity
    alice: Identity
    bob: Identity
    carol: Identity


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp: Path = tmp_path_factory.mktemp("ci")
    jetstream = JetstreamStandin()
    knot = KnotStandin(git_root=tmp / "git", current=True)
    plc = DocumentHost()
    git = GitRepo(knot.git_root, REPO_DID, FILES)
    GitRepo(knot.git_root, OTHER_DID, FILES)
    clock = Clock()
    uri = lambda did: did  # noqa: E731 - collaborator records name the repo by DID
    jetstream.add(
        commit(clock, OWNER, REPO, "r1", "create", repo("one", knot.name, repo_did=REPO_DID)),
        commit(clock, OWNER, REPO, "r2", "create", repo("two", knot.name, repo_did=OTHER_DID)),
        commit(clock, OWNER, COLLABORATOR, "c1", "create", _collab(ALICE, uri(REPO_DID))),
        commit(clock, OWNER, COLLABORATOR, "c2", "create", _collab(CAROL, uri(OTHER_DID))),
    )
    identities = [plc.register(Identity(did)) for did in (OWNER, ALICE, BOB, CAROL)]
    env = tack_env(tmp, jetstream.url, SPINDLE_SERVER_PLC_URL=plc.url)
    tack = TackProcess(env, tmp / "tack.log")
    try:
        port = tack.wait_for_log("listening")["port"]
        wait_until(lambda: knot.open_connections == 1, timeout=20, what="knot subscription")
        wait_until(lambda: len(db_rows(tmp / "spindle.db")["collaborator"]) == 2, timeout=20)
        yield World(tack, AppviewClient(port), port, knot, git, *identities)
    finally:
        tack.terminate()
        knot.close()
        jetstream.close()
        plc.server.shutdown()


def _collab(subject: str, repo_did: str) -> dict:
    return {"subject": subject, "repo": repo_did, "createdAt": "2026-01-01T00:00:00Z"}


def push(world: World, files: dict | None = None) -> str:
    """A new commit on main announced by the knot; its sha."""
    sha = world.git.commit(files or {"n": str(time.time_ns())})
    world.knot.send_ref_update(REPO_DID, sha, changed_files=list(files or {"n": 1}))
    return sha


def pipeline_for(world: World, sha: str, timeout: float = 20) -> dict:
    def found():
        listed = world.client.pipelines(REPO_DID, commits=[sha])["pipelines"]
        return listed[0] if listed else None

    return wait_until(found, timeout=timeout, what=f"a pipeline for {sha[:8]}")


def wait_final(world: World, rkey: str, timeout: float = 30) -> dict:
    def final():
        status, view = world.client.pipeline(rkey)
        done = all(w["status"] not in ("pending", "running") for w in view["workflows"])
        return view if status == 200 and done else None

    return wait_until(final, timeout=timeout, what=f"pipeline {rkey} to finish")


def workflows_by_name(view: dict) -> dict[str, dict]:
    return {w["name"]: w for w in view["workflows"]}


# --- queries --------------------------------------------------------------------------


def test_a_push_is_listed_and_its_workflows_move_to_their_end(world):
    sha = push(world)
    seen: dict[str, list[str]] = {}
    listed = pipeline_for(world, sha)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, view = world.client.pipeline(listed["id"])
        assert status == 200
        for workflow in view["workflows"]:
            history = seen.setdefault(workflow["name"], [])
            if not history or history[-1] != workflow["status"]:
                history.append(workflow["status"])
        if all(h[-1] in ("success", "failed") for h in seen.values()):
            break
        time.sleep(0.05)
    assert seen["quick.yml"][-1] == "success"
    assert seen["fail.yml"][-1] == "failed"
    assert "running" in seen["quick.yml"], "quick.yml was seen running"
    for history in seen.values():
        order = ["pending", "running", history[-1]]
        assert history == [s for s in order if s in history], history

    status, view = world.client.pipeline(listed["id"])
    assert view["id"] == listed["id"] and view["repo"] == REPO_DID and view["commit"] == sha
    assert view["trigger"] == {
        "$type": "sh.tangled.ci.trigger#push",
        "ref": "refs/heads/main",
        "newSha": sha,
        "oldSha": "0" * 40,
    }
    assert RFC3339.match(view["createdAt"])
    by_name = workflows_by_name(view)
    assert sorted(by_name) == ["fail.yml", "quick.yml"], "manual-only workflows did not run"
    for workflow in by_name.values():
        assert workflow["id"] == workflow["name"]
        assert RFC3339.match(workflow["startedAt"]) and RFC3339.match(workflow["finishedAt"])
    assert by_name["fail.yml"]["error"].splitlines()[0] == "step 'Fail' failed with exit code 3"
    assert "error" not in by_name["quick.yml"]
    assert world.client.pipelines(REPO_DID, commits=[sha])["pipelines"][0] == view


def test_pages_kinds_commits_and_totals(world):
    shas = [push(world) for _ in range(3)]
    rkeys = [pipeline_for(world, sha)["id"] for sha in shas]
    page = world.client.pipelines(REPO_DID, limit=2)
    assert [p["id"] for p in page["pipelines"]] == rkeys[::-1][:2], "newest first"
    total = page["total"]
    rest = world.client.pipelines(REPO_DID, limit=2, cursor=page["cursor"])
    assert rest["pipelines"][0]["id"] == rkeys[0]
    assert rest["total"] == total - 2, "total counts from the cursor on"
    assert world.client.pipelines(REPO_DID, kinds="manual")["pipelines"] == [
        p
        for p in world.client.pipelines(REPO_DID, limit=250)["pipelines"]
        if p["trigger"]["$type"].endswith("#manual")
    ]
    both = world.client.pipelines(REPO_DID, commits=[shas[0], shas[2], "f" * 40])
    assert [p["commit"] for p in both["pipelines"]] == [shas[2], shas[0]]
    assert both["total"] == 2
    empty = world.client.pipelines("did:plc:nothinghere")
    assert empty == {"pipelines": [], "total": 0}


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"repo": "not-a-did"},
        {"repo": REPO_DID, "limit": "0"},
        {"repo": REPO_DID, "limit": "251"},
        {"repo": REPO_DID, "limit": "ten"},
        {"repo": REPO_DID, "kinds": "deploy"},
        {"repo": REPO_DID, "cursor": "abc"},
        {"repo": REPO_DID, "commits": "xyz"},
    ],
)
def test_malformed_query_parameters_are_invalid_requests(world, params):
    status, body = world.client.query(f"{CI}.queryPipelines", params)
    assert status == 400 and body["error"] == "InvalidRequest", body


def test_unknown_and_malformed_pipeline_ids(world):
    assert world.client.pipeline("3zzzzzzzzzzzz") == (
        404,
        {"error": "PipelineNotFound", "message": "no pipeline 3zzzzzzzzzzzz"},
    )
    status, body = world.client.pipeline("../x")
    assert status == 400 and body["error"] == "InvalidRequest"


def test_describe_workflow_definition_fingerprints_the_files(world):
    sha = world.git.first
    status, body = world.client.query(
        f"{CI}.describeWorkflowDefinition", {"repo": REPO_DID, "sha": sha}
    )
    assert status == 200
    digest = hashlib.sha256()
    for name in sorted(FILES):
        content = FILES[name].encode()
        digest.update(name.rsplit("/", 1)[1].encode() + b"\0")
        digest.update(struct.pack("<Q", len(content)) + content)
    assert body == {
        "derived": True,
        "hash": f"sha256:{digest.hexdigest()}",
        "workflows": sorted(n.rsplit("/", 1)[1] for n in FILES),
    }
    status, body = world.client.query(
        f"{CI}.describeWorkflowDefinition", {"repo": REPO_DID, "sha": "abc"}
    )
    assert status == 400 and body["error"] == "InvalidRequest"


# --- the log subscription ---------------------------------------------------------------


def test_logs_replay_a_finished_pipeline_and_end_cleanly(world):
    rkey = pipeline_for(world, push(world))["id"]
    wait_final(world, rkey)
    stream = world.client.subscribe_logs(rkey).read_to_end()
    assert stream.close_code == 1000 and stream.text_frames == 0
    assert {m.header["op"] for m in stream.messages} == {1}
    data = stream.bodies("#data")
    quick = [b["content"] for b in data if b["workflow"] == "quick.yml"]
    assert quick == ["line 1\n", "line 2\n", "line 3\n", "a\u2028b\n"], "U+2028 stays in its line"
    controls = [b for b in stream.bodies("#control") if b["workflow"] == "quick.yml"]
    assert [(c["content"], c["status"], c["kind"]) for c in controls] == [
        ("Count", "start", "user"),
        ("Count", "end", "user"),
        ("Odd", "start", "user"),
        ("Odd", "end", "user"),
    ]
    assert controls[0]["command"].startswith("for i in 1 2 3")
    assert all(b["stream"] in ("stdout", "stderr") and b["step"] >= 0 for b in data)
    assert {b["workflow"] for b in data} == {"quick.yml", "fail.yml"}

    only = world.client.subscribe_logs(rkey, ["fail.yml"]).read_to_end()
    assert {b["workflow"] for b in only.bodies()} == {"fail.yml"}
    assert only.close_code == 1000


def test_logs_follow_running_workflows_to_their_end(world):
    sha = push(world)
    rkey = pipeline_for(world, sha)["id"]
    stream = world.client.subscribe_logs(rkey)  # while quick.yml still runs
    first = stream.read_one()
    stream.read_to_end()
    assert stream.close_code == 1000
    assert first.header["t"] in ("#control", "#data")
    lines = [b["content"] for b in stream.bodies("#data") if b["workflow"] == "quick.yml"]
    assert lines[:3] == ["line 1\n", "line 2\n", "line 3\n"]
    view = wait_final(world, rkey, timeout=5)
    assert workflows_by_name(view)["quick.yml"]["status"] == "success"


def test_unknown_pipelines_and_workflows_are_answered_before_the_upgrade(world):
    for params, name in (
        ("pipeline=3zzzzzzzzzzzz", "PipelineNotFound"),
        ("pipeline=", "InvalidRequest"),
    ):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(
                f"ws://127.0.0.1:{world.port}/xrpc/{CI}.subscribePipelineLogs?{params}", timeout=10
            )
        assert name.encode() in refused.value.resp_body
    rkey = pipeline_for(world, push(world))["id"]
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        world.client.subscribe_logs(rkey, ["nope.yml"])
    assert refused.value.status_code == 404 and b"WorkflowNotFound" in refused.value.resp_body


# --- procedures -------------------------------------------------------------------------


def trigger(world: World, who: Identity, body: dict, lxm: str = TRIGGER, **token) -> tuple:
    return world.client.procedure(TRIGGER, body, who.token(lxm, **token))


def test_retry_of_one_workflow_and_of_all(world):
    rkey = pipeline_for(world, push(world))["id"]
    original = wait_final(world, rkey)
    push_trigger = original["trigger"]
    # The appview rebuilds a manual trigger at the same commit for a push.
    body = {
        "repo": REPO_DID,
        "trigger": {"$type": "sh.tangled.ci.trigger#manual", "sha": push_trigger["newSha"]},
        "workflows": ["fail.yml"],
    }
    status, answer = trigger(world, world.alice, body)  # a collaborator may
    assert status == 200, answer
    uri = answer["pipeline"]
    assert uri.startswith(f"at://did:web:{world.knot.name}/sh.tangled.pipeline/")
    retried = wait_final(world, uri.rsplit("/", 1)[1])
    assert [w["name"] for w in retried["workflows"]] == ["fail.yml"]
    assert retried["trigger"]["$type"] == "sh.tangled.ci.trigger#manual"

    body.pop("workflows")
    status, answer = trigger(world, world.owner, body)
    again = world.client.pipeline(answer["pipeline"].rsplit("/", 1)[1])[1]
    # A manual run skips the `when` rules: every workflow file runs.
    assert sorted(w["name"] for w in again["workflows"]) == sorted(
        n.rsplit("/", 1)[1] for n in FILES
    )
    status, answer = trigger(world, world.owner, {**body, "workflows": ["nope.yml"]})
    assert status == 400 and "no workflows to run" in answer["message"]
    # slow.yml would hold a worker for half a minute: end it.
    cancel = {"repo": REPO_DID, "pipeline": again["id"]}
    assert world.client.procedure(CANCEL, cancel, world.owner.token(CANCEL))[0] == 200


def test_a_manual_run_with_inputs(world):
    sha = push(world)
    body = {
        "repo": REPO_DID,
        "trigger": {
            "$type": "sh.tangled.ci.trigger#manual",
            "sha": sha,
            "ref": "refs/heads/main",
            "inputs": [
                {"key": "greeting", "value": "hi there"},
                {"key": "deploy target", "value": "staging"},
            ],
        },
        "workflows": ["inputs.yml"],
    }
    status, answer = trigger(world, world.owner, body)
    assert status == 200, answer
    rkey = answer["pipeline"].rsplit("/", 1)[1]
    view = wait_final(world, rkey)
    assert view["trigger"]["inputs"][0] == {"key": "greeting", "value": "hi there"}
    stream = world.client.subscribe_logs(rkey).read_to_end()
    output = [b["content"] for b in stream.bodies("#data")]
    assert f"hello hi there at {sha}\n" in output
    # Any key names an input; its variable is the key upper-cased.
    assert "TANGLED_INPUT_DEPLOY TARGET=staging\n" in output


def test_a_pull_request_trigger_goes_through_the_when_rules(world):
    sha = world.git.commit({"pr": "1"}, branch="topic")
    body = {
        "repo": REPO_DID,
        "trigger": {
            "$type": "sh.tangled.ci.trigger#pullRequest",
            "sourceSha": sha,
            "sourceBranch": "topic",
            "targetBranch": "main",
        },
    }
    status, answer = trigger(world, world.owner, body)
    assert status == 200, answer
    view = world.client.pipeline(answer["pipeline"].rsplit("/", 1)[1])[1]
    # quick.yml and fail.yml have no `when` (always); the others ask for another branch.
    assert sorted(w["name"] for w in view["workflows"]) == ["fail.yml", "quick.yml"]
    assert view["trigger"]["targetBranch"] == "main" and view["commit"] == sha


def test_cancel_one_workflow_leaves_the_others(world):
    sha = push(world)
    body = {
        "repo": REPO_DID,
        "trigger": {"$type": "sh.tangled.ci.trigger#manual", "sha": sha},
        "workflows": ["slow.yml", "quick.yml"],
    }
    rkey = trigger(world, world.owner, body)[1]["pipeline"].rsplit("/", 1)[1]
    wait_until(
        lambda: (
            workflows_by_name(world.client.pipeline(rkey)[1])["slow.yml"]["status"] == "running"
        ),
        timeout=20,
    )
    cancel = {"repo": REPO_DID, "pipeline": rkey, "workflows": ["slow.yml"]}
    status, answer = world.client.procedure(CANCEL, cancel, world.alice.token(CANCEL))
    assert (status, answer) == (200, {})
    view = wait_final(world, rkey, timeout=10)
    assert workflows_by_name(view)["slow.yml"]["status"] == "cancelled"
    assert workflows_by_name(view)["quick.yml"]["status"] == "success"
    # Cancelling what is over changes nothing.
    cancel.pop("workflows")
    assert world.client.procedure(CANCEL, cancel, world.owner.token(CANCEL))[0] == 200
    assert world.client.pipeline(rkey)[1] == view


def test_every_auth_failure(world):
    sha = world.git.first
    body = {
        "repo": REPO_DID,
        "trigger": {"$type": "sh.tangled.ci.trigger#manual", "sha": sha},
        "workflows": ["fail.yml"],
    }
    cases = [
        (None, 401, "AuthenticationRequired"),
        (world.owner.token(TRIGGER, aud="did:web:elsewhere.example"), 401, None),
        (world.owner.token(CANCEL), 401, None),  # a token for another method
        (world.owner.token(None), 401, None),  # a token for any method
        (world.owner.token(TRIGGER, exp_in=-60), 401, None),
        (world.bob.token(TRIGGER), 403, "AccessControl"),
        (world.carol.token(TRIGGER), 403, "AccessControl"),  # rights on another repo
    ]
    for token, code, name in cases:
        status, answer = world.client.procedure(TRIGGER, body, token)
        assert status == code, (token, answer)
        assert name is None or answer["error"] == name
    status, answer = world.client.procedure(
        TRIGGER, {**body, "repo": "did:plc:unknownrepo"}, world.owner.token(TRIGGER)
    )
    assert status == 400 and answer["error"] == "RepoNotFound"
    # Tokens minted for the spindle's service (a PDS proxy), and a few
    # seconds of clock difference, are accepted.
    proxied = world.owner.token(TRIGGER, aud=f"{SPINDLE_DID}#tangled_spindle")
    assert world.client.procedure(TRIGGER, body, proxied)[0] == 200
    assert world.client.procedure(TRIGGER, body, world.owner.token(TRIGGER, exp_in=-2))[0] == 200


@pytest.mark.parametrize(
    "trigger_body",
    [
        {"$type": "sh.tangled.ci.trigger#push", "ref": "refs/heads/main"},
        {"$type": "sh.tangled.ci.trigger#manual", "sha": "abc"},
        {"$type": "sh.tangled.ci.trigger#manual", "sha": "a" * 40, "inputs": [{"key": "a=b"}]},
        {"$type": "sh.tangled.ci.trigger#pullRequest", "sourceSha": "a" * 40},
        {"$type": "sh.tangled.ci.trigger#manual", "sha": "a" * 40, "sourceRepo": OTHER_DID},
        "manual",
    ],
)
def test_malformed_triggers_are_invalid_requests(world, trigger_body):
    body = {"repo": REPO_DID, "trigger": trigger_body}
    status, answer = trigger(world, world.owner, body)
    assert status == 400 and answer["error"] == "InvalidRequest", answer


# --- identity and older surfaces ------------------------------------------------------------


def test_did_document_names_the_spindle_service(world):
    status, text = http_get(world.port, "/.well-known/did.json")
    assert status == 200
    body = json.loads(text)
    assert body["id"] == SPINDLE_DID
    assert body["service"] == [
        {
            "id": "#tangled_spindle",
            "type": "TangledSpindle",
            "serviceEndpoint": f"https://{SPINDLE_DID.removeprefix('did:web:')}",
        }
    ]


def test_older_appviews_still_get_events_and_logs(world):
    events = EventsClient(world.port).start()
    rkey = pipeline_for(world, push(world))["id"]
    wait_final(world, rkey)
    wait_until(lambda: events.statuses("quick.yml", rkey)[-1:] == ["success"])
    assert [p["rkey"] for p in events.pipelines()][-1] == rkey
    log = read_log(world.port, f"/logs/{world.knot.name}/{rkey}/quick.yml")
    assert log.close_code == 1000
    data = [line["content"] for line in log.lines if line["kind"] == "data"]
    assert data == ["line 1", "line 2", "line 3", "a\u2028b"]
