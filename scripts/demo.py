"""``make demo``: the whole path from a push to what the appview shows, on this machine.

Starts loopback stand-ins for jetstream and a current knot (serving a real
git repository over smart HTTP), starts a real ``python -m tack`` with the
shell backend, announces a repo (by its repo DID) that names this spindle,
and pushes a commit: the knot sends a ``sh.tangled.git.refUpdate``, tack
reads ``.tangled/workflows`` at that commit, compiles it and runs it. The
demo then prints what today's appview would show: the pipeline list from
``sh.tangled.ci.queryPipelines`` and the ``subscribePipelineLogs`` stream,
its CBOR frames decoded. Exits 0 when the workflow succeeds. Nothing leaves
127.0.0.1.
"""

from __future__ import annotations

import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.appview_client import AppviewClient
from tests.standins import (
    OWNER,
    REPO,
    Clock,
    GitRepo,
    JetstreamStandin,
    KnotStandin,
    TackProcess,
    commit,
    repo,
    tack_env,
    wait_until,
)

REPO_DID = "did:plc:demorepo"
PROGRAM = """\
#!/bin/sh
# The "project": a tiny program the workflow builds and runs.
echo "hello from a Tangled pipeline, built by tack"
"""

WORKFLOW = textwrap.dedent("""\
    engine: shell
    when:
      - event: push
        branch: main
    environment:
      GREETING: tack
    steps:
      - name: Build
        command: |
          mkdir -p out
          cp hello.sh out/hello && chmod +x out/hello
          echo "built out/hello for $GREETING at $TANGLED_SHA"
      - name: Test
        command: ./out/hello
""")


def say(kind: str, text: str) -> None:
    print(f"{kind:>7}  {text}", flush=True)


def show_pipelines(client: AppviewClient) -> dict:
    """The repo page's pipeline list, once every workflow is over."""

    def finished() -> dict | None:
        listed = client.pipelines(REPO_DID, kinds="push", limit=30)["pipelines"]
        if listed and all(
            w["status"] not in ("pending", "running") for w in listed[0]["workflows"]
        ):
            return listed[0]
        return None

    pipeline = wait_until(finished, timeout=60, what="the workflow to finish")
    trigger = pipeline["trigger"]
    say("ci", f"queryPipelines: pipeline {pipeline['id']} ({trigger['$type']})")
    say("ci", f"  {trigger['ref']} at {pipeline['commit'][:12]}, created {pipeline['createdAt']}")
    for workflow in pipeline["workflows"]:
        error = f" ({workflow['error']})" if "error" in workflow else ""
        say("ci", f"  {workflow['name']}: {workflow['status']}{error}")
    return pipeline


def show_logs(client: AppviewClient, rkey: str) -> None:
    """subscribePipelineLogs, each binary frame decoded (header, then body)."""
    stream = client.subscribe_logs(rkey).read_to_end()
    steps: dict[int, str] = {}
    for message in stream.messages:
        body = message.body
        if message.header["t"] == "#control":
            steps[body["step"]] = body["content"]
            marker = "▶" if body["status"] == "start" else "■"
            say("log", f"{marker} {body['content']} ({body['kind']})")
        else:
            content = body["content"].rstrip("\n")
            say("log", f"  [{steps.get(body['step'], '?')}] {content}")
    say("log", f"stream closed with {stream.close_code}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tack-demo-") as tmp:
        tmp_path = Path(tmp)
        knot = KnotStandin(git_root=tmp_path / "git", current=True)
        git = GitRepo(
            knot.git_root,
            REPO_DID,
            {"hello.sh": PROGRAM, ".tangled/workflows/build.yml": WORKFLOW},
        )
        jetstream = JetstreamStandin()
        say("setup", f"git repository {REPO_DID} at {git.first[:12]} on knot {knot.name}")
        record = repo("hello", knot.name, repo_did=REPO_DID)
        jetstream.add(commit(Clock(), OWNER, REPO, "r1", "create", record))
        say("setup", "jetstream: a sh.tangled.repo record naming this spindle")

        env = tack_env(tmp_path, jetstream.url)
        (tmp_path / "tack.toml").write_text(
            f'[backends.shell]\ntype = "shell"\nworkspace_root = "{tmp_path}/workspaces"\n'
        )
        tack = TackProcess(env, tmp_path / "tack.log")
        try:
            port = tack.wait_for_log("listening", timeout=30)["port"]
            say("setup", f"tack is listening on 127.0.0.1:{port}")
            wait_until(lambda: knot.open_connections == 1, timeout=30, what="knot subscription")
            say("setup", "tack subscribed to the knot's event stream")
            time.sleep(0.2)
            knot.send_ref_update(REPO_DID, git.first, changed_files=["hello.sh"])
            say("push", f"knot: sh.tangled.git.refUpdate refs/heads/main -> {git.first[:12]}")
            client = AppviewClient(port)
            pipeline = show_pipelines(client)
            show_logs(client, pipeline["id"])
        finally:
            tack.terminate()
            knot.close()
            jetstream.close()
        ok = [w["status"] for w in pipeline["workflows"]] == ["success"]
        say("done", "the workflow succeeded" if ok else "the workflow did not succeed")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
