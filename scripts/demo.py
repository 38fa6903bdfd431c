"""``make demo``: the whole path from a push to statuses and logs, on this machine.

Starts loopback stand-ins for jetstream and a knot (which also serves a real
git repository over smart HTTP), starts a real ``python -m tack`` with the
shell backend, announces a repo that names this spindle, pushes a pipeline
whose workflow clones the repo and builds a small program, and prints the
status events and log lines as Tangled would receive them. Exits 0 when the
workflow succeeds. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import websocket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.standins import (
    OWNER,
    REPO,
    Clock,
    JetstreamStandin,
    KnotStandin,
    TackProcess,
    commit,
    make_git_repo,
    push_pipeline,
    repo,
    tack_env,
    wait_until,
)

PROGRAM = """\
#!/bin/sh
# The "project": a tiny program the workflow builds and runs.
echo "hello from a Tangled pipeline, built by tack"
"""

WORKFLOW = textwrap.dedent("""\
    engine: shell
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


def follow_events(port: int, done: threading.Event, final: list[str]) -> None:
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/events?cursor=1")
    while not done.is_set():
        event = json.loads(ws.recv())["event"]
        extra = f" ({event['error']})" if "error" in event else ""
        say("status", f"{event['workflow']}: {event['status']}{extra}")
        if event["status"] in ("success", "failed", "timeout", "cancelled"):
            final.append(event["status"])
            done.set()
    ws.close()


def print_log(port: int, path: str) -> None:
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}")
    steps: dict[int, str] = {}
    for text in iter(ws.recv, ""):
        line = json.loads(text)
        if line["kind"] == "control":
            steps[line["step_id"]] = line["content"]
            marker = "▶" if line["step_status"] == "start" else "■"
            say("log", f"{marker} {line['content']}")
        else:
            say("log", f"  [{steps.get(line['step_id'], '?')}] {line['content']}")
    ws.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tack-demo-") as tmp:
        tmp_path = Path(tmp)
        knot = KnotStandin(git_root=tmp_path / "git")
        sha = make_git_repo(knot.git_root, OWNER, "hello", {"hello.sh": PROGRAM})
        jetstream = JetstreamStandin()
        say("setup", f"git repository {OWNER}/hello at {sha[:12]} on knot {knot.name}")
        jetstream.add(commit(Clock(), OWNER, REPO, "r1", "create", repo("hello", knot.name)))
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

            done, final = threading.Event(), []
            watcher = threading.Thread(target=follow_events, args=(port, done, final), daemon=True)
            watcher.start()
            time.sleep(0.2)
            record = push_pipeline(
                knot.name, OWNER, "hello", [("build.yml", "shell", WORKFLOW)], sha=sha
            )
            record["workflows"][0]["clone"]["skip"] = False
            rkey = knot.send_pipeline(record)
            say("push", f"knot: pipeline {rkey} for refs/heads/main at {sha[:12]}")
            print_log(port, f"/logs/{knot.name}/{rkey}/build.yml")
            done.wait(30)
        finally:
            tack.terminate()
            knot.close()
            jetstream.close()
        ok = final == ["success"]
        say(
            "done",
            "the workflow succeeded" if ok else f"the workflow ended {final or 'unfinished'}",
        )
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
