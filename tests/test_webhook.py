"""The webhook backend and the CI callback API, against a local receiver that
verifies the signature and calls back over HTTP the way a CI job would."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tack.store import Workflow

from .spindle_clients import EventsClient, read_log
from .standins import OWNER, REPO, TackProcess, commit, push_pipeline, repo, tack_env, wait_until

SECRET = "webhook-signing-secret"


class CIReceiver:
    """A CI's webhook endpoint: answers with the next code of ``codes`` (the last
    repeats) and, when ``act`` is set, runs it on each accepted delivery."""

    def __init__(self, codes=(202,), act=None) -> None:
        self.codes = list(codes)
        self.act = act
        self.deliveries: list[dict] = []
        self.signatures_ok: list[bool] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                receiver.signatures_ok.append(
                    hmac.compare_digest(expected, self.headers.get("X-Tack-Signature", ""))
                )
                code = receiver.codes.pop(0) if len(receiver.codes) > 1 else receiver.codes[0]
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if code < 300:
                    delivery = json.loads(body)
                    receiver.deliveries.append(delivery)
                    if receiver.act:
                        threading.Thread(target=receiver.act, args=(delivery,), daemon=True).start()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def post(url: str, body: object, token: str | None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def webhook_tack(serve_repo, monkeypatch, tmp_path):
    """Start tack with a webhook backend ``ci`` pointing at ``receiver``."""
    monkeypatch.setenv("TACK_TEST_WEBHOOK_SECRET", SECRET)
    receivers = []

    def start(receiver: CIReceiver, timeout: int = 60, attempts: int = 5, **env: str):
        receivers.append(receiver)
        port = free_port()
        config = f"""
[backends.ci]
type = "webhook"
url = "{receiver.url}"
secret_env = "TACK_TEST_WEBHOOK_SECRET"
timeout = {timeout}
attempts = {attempts}
retry_initial = 0.05
callback_url = "http://127.0.0.1:{port}"
"""
        return serve_repo(config, SPINDLE_SERVER_LISTEN_ADDR=f"127.0.0.1:{port}", **env)

    yield start
    for receiver in receivers:
        receiver.close()


def a_ci_that_succeeds(delivery: dict) -> None:
    callback = delivery["callback"]
    token = callback["token"]
    post(callback["status_url"], {"status": "running"}, token)
    lines = [
        {"step_id": 1, "step_status": "start", "name": "remote build", "command": "make"},
        {"step_id": 1, "content": f"building {delivery['env']['TANGLED_SHA']}"},
        {"step_id": 1, "content": "warning: x", "stream": "stderr"},
        {"step_id": 1, "step_status": "end", "name": "remote build"},
    ]
    post(callback["logs_url"], {"seq": 0, "lines": lines}, token)
    post(callback["status_url"], {"status": "success"}, token)


def send(spindle, knot, name="ci.yml", engine="ci"):
    client = EventsClient(spindle.server.port).start()
    rkey = knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "hello", [(name, engine, "steps: []")])
    )
    return client, rkey


def test_webhook_delivery_signed_and_the_ci_reports_back(webhook_tack, knot):
    receiver = CIReceiver(act=a_ci_that_succeeds)
    spindle = webhook_tack(receiver)
    client, rkey = send(spindle, knot)
    wait_until(lambda: client.statuses() == ["pending", "running", "success"], timeout=20)
    assert receiver.signatures_ok == [True]
    delivery = receiver.deliveries[0]
    assert delivery["workflow"] == "ci.yml" and delivery["env"]["TANGLED_REPO_NAME"] == "hello"
    assert delivery["pipeline_uri"].endswith(rkey)
    log = read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/ci.yml")
    assert log.close_code == 1000
    ci_lines = [(ln["kind"], ln["content"]) for ln in log.lines if ln["step_id"] == 1]
    assert ci_lines == [
        ("control", "remote build"),
        ("data", "building " + "a" * 40),
        ("data", "warning: x"),
        ("control", "remote build"),
    ]
    token = delivery["callback"]["token"]
    assert token not in (spindle.logbook.path(Workflow.get(Workflow.rkey == rkey).id).read_text())


def test_every_bad_callback_is_refused_without_a_state_change(webhook_tack, knot):
    receiver = CIReceiver()  # accepts, then leaves the reporting to this test
    spindle = webhook_tack(receiver)
    client, rkey = send(spindle, knot)
    wait_until(lambda: receiver.deliveries and client.statuses() == ["pending", "running"])
    callback = receiver.deliveries[0]["callback"]
    token, status_url, logs_url = callback["token"], callback["status_url"], callback["logs_url"]
    other = status_url.replace(f"/{receiver.deliveries[0]['workflow_id']}/", "/999999/")

    assert post(status_url, {"status": "success"}, None)[0] == 401
    assert post(status_url, {"status": "success"}, "wrong-token")[0] == 401
    # Another workflow id with this token: refused as a wrong token (ids are not enumerable).
    assert post(other, {"status": "success"}, token)[0] == 401
    assert post(status_url, None, token, raw=b"{not json")[0] == 400
    assert post(status_url, {"status": "pending"}, token)[0] == 400
    assert post(status_url, {"status": "success", "exitCode": "zero"}, token)[0] == 400
    assert post(status_url, {"status": "success", "extra": 1}, token)[0] == 400
    assert post(status_url, {"status": "success", "error": "x" * 20_000}, token)[0] == 413
    assert post(logs_url, {"lines": []}, token)[0] == 400
    assert post(logs_url, {"lines": [{"content": 5}]}, token)[0] == 400
    assert post(logs_url, {"lines": [{"content": "x", "stream": "stdin"}]}, token)[0] == 400
    assert post(logs_url, {"lines": [{"content": "x" * 70_000}]}, token)[0] == 400
    assert client.statuses() == ["pending", "running"], "no refused call changed anything"

    # Repeated log batches (same seq) are written once.
    assert post(logs_url, {"seq": 1, "lines": [{"content": "once"}]}, token)[0] == 200
    assert post(logs_url, {"seq": 1, "lines": [{"content": "once"}]}, token)[1]["duplicate"]
    assert post(status_url, {"status": "running"}, token) == (
        200,
        {"status": "running", "changed": False},
    )

    # Final is final; repeating it is harmless.
    assert (
        post(status_url, {"status": "failed", "exitCode": 2, "error": "tests failed"}, token)[0]
        == 200
    )
    wait_until(lambda: client.statuses() == ["pending", "running", "failed"])
    assert client.frames[-1]["event"]["exitCode"] == 2
    assert client.frames[-1]["event"]["error"] == "tests failed"
    assert post(status_url, {"status": "failed"}, token) == (
        200,
        {"status": "failed", "changed": False},
    )
    assert post(status_url, {"status": "success"}, token)[0] == 409
    assert post(logs_url, {"lines": [{"content": "late"}]}, token)[0] == 409
    contents = [
        ln["content"]
        for ln in read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/ci.yml").lines
    ]
    assert contents.count("once") == 1 and "late" not in contents
    assert client.statuses() == ["pending", "running", "failed"]


def test_delivery_retries_5xx_then_succeeds(webhook_tack, knot, caplog):
    receiver = CIReceiver(codes=(503, 500, 202), act=a_ci_that_succeeds)
    spindle = webhook_tack(receiver)
    client, _ = send(spindle, knot)
    wait_until(lambda: client.statuses() == ["pending", "running", "success"], timeout=20)
    retries = [r for r in caplog.records if r.getMessage() == "webhook delivery failed, retrying"]
    assert len(retries) == 2 and len(receiver.signatures_ok) == 3


def test_delivery_that_never_succeeds_fails_the_workflow(webhook_tack, knot):
    spindle = webhook_tack(CIReceiver(codes=(500,)), attempts=3)
    client, _ = send(spindle, knot)
    wait_until(lambda: client.statuses()[-1:] == ["failed"], timeout=20)
    assert client.frames[-1]["event"]["error"].startswith("webhook delivery failed: HTTP 500")


def test_a_4xx_is_not_retried(webhook_tack, knot):
    receiver = CIReceiver(codes=(404,))
    spindle = webhook_tack(receiver)
    client, _ = send(spindle, knot)
    wait_until(lambda: client.statuses()[-1:] == ["failed"], timeout=20)
    assert len(receiver.signatures_ok) == 1


def test_no_final_status_by_the_timeout_is_a_timeout(webhook_tack, knot):
    spindle = webhook_tack(CIReceiver(), timeout=2)
    client, _ = send(spindle, knot)
    wait_until(lambda: client.statuses()[-1:] == ["timeout"], timeout=20)


def test_restarted_tack_resumes_waiting_for_the_ci(webhook_tack, knot, make_spindle):
    receiver = CIReceiver()
    spindle = webhook_tack(receiver)
    client, rkey = send(spindle, knot)
    wait_until(lambda: receiver.deliveries and client.statuses() == ["pending", "running"])
    callback = receiver.deliveries[0]["callback"]
    logs_url, token = callback["logs_url"], callback["token"]
    assert post(logs_url, {"seq": 0, "lines": [{"content": "before"}]}, token)[0] == 200
    port = spindle.server.port
    workflow_id = receiver.deliveries[0]["workflow_id"]
    spindle.stop()
    # What a crash between writing a batch and saving its checkpoint leaves:
    # a line in the file that the saved state does not account for.
    with open(spindle.logbook.path(workflow_id), "a") as orphan:
        orphan.write(json.dumps({"kind": "data", "content": "orphan", "step_id": 0}) + "\n")

    again = make_spindle(
        real_knots=True,
        SPINDLE_SERVER_LISTEN_ADDR=f"127.0.0.1:{port}",
        TACK_CONFIG=spindle.config.config_file,
    )
    # The CI retries the batch it already sent: the seq survived the restart.
    # Until a worker has taken the workflow up again, the answer is 503.
    answer = wait_until(
        lambda: (
            (reply := post(logs_url, {"seq": 0, "lines": [{"content": "before"}]}, token))[0] != 503
            and reply
        )
    )
    assert answer == (200, {"written": 0, "duplicate": True})
    assert post(logs_url, {"seq": 1, "lines": [{"content": "after"}]}, token)[0] == 200
    assert post(callback["status_url"], {"status": "success"}, token)[0] == 200
    after = EventsClient(again.server.port).start()
    wait_until(lambda: after.statuses() == ["pending", "running", "success"], timeout=20)
    assert len(receiver.deliveries) == 1, "the CI was not asked twice"
    log = read_log(again.server.port, f"/logs/{knot.name}/{rkey}/ci.yml")
    contents = [line["content"] for line in log.lines if line["kind"] == "data"]
    assert contents[-2:] == ["before", "after"]
    assert "orphan" not in contents and contents[0].startswith("delivered to ")


def logs_reply(callback: dict) -> tuple[int, str | None]:
    """POST one log batch (seq 0); the status code and any Retry-After."""
    request = urllib.request.Request(
        callback["logs_url"],
        data=json.dumps({"seq": 0, "lines": [{"content": "hi"}]}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {callback['token']}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Retry-After")


def test_logs_for_a_workflow_not_yet_resumed_answer_503_then_land(webhook_tack, knot, make_spindle):
    receiver = CIReceiver()
    spindle = webhook_tack(receiver)
    client = EventsClient(spindle.server.port).start()
    knot.send_pipeline(
        push_pipeline(knot.name, OWNER, "hello", [(n, "ci", "steps: []") for n in ("a", "b")])
    )
    wait_until(lambda: len(receiver.deliveries) == 2 and len(client.statuses()) == 4)
    port = spindle.server.port
    spindle.stop()
    # One worker after the restart: it resumes one workflow and the other
    # waits for it, with no backend attached.
    again = make_spindle(
        real_knots=True,
        SPINDLE_SERVER_LISTEN_ADDR=f"127.0.0.1:{port}",
        TACK_CONFIG=spindle.config.config_file,
        SPINDLE_SERVER_MAX_JOB_COUNT="1",
    )
    callbacks = {d["workflow_id"]: d["callback"] for d in receiver.deliveries}
    replies: dict[int, tuple[int, str | None]] = {}

    def one_attached() -> bool:
        for workflow_id, callback in callbacks.items():
            replies[workflow_id] = logs_reply(callback)
        return any(code == 200 for code, _ in replies.values())

    wait_until(one_attached, what="the worker to take up one workflow")
    waiting = next(wid for wid, reply in replies.items() if reply[0] != 200)
    assert replies[waiting] == (503, "1")
    assert sorted(code for code, _ in replies.values()) == [200, 503]
    first, second = callbacks[next(w for w in callbacks if w != waiting)], callbacks[waiting]
    # The first ends; the worker takes up the second, and its lines land.
    assert post(first["status_url"], {"status": "success"}, first["token"])[0] == 200
    wait_until(lambda: logs_reply(second)[0] == 200, what="the second taken up")
    assert post(second["status_url"], {"status": "success"}, second["token"])[0] == 200
    after = EventsClient(again.server.port).start()
    wait_until(lambda: after.statuses("a")[-1:] == ["success"] == after.statuses("b")[-1:])


def test_a_crash_during_delivery_retries_delivers_on_restart(tmp_path, jetstream, knot, clock):
    """kill -9 while the CI answers 500: the next start delivers again, and the
    workflow ends as the CI reports (not `timeout` an hour later)."""
    receiver = CIReceiver(codes=(500,))
    port = free_port()
    config = tmp_path / "hook.toml"
    config.write_text(
        f"""
[backends.ci]
type = "webhook"
url = "{receiver.url}"
secret_env = "TACK_TEST_WEBHOOK_SECRET"
attempts = 100
retry_initial = 0.05
callback_url = "http://127.0.0.1:{port}"
"""
    )
    env = tack_env(
        tmp_path,
        jetstream.url,
        TACK_CONFIG=str(config),
        TACK_TEST_WEBHOOK_SECRET=SECRET,
        SPINDLE_SERVER_LISTEN_ADDR=f"127.0.0.1:{port}",
    )
    jetstream.add(commit(clock, OWNER, REPO, "r1", "create", repo("hello", knot.name)))
    proc = TackProcess(env, tmp_path / "tack-0.log")
    try:
        proc.wait_for_log("listening")
        wait_until(lambda: knot.open_connections == 1, timeout=20)
        knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("ci.yml", "ci", "")]))
        wait_until(lambda: len(receiver.signatures_ok) >= 3, timeout=20, what="failed deliveries")
        proc.kill()
        receiver.codes, receiver.act = [202], a_ci_that_succeeds
        proc = TackProcess(env, tmp_path / "tack-1.log")
        proc.wait_for_log("listening")
        client = EventsClient(port).start()
        wait_until(lambda: client.statuses()[-1:] == ["success"], timeout=20)
        assert client.statuses() == ["pending", "running", "success"]
        assert len(receiver.deliveries) == 1 and all(receiver.signatures_ok)
    finally:
        proc.terminate()
        receiver.close()


def test_a_ci_error_reaches_events_with_secrets_masked(webhook_tack, knot):
    secret = "hunter2-correct-horse"

    def a_ci_that_leaks(delivery: dict) -> None:
        callback = delivery["callback"]
        error = f"deploy failed: token {secret} rejected"
        post(callback["status_url"], {"status": "failed", "error": error}, callback["token"])

    receiver = CIReceiver(act=a_ci_that_leaks)
    spindle = webhook_tack(receiver)
    repo_row = spindle.directory.repo_by_name(OWNER, "hello")
    spindle.secrets.add(repo_row.at_uri, "DEPLOY_TOKEN", secret, OWNER)
    client, _ = send(spindle, knot)
    wait_until(lambda: client.statuses()[-1:] == ["failed"], timeout=20)
    error = client.frames[-1]["event"]["error"]
    assert secret not in error and error == "deploy failed: token *** rejected"
