"""Intake on today's protocol (protocol-2026 §5): pushes announced as ref updates,
workflows read from the repo, the ``when`` rules, pull requests, repo DIDs.

Real parts: a knot stand-in speaking only the current stream (``created``
cursors, the 1013 drain close, ref updates, collaborator updates) and serving
real git repositories over smart HTTP plus ``getDefaultBranch``; a jetstream
stand-in with repo, collaborator, pull and pull.status records; a PLC and PDS
stand-in serving DID documents and patch blobs; tack with its real threads.
"""

from __future__ import annotations

import gzip
import json
import logging
import subprocess

import pytest

from tack.intake.fetch import WorkflowFetcher

from .identities import DocumentHost, Identity
from .spindle_clients import EventsClient, read_log
from .standins import (
    COLLABORATOR,
    MEMBER,
    OWNER,
    REPO,
    GitRepo,
    KnotStandin,
    TackProcess,
    commit,
    member,
    plc_did,
    push_pipeline,
    repo,
    tack_env,
    tid_now,
    wait_until,
)

REPO_DID = "did:plc:repo1"
ALICE = plc_did("alice")  # a collaborator, added by the knot
MALLORY = plc_did("mallory")  # nobody here
PULL = "sh.tangled.repo.pull"
PULL_STATUS = "sh.tangled.repo.pull.status"


def workflow(steps: str = "make", when: str = "", engine: str = "dummy") -> str:
    text = f"engine: {engine}\n"
    if when:
        text += f"when:\n{when}"
    return text + f"steps:\n  - name: Build\n    command: {steps}\n"


@pytest.fixture(autouse=True)
def info_logs(caplog):
    """Intake explains itself at info level; the tests read those lines."""
    caplog.set_level(logging.INFO)


@pytest.fixture
def current_knot(tmp_path):
    standin = KnotStandin(git_root=tmp_path / "git", current=True)
    yield standin
    standin.close()


@pytest.fixture
def plc():
    host = DocumentHost()
    yield host
    host.server.shutdown()


def serve(jetstream, knot, make_spindle, clock, plc, files, **env):
    """tack serving OWNER's repo REPO_DID, whose repository holds ``files``."""
    git = GitRepo(knot.git_root, REPO_DID, files)
    spindle = make_spindle(real_knots=True, SPINDLE_SERVER_PLC_URL=plc.url, **env)
    jetstream.add(
        commit(clock, OWNER, REPO, "r1", "create", repo("hello", knot.name, repo_did=REPO_DID))
    )
    wait_until(lambda: knot.open_connections == 1, what="tack subscribed to the knot")
    return spindle, git


@pytest.fixture
def served(jetstream, current_knot, make_spindle, clock, plc):
    files = {
        ".tangled/workflows/build.yml": workflow(),
        ".tangled/workflows/lint.yml": workflow(
            "lint", "  - event: push\n    branch: [main, 'release/*']\n"
        ),
        ".tangled/workflows/tags.yml": workflow("ship", "  - event: [push]\n    tag: v*\n"),
        ".tangled/workflows/docs.yml": workflow(
            "docs", "  - event: push\n    branch: '**'\n    paths: ['docs/**']\n"
        ),
        ".tangled/workflows/pr.yml": workflow(
            "check", "  - event: pull_request\n    branch: main\n"
        ),
        ".tangled/workflows/sub/nested.yml": workflow(),  # not directly in the folder
        "src/main.c": "int main() { return 0; }\n",
    }
    spindle, git = serve(jetstream, current_knot, make_spindle, clock, plc, files)
    return spindle, git, EventsClient(spindle.server.port).start()


def pipeline_count(client: EventsClient) -> int:
    return len(client.pipelines())


def test_a_push_runs_the_workflows_read_from_the_repo(served, current_knot):
    spindle, git, client = served
    rkey = current_knot.send_ref_update(REPO_DID, git.first, changed_files=["src/main.c"])
    wait_until(lambda: pipeline_count(client) == 1, what="the pipeline")
    frame = client.pipelines()[0]
    assert frame["rkey"] != rkey, "the pipeline id is tack's own TID"
    record = frame["event"]
    assert record["$type"] == "sh.tangled.pipeline"
    assert record["triggerMetadata"]["kind"] == "push"
    assert record["triggerMetadata"]["repo"] == {
        "knot": current_knot.name,
        "did": OWNER,
        "repo": "hello",
        "repoDid": REPO_DID,
        "defaultBranch": "main",
    }
    assert record["triggerMetadata"]["push"]["newSha"] == git.first
    assert client.workflow_names() == ["build.yml", "lint.yml"]
    for name in ("build.yml", "lint.yml"):
        wait_until(lambda n=name: client.statuses(n) == ["pending", "running", "success"])
    uri = f"at://did:web:{current_knot.name}/sh.tangled.pipeline/{frame['rkey']}"
    statuses = [f for f in client.frames if f["nsid"] == "sh.tangled.pipeline.status"]
    assert {f["event"]["pipeline"] for f in statuses} == {uri}
    log = read_log(spindle.server.port, f"/logs/{current_knot.name}/{frame['rkey']}/build.yml")
    assert [line["content"] for line in log.lines if line["kind"] == "data"] == [
        "dummy: would run: make"
    ]


def _objects(mirror_root, kind: str) -> int:
    """How many objects of ``kind`` the one mirror under ``mirror_root`` holds."""
    (mirror,) = list(mirror_root.iterdir())
    listing = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch-check=%(objecttype)"],
        cwd=mirror,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return listing.split().count(kind)


def test_a_push_fetches_its_commit_not_the_history_behind_it(tmp_path, current_knot):
    """Each push cost more than the one before while asking whether the
    mirror held a commit fetched it, with all its history (a lazy fetch has
    no depth)."""
    git = GitRepo(current_knot.git_root, REPO_DID, {".tangled/workflows/ci.yml": workflow()})
    shas = [git.commit({"n": str(index)}) for index in range(30)]
    fetcher = WorkflowFetcher(tmp_path / "mirrors", dev=True)
    for sha in (shas[-2], shas[-1], shas[-1]):
        assert fetcher.workflow_files(current_knot.name, REPO_DID, sha) == {"ci.yml": workflow()}
    assert _objects(tmp_path / "mirrors", "commit") == 2


def test_a_grown_mirror_is_renewed_and_reads_on(tmp_path, current_knot, caplog):
    git = GitRepo(current_knot.git_root, REPO_DID, {".tangled/workflows/ci.yml": workflow()})
    fetcher = WorkflowFetcher(tmp_path / "mirrors", dev=True, max_packs=4)
    for index in range(8):
        steps = f"make step{index}"
        sha = git.commit({".tangled/workflows/ci.yml": workflow(steps)})
        files = fetcher.workflow_files(current_knot.name, REPO_DID, sha)
        assert files == {"ci.yml": workflow(steps)}
        packs = list((tmp_path / "mirrors").glob("*/objects/pack/*.pack"))
        assert len(packs) <= 4, "a mirror past its packs is renewed at once"
    assert any(record.getMessage() == "mirror renewed" for record in caplog.records)


def test_when_rules_pick_workflows_by_branch_tag_and_paths(served, current_knot):
    _, git, client = served
    feature = git.commit({"docs/guide.md": "# guide\n"}, branch="feature/x")
    current_knot.send_ref_update(
        REPO_DID, feature, ref="refs/heads/feature/x", changed_files=["docs/guide.md"]
    )
    wait_until(lambda: pipeline_count(client) == 1)
    assert client.workflow_names() == ["build.yml", "docs.yml"]

    current_knot.send_ref_update(
        REPO_DID, feature, ref="refs/heads/feature/y", changed_files=["src/main.c"]
    )
    release = git.commit({"VERSION": "1\n"}, branch="release/1")
    current_knot.send_ref_update(REPO_DID, release, ref="refs/heads/release/1")
    wait_until(lambda: pipeline_count(client) == 3)
    assert client.workflow_names(1) == ["build.yml"]
    assert client.workflow_names(2) == ["build.yml", "lint.yml"]

    tagged = git.tag("v1.0")
    current_knot.send_ref_update(REPO_DID, tagged, ref="refs/tags/v1.0")
    current_knot.send_ref_update(REPO_DID, tagged, ref="refs/tags/nightly")
    wait_until(lambda: pipeline_count(client) == 5)
    assert client.workflow_names(3) == ["build.yml", "tags.yml"]
    assert client.workflow_names(4) == ["build.yml"]


def test_skip_ci_and_deleted_refs_make_no_pipeline(served, current_knot, caplog):
    _, git, client = served
    current_knot.send_ref_update(REPO_DID, git.first, push_options=["skip-ci"])
    current_knot.send_ref_update(REPO_DID, git.first, push_options=["ci-verbose", "ci-skip"])
    current_knot.send_ref_update(REPO_DID, "0" * 40, old_sha=git.first)
    marker = git.commit({"marker": "1\n"})
    current_knot.send_ref_update(REPO_DID, marker, old_sha=git.first)
    wait_until(lambda: pipeline_count(client) == 1)
    assert client.pipelines()[0]["event"]["triggerMetadata"]["push"]["newSha"] == marker
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("push asked to skip CI") == 2
    assert "ref deleted, nothing to run" in messages


def test_a_bad_workflow_file_fails_alone(jetstream, current_knot, make_spindle, clock, plc):
    files = {
        ".tangled/workflows/good.yml": workflow(),
        ".tangled/workflows/build and test.yml": workflow("make test"),
        ".tangled/workflows/broken.yml": "engine: dummy\nsteps: [\n",
        ".tangled/workflows/no-engine.yml": "steps: []\n",
        ".tangled/workflows/bad-date.yml": "engine: dummy\nwhen: 2024-13-45\n",
    }
    spindle, git = serve(jetstream, current_knot, make_spindle, clock, plc, files)
    client = EventsClient(spindle.server.port).start()
    current_knot.send_ref_update(REPO_DID, git.first)
    wait_until(lambda: pipeline_count(client) == 1)
    for name in ("good.yml", "build and test.yml"):
        wait_until(lambda n=name: client.statuses(n)[-1:] == ["success"], what=name)
    for name in ("broken.yml", "no-engine.yml", "bad-date.yml"):
        assert client.statuses(name) == ["failed"], name
    errors = {
        f["event"]["workflow"]: f["event"].get("error")
        for f in client.frames
        if f["nsid"] == "sh.tangled.pipeline.status" and f["event"]["status"] == "failed"
    }
    assert "invalid YAML" in errors["broken.yml"]
    assert "engine is required" in errors["no-engine.yml"]
    assert "invalid YAML" in errors["bad-date.yml"]
    rkey = client.pipelines()[0]["rkey"]
    path = f"/logs/{current_knot.name}/{rkey}/build%20and%20test.yml"
    assert read_log(spindle.server.port, path).close_code == 1000


def test_environment_and_clone_on_the_shell_backend(
    jetstream, current_knot, make_spindle, clock, plc
):
    env_workflow = (
        "engine: shell\n"
        "environment:\n  PY: 3.10\n  FLAG: yes\n  MODE: 0755\n  NOTHING: null\n"
        "steps:\n"
        "  - name: Show\n"
        '    command: echo "$PY $FLAG $MODE [$NOTHING] $TANGLED_PIPELINE_KIND '
        '$TANGLED_REPO_REPO_DID $TANGLED_REPO_URL $TANGLED_PIPELINE_SOURCE"\n'
        "  - name: 42\n"
        "    command: cat hello.txt\n"
    )
    files = {".tangled/workflows/env.yml": env_workflow, "hello.txt": "from the checkout\n"}
    spindle, git = serve(jetstream, current_knot, make_spindle, clock, plc, files)
    client = EventsClient(spindle.server.port).start()
    current_knot.send_ref_update(REPO_DID, git.first)
    wait_until(lambda: client.statuses("env.yml")[-1:] in (["success"], ["failed"]), timeout=30)
    rkey = client.pipelines()[0]["rkey"]
    log = read_log(spindle.server.port, f"/logs/{current_knot.name}/{rkey}/env.yml")
    data = [line["content"] for line in log.lines if line["kind"] == "data"]
    assert client.statuses("env.yml")[-1] == "success", data
    url = f"http://{current_knot.name}/{REPO_DID}"
    assert f"3.10 yes 0755 [] push {REPO_DID} {url} {REPO_DID}" in data
    assert "from the checkout" in data
    steps = [line["content"] for line in log.lines if line.get("step_status") == "start"]
    assert steps == ["Clone repository", "Show", "42"]


def test_a_replayed_ref_update_runs_once_after_a_restart(
    served, current_knot, make_spindle, jetstream
):
    spindle, git, client = served
    current_knot.send_ref_update(REPO_DID, git.first)
    wait_until(lambda: client.statuses("build.yml")[-1:] == ["success"])
    spindle.stop()
    again = make_spindle(real_knots=True)
    wait_until(lambda: len(current_knot.cursors) == 2, what="reconnect")
    # The reconnect rewinds the cursor, so the knot replays the push.
    assert current_knot.cursors[1] < current_knot._events[-1][0]
    marker = git.commit({"marker": "1\n"})
    current_knot.send_ref_update(REPO_DID, marker, old_sha=git.first)
    after = EventsClient(again.server.port).start()
    wait_until(lambda: pipeline_count(after) == 2, what="the marker's pipeline")
    shas = [p["event"]["triggerMetadata"]["push"]["newSha"] for p in after.pipelines()]
    assert shas == [git.first, marker]


def test_a_new_knot_does_not_replay_its_history(
    jetstream, current_knot, make_spindle, clock, plc, caplog
):
    git = GitRepo(current_knot.git_root, REPO_DID, {".tangled/workflows/a.yml": workflow()})
    old = current_knot.send_ref_update(REPO_DID, git.first)  # before tack knew the knot
    spindle, _ = serve_existing(jetstream, current_knot, make_spindle, clock, plc)
    assert current_knot.cursors[0] is not None, "the first connection names a cursor"
    assert current_knot.cursors[0] >= current_knot._events[0][0]
    client = EventsClient(spindle.server.port).start()
    marker = git.commit({"x": "1"})
    current_knot.send_ref_update(REPO_DID, marker, old_sha=git.first)
    wait_until(lambda: pipeline_count(client) == 1)
    assert client.pipelines()[0]["event"]["triggerMetadata"]["push"]["newSha"] == marker
    assert not [r for r in caplog.records if getattr(r, "rkey", None) == old]


def serve_existing(jetstream, knot, make_spindle, clock, plc):
    spindle = make_spindle(real_knots=True, SPINDLE_SERVER_PLC_URL=plc.url)
    jetstream.add(
        commit(clock, OWNER, REPO, "r1", "create", repo("hello", knot.name, repo_did=REPO_DID))
    )
    wait_until(lambda: knot.open_connections == 1, what="tack subscribed to the knot")
    return spindle, None


def test_the_drain_cap_close_is_followed_by_a_reconnect(
    jetstream, tmp_path, make_spindle, clock, plc, caplog
):
    knot = KnotStandin(git_root=tmp_path / "git", current=True, drain_cap=2)
    try:
        spindle, git = serve(
            jetstream, knot, make_spindle, clock, plc, {".tangled/workflows/a.yml": workflow()}
        )
        spindle.stop()
        shas = [git.commit({"n": str(i)}) for i in range(5)]
        for sha in shas:
            knot.send_ref_update(REPO_DID, sha)
        again = make_spindle(real_knots=True, SPINDLE_SERVER_PLC_URL=plc.url)
        client = EventsClient(again.server.port).start()
        wait_until(lambda: pipeline_count(client) == 5, timeout=20, what="all five pushes")
        assert knot.drain_closes >= 2
        ended = [r for r in caplog.records if r.getMessage() == "stream ended"]
        assert any("1013 drain cap reached" in r.reason for r in ended)
    finally:
        knot.close()


def test_one_push_announced_twice_makes_one_pipeline(served, current_knot, caplog):
    """An early-2026 knot sends a ref update and then its own compiled pipeline."""
    _, git, client = served
    current_knot.send_ref_update(REPO_DID, git.first)
    record = push_pipeline(current_knot.name, OWNER, "hello", [("build.yml", "dummy", "")])
    record["triggerMetadata"]["repo"]["repoDid"] = REPO_DID
    record["triggerMetadata"]["push"]["newSha"] = git.first
    current_knot.send_pipeline(record)
    marker = git.commit({"x": "1"})
    current_knot.send_ref_update(REPO_DID, marker, old_sha=git.first)
    wait_until(lambda: pipeline_count(client) == 2)
    wait_until(lambda: "knot sends ref updates: its compiled pipelines are ignored" in caplog.text)
    statuses = [f for f in client.frames if f["nsid"] == "sh.tangled.pipeline.status"]
    assert {f["event"]["pipeline"].rsplit("/", 1)[1] for f in statuses} <= {
        p["rkey"] for p in client.pipelines()
    }


def test_a_dec_2025_knot_still_runs_once_per_push(jetstream, tmp_path, make_spindle, clock):
    """An old knot: old-shape ref update (owner + name) and its compiled pipeline."""
    knot = KnotStandin(git_root=tmp_path / "git")
    try:
        git = GitRepo(knot.git_root, f"{OWNER}/hello", {".tangled/workflows/ci.yml": workflow()})
        spindle = make_spindle(real_knots=True)
        jetstream.add(commit(clock, OWNER, REPO, "r1", "create", repo("hello", knot.name)))
        wait_until(lambda: knot.open_connections == 1)
        client = EventsClient(spindle.server.port).start()
        old_shape = {
            "ref": "refs/heads/main",
            "committerDid": OWNER,
            "repoDid": OWNER,
            "repoName": "hello",
            "oldSha": "0" * 40,
            "newSha": git.first,
        }
        knot.send(tid_now(), "sh.tangled.git.refUpdate", old_shape)
        legacy = push_pipeline(knot.name, OWNER, "hello", [("ci.yml", "dummy", workflow())])
        legacy["triggerMetadata"]["push"]["newSha"] = git.first
        knot.send_pipeline(legacy)
        wait_until(lambda: client.statuses("ci.yml")[-1:] == ["success"])
        # A second pipeline-only push (no ref update for it) still runs as before.
        rkey = knot.send_pipeline(
            push_pipeline(knot.name, OWNER, "hello", [("other.yml", "dummy", workflow())])
        )
        wait_until(lambda: client.statuses("other.yml", rkey) == ["pending", "running", "success"])
        assert client.statuses("ci.yml") == ["pending", "running", "success"]
    finally:
        knot.close()


def test_a_collaborators_push_runs(served, current_knot):
    """The knot decides who may push; a push it announces runs whoever pushed."""
    _, git, client = served
    current_knot.send_ref_update(REPO_DID, git.first, committer=ALICE)
    wait_until(lambda: client.statuses("build.yml")[-1:] == ["success"])


def test_an_old_knots_manual_run_without_default_branch_clones(
    jetstream, tmp_path, make_spindle, clock
):
    """A manual pipeline with no commit and an empty defaultBranch fetches the
    remote's HEAD instead of failing with "invalid refspec"."""
    knot = KnotStandin(git_root=tmp_path / "git")
    try:
        GitRepo(knot.git_root, f"{OWNER}/hello", {"README": "hello from HEAD\n"})
        spindle = make_spindle(real_knots=True)
        jetstream.add(commit(clock, OWNER, REPO, "r1", "create", repo("hello", knot.name)))
        wait_until(lambda: knot.open_connections == 1)
        client = EventsClient(spindle.server.port).start()
        raw = "steps:\n  - name: Read\n    command: cat README\n"
        record = push_pipeline(knot.name, OWNER, "hello", [("m.yml", "shell", raw)])
        trigger = record["triggerMetadata"]
        trigger["kind"], trigger["repo"]["defaultBranch"] = "manual", ""
        trigger["manual"] = {"inputs": [{"key": "any key", "value": "v"}]}
        del trigger["push"]
        record["workflows"][0]["clone"]["skip"] = False
        rkey = knot.send_pipeline(record)
        wait_until(lambda: client.statuses("m.yml")[-1:] in (["success"], ["failed"]), timeout=30)
        log = read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/m.yml")
        data = [line["content"] for line in log.lines if line["kind"] == "data"]
        assert client.statuses("m.yml")[-1] == "success", data
        assert "hello from HEAD" in data
    finally:
        knot.close()


def test_a_record_claiming_a_members_repo_did_changes_nothing(
    served, current_knot, jetstream, clock, caplog
):
    spindle, git, client = served
    # An outsider, and then a member, write records claiming the owner's repo DID.
    stolen = repo("mine", current_knot.name, repo_did=REPO_DID)
    jetstream.add(
        commit(clock, MALLORY, REPO, "m1", "create", stolen),
        commit(clock, OWNER, MEMBER, "mem", "create", member(ALICE)),
        commit(clock, ALICE, REPO, "a1", "create", stolen),
    )
    wait_until(lambda: "repo DID already held by another author" in caplog.text)
    current_knot.send_ref_update(REPO_DID, git.first)
    wait_until(lambda: client.statuses("build.yml")[-1:] == ["success"])
    assert client.pipelines()[0]["event"]["triggerMetadata"]["repo"]["did"] == OWNER
    assert spindle.directory.repo_by_did(REPO_DID).did == OWNER


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[" * 100_000,
        json.dumps({"rkey": "x", "nsid": "sh.tangled.git.refUpdate", "event": {"ref": 1}}),
        json.dumps(
            {
                "rkey": "3abc",
                "nsid": "sh.tangled.git.refUpdate",
                "event": {"ref": "refs/heads/main", "repo": REPO_DID, "newSha": "xyz"},
            }
        ),
        json.dumps(
            {
                "rkey": "3abd",
                "nsid": "sh.tangled.repo.collaboratorUpdate",
                "event": {"op": "promote", "subject": ALICE, "repo": REPO_DID},
            }
        ),
        json.dumps({"rkey": "3abe", "nsid": "sh.tangled.git.refUpdate", "created": 4e30}),
    ],
)
def test_malformed_knot_frames_are_logged_and_skipped(served, current_knot, caplog, frame):
    _, git, client = served
    with caplog.at_level(logging.INFO):
        current_knot.send_raw(frame)
        current_knot.send_ref_update(REPO_DID, git.first)
        wait_until(lambda: client.statuses("build.yml")[-1:] == ["success"])
    assert pipeline_count(client) == 1
    skipped = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(("knot frame skipped", "knot event rejected"))
    ]
    assert len(skipped) == 1, skipped


def test_a_ref_update_for_an_unknown_repo_is_rejected(served, current_knot, caplog):
    _, git, client = served
    current_knot.send_ref_update("did:plc:unknown", git.first)
    current_knot.send_ref_update(REPO_DID, git.first)
    wait_until(lambda: pipeline_count(client) == 1)
    rejected = [r for r in caplog.records if r.getMessage() == "knot event rejected"]
    assert "no served repo record holds this repo DID" in rejected[0].reason


def test_a_repo_is_served_from_its_record_until_the_record_is_deleted(
    served, current_knot, jetstream, clock, caplog
):
    """tack keeps its answers about repos in memory: a record that arrives
    after a refused push, and one deleted after a run, count at once."""
    spindle, _, client = served
    other = "did:plc:repo2"
    git = GitRepo(current_knot.git_root, other, {".tangled/workflows/build.yml": workflow()})

    def refused() -> int:
        return sum(
            "no served repo record holds this repo DID" in getattr(r, "reason", "")
            for r in caplog.records
        )

    current_knot.send_ref_update(other, git.first)
    wait_until(lambda: refused() == 1, what="the push to an unknown repo refused")

    served_record = repo("other", current_knot.name, repo_did=other)
    record = commit(clock, OWNER, REPO, "r2", "create", served_record)
    jetstream.add(record)
    wait_until(lambda: spindle.ingester.applier.cursor == record["time_us"])
    current_knot.send_ref_update(other, git.first)
    wait_until(lambda: pipeline_count(client) == 1, what="the push to the new repo run")

    deleted = commit(clock, OWNER, REPO, "r2", "delete")
    jetstream.add(deleted)
    wait_until(lambda: spindle.ingester.applier.cursor == deleted["time_us"])
    second = git.commit({"README": "again"})
    current_knot.send_ref_update(other, second, old_sha=git.first)
    wait_until(lambda: refused() == 2, what="the push to the deleted repo refused")
    assert pipeline_count(client) == 1


# --- pull requests -------------------------------------------------------------------


def pull_record(git: GitRepo, head: str, blob_cid: str, rounds: int = 1) -> dict:
    blob = {
        "$type": "blob",
        "ref": {"$link": blob_cid},
        "mimeType": "application/gzip",
        "size": 100,
    }
    return {
        "title": "a change",
        "target": {"repo": REPO_DID, "branch": "main"},
        "source": {"branch": "feature"},
        "rounds": [{"patchBlob": blob, "createdAt": "2026-09-01T10:00:00Z"}] * rounds,
        "createdAt": "2026-09-01T10:00:00Z",
    }


def publish_patch(plc: DocumentHost, author: str, cid: str, patch: bytes) -> None:
    plc.blobs[(author, cid)] = gzip.compress(patch)


def test_pull_requests_opened_and_synchronized_run(served, current_knot, jetstream, clock, plc):
    _, git, client = served
    plc.register(Identity(OWNER))
    head = git.commit({"feature.c": "1\n"}, branch="feature")
    publish_patch(plc, OWNER, "bafyround1aaaa", git.format_patch(git.first, head))
    jetstream.add(
        commit(clock, OWNER, PULL, "p1", "create", pull_record(git, head, "bafyround1aaaa"))
    )
    wait_until(lambda: pipeline_count(client) == 1, what="the opened PR's pipeline")
    trigger = client.pipelines()[0]["event"]["triggerMetadata"]
    assert trigger["kind"] == "pull_request"
    assert trigger["pullRequest"] == {
        "action": "opened",
        "sourceBranch": "feature",
        "targetBranch": "main",
        "sourceSha": head,
        "pull": f"at://{OWNER}/{PULL}/p1",
    }
    assert client.workflow_names() == ["build.yml", "pr.yml"]
    wait_until(lambda: client.statuses("pr.yml")[-1:] == ["success"])

    second = git.commit({"feature.c": "2\n"}, branch="feature")
    publish_patch(plc, OWNER, "bafyround2bbbb", git.format_patch(git.first, second))
    jetstream.add(
        commit(clock, OWNER, PULL, "p1", "update", pull_record(git, second, "bafyround2bbbb", 2))
    )
    wait_until(lambda: pipeline_count(client) == 2, what="the synchronized PR's pipeline")
    trigger = client.pipelines()[1]["event"]["triggerMetadata"]["pullRequest"]
    assert trigger["action"] == "synchronize" and trigger["sourceSha"] == second

    # Closing runs only what asks for it: pr.yml's default types leave out
    # "closed"; build.yml has no `when`, so it runs on every event.
    status = {
        "pull": f"at://{OWNER}/{PULL}/p1",
        "status": f"{PULL_STATUS}.closed",
        "createdAt": "2026-09-01T10:00:00Z",
    }
    jetstream.add(commit(clock, OWNER, PULL_STATUS, "s1", "create", status))
    wait_until(lambda: pipeline_count(client) == 3, what="the closed PR's pipeline")
    closed = client.pipelines()[2]["event"]
    assert closed["triggerMetadata"]["pullRequest"]["action"] == "closed"
    assert [w["name"] for w in closed["workflows"]] == ["build.yml"]


def test_pull_requests_need_push_rights(served, current_knot, jetstream, clock, plc, caplog):
    spindle, git, client = served
    for did in (OWNER, ALICE, MALLORY):
        plc.register(Identity(did))
    head = git.commit({"feature.c": "1\n"}, branch="feature")
    for author, cid in ((MALLORY, "bafymallory1"), (ALICE, "bafyalice111")):
        publish_patch(plc, author, cid, git.format_patch(git.first, head))
    jetstream.add(
        commit(clock, MALLORY, PULL, "px", "create", pull_record(git, head, "bafymallory1"))
    )
    refusal = "the pull request's author has no push rights on the repo"
    wait_until(lambda: any(getattr(r, "reason", "") == refusal for r in caplog.records))
    # The knot makes Alice a collaborator; then her pull request runs.
    current_knot.send(
        tid_now(),
        "sh.tangled.repo.collaboratorUpdate",
        {"op": "add", "subject": ALICE, "repo": REPO_DID},
    )
    repo_row = spindle.directory.repo_by_did(REPO_DID)
    wait_until(lambda: spindle.directory.may_push(repo_row, ALICE), what="Alice's rights")
    jetstream.add(
        commit(clock, ALICE, PULL, "pa", "create", pull_record(git, head, "bafyalice111"))
    )
    wait_until(lambda: pipeline_count(client) == 1)
    assert client.pipelines()[0]["event"]["triggerMetadata"]["pullRequest"]["pull"].startswith(
        f"at://{ALICE}/"
    )
    assert (MALLORY, "bafymallory1") not in plc.blob_requests, "no fetch for an outsider"


@pytest.mark.parametrize(
    "record",
    [
        {"title": "t", "rounds": [], "createdAt": "2026-09-01T10:00:00Z"},  # no target
        {
            "title": "t",
            "target": {"repo": "not a did", "branch": "main"},
            "source": {"branch": "f"},
            "rounds": [{"patchBlob": {"ref": {"$link": "bafyaaaaaaaa"}}}],
            "createdAt": "2026-09-01T10:00:00Z",
        },
        {
            "title": "t",
            "target": {"repo": REPO_DID, "branch": "main"},
            "source": {"branch": "f"},
            "rounds": [{"patchBlob": "not a blob"}],
            "createdAt": "2026-09-01T10:00:00Z",
        },
    ],
)
def test_malformed_pull_records_are_skipped(served, jetstream, clock, caplog, record):
    spindle, _, client = served
    jetstream.add(commit(clock, OWNER, PULL, "bad", "create", record))
    marker = commit(clock, OWNER, REPO, "r2", "create", repo("two", "knot.example.com"))
    jetstream.add(marker)
    wait_until(lambda: spindle.directory.repo_by_name(OWNER, "two") is not None)
    bad = [r for r in caplog.records if r.getMessage() == "bad record skipped"]
    assert len(bad) == 1 and bad[0].collection == PULL
    assert client.pipelines() == []


def test_collaborator_records_name_the_repo_by_did(served, jetstream, clock):
    spindle, _, _ = served
    record = {"subject": ALICE, "repo": REPO_DID, "createdAt": "2026-01-01T00:00:00Z"}
    jetstream.add(commit(clock, MALLORY, COLLABORATOR, "c0", "create", record))
    jetstream.add(
        commit(clock, OWNER, COLLABORATOR, "c1", "create", record | {"subject": "did:plc:bob"})
    )
    repo_row = spindle.directory.repo_by_did(REPO_DID)
    wait_until(lambda: spindle.directory.may_push(repo_row, "did:plc:bob"))
    assert not spindle.directory.may_push(repo_row, ALICE), "only the owner's records count"


# --- as a real process ------------------------------------------------------------------


def test_kill_9_then_replay_runs_the_push_once(tmp_path, jetstream, current_knot, clock):
    git = GitRepo(current_knot.git_root, REPO_DID, {".tangled/workflows/a.yml": workflow()})
    jetstream.add(
        commit(
            clock, OWNER, REPO, "r1", "create", repo("hello", current_knot.name, repo_did=REPO_DID)
        )
    )
    env = tack_env(tmp_path, jetstream.url)
    proc = TackProcess(env, tmp_path / "tack-0.log")
    port = proc.wait_for_log("listening")["port"]
    wait_until(lambda: current_knot.open_connections == 1, timeout=20)
    current_knot.send_ref_update(REPO_DID, git.first)
    client = EventsClient(port).start()
    wait_until(lambda: client.statuses("a.yml")[-1:] == ["success"], timeout=20)
    proc.kill()
    proc = TackProcess(env, tmp_path / "tack-1.log")
    try:
        port = proc.wait_for_log("listening")["port"]
        wait_until(lambda: len(current_knot.cursors) == 2, timeout=20, what="reconnect")
        marker = git.commit({"x": "1"})
        current_knot.send_ref_update(REPO_DID, marker, old_sha=git.first)
        after = EventsClient(port).start()
        wait_until(lambda: pipeline_count(after) == 2, timeout=20)
        shas = [p["event"]["triggerMetadata"]["push"]["newSha"] for p in after.pipelines()]
        assert shas == [git.first, marker]
    finally:
        assert proc.terminate() == 0
