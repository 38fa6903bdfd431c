"""What an operator of the original Go tack brings along: Buildkite's
notification webhooks, Tekton from inside a cluster, and its settings' names.

Buildkite webhooks follow https://buildkite.com/docs/apis/webhooks/pipelines
(events such as build.finished with ``build`` and ``pipeline`` objects; the
X-Buildkite-Token header, or X-Buildkite-Signature ``timestamp=…,signature=…``
with the HMAC-SHA256 of ``<timestamp>.<body>``). The in-cluster Tekton test
serves the API over TLS as a cluster does, with the service account's token
and CA in files (https://kubernetes.io/docs/tasks/run-application/access-api-from-pod/).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request

import pytest

from tack import config
from tack.config import ConfigError

from .ci_fakes import (
    FAKES,
    SHA,
    TOKEN,
    BuildkiteFake,
    backend_config,
    push_workflow,
    self_signed_tls,
)
from .spindle_clients import EventsClient, read_log
from .standins import HOSTNAME, OWNER, TackProcess, push_pipeline, tack_env, wait_until

HOOK_TOKEN = "buildkite-webhook-token-xyz"
HOOK_SECRET = "buildkite-webhook-secret-xyz"


@pytest.fixture
def make_fake(monkeypatch):
    """CI fakes by name, closed after the test; the API token tack reads is set."""
    monkeypatch.setenv("TACK_TEST_CI_TOKEN", TOKEN)
    made = []

    def make(name: str, **options):
        made.append(FAKES[name](**options))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


# --- Buildkite notification webhooks ------------------------------------------------------


@pytest.fixture
def buildkite(make_fake):
    fake = make_fake("buildkite")
    fake.hold_runs = True
    return fake


@pytest.fixture
def hooked(serve_repo, buildkite, knot, monkeypatch):
    """A tack whose Buildkite backend polls once a minute, so only a webhook
    can make a build's end show within seconds; one held build running."""
    monkeypatch.setenv("BK_HOOK_TOKEN", HOOK_TOKEN)
    monkeypatch.setenv("BK_HOOK_SECRET", HOOK_SECRET)
    toml = backend_config(buildkite).replace("poll_interval = 0.1", "poll_interval = 60")
    toml += 'webhook_token_env = "BK_HOOK_TOKEN"\nwebhook_secret_env = "BK_HOOK_SECRET"\n'
    spindle = serve_repo(toml)
    client, _ = push_workflow(spindle, knot, "steps: []\n")
    wait_until(lambda: buildkite.runs and client.statuses() == ["pending", "running"], timeout=30)
    wait_until(lambda: buildkite.only_run().phase >= 1, what="the build's first look")
    return spindle, client


def finish(fake: BuildkiteFake) -> None:
    """The build ends on Buildkite's side; tack learns of it at its next look."""
    run = fake.only_run()
    run.held = False
    run.phase = len(run.jobs) + 1


def notification(event: str = "build.finished", number: int = 1) -> bytes:
    return json.dumps(
        {
            "event": event,
            "build": {"id": "b-1", "number": number, "state": "passed"},
            "pipeline": {"slug": "tangled", "name": "tangled"},
            "sender": {"id": "u-1", "name": "Buildkite"},
        }
    ).encode()


def signed(body: bytes, secret: str = HOOK_SECRET, at: float | None = None) -> dict:
    timestamp = str(int(time.time() if at is None else at))
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return {"X-Buildkite-Signature": f"timestamp={timestamp},signature={digest.hexdigest()}"}


def deliver(spindle, body: bytes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{spindle.server.port}/webhooks/buildkite",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def build_reads(fake: BuildkiteFake) -> int:
    return sum(1 for _, method, path in fake.requests if method == "GET" and path.endswith("/1"))


def test_a_webhook_with_the_token_ends_the_build_at_once(hooked, buildkite):
    spindle, client = hooked
    assert deliver(spindle, notification("ping"), {"X-Buildkite-Token": HOOK_TOKEN}) == (
        200,
        {"event": "ping", "ignored": True},
    )
    finish(buildkite)
    status, answer = deliver(spindle, notification(), {"X-Buildkite-Token": HOOK_TOKEN})
    assert (status, answer["watched"]) == (200, True)
    wait_until(lambda: client.statuses()[-1:] == ["success"], timeout=10, what="success")
    status, answer = deliver(
        spindle, notification(number=99), {"X-Buildkite-Token": "x" + HOOK_TOKEN}
    )
    assert status == 401, "a wrong token is refused"


def test_signatures_stale_wrong_and_replayed_change_nothing(hooked, buildkite):
    spindle, client = hooked
    finish(buildkite)
    reads = build_reads(buildkite)
    body = notification()
    refused = [
        signed(body, at=time.time() - 3600),  # stale: outside the freshness window
        signed(body, secret="not-the-secret"),  # wrong signature
        {"X-Buildkite-Signature": "timestamp=soon,signature=zz"},  # malformed
        {},  # no credentials at all
    ]
    for headers in refused:
        assert deliver(spindle, body, headers) == (401, {"error": "Unauthorized"})
    time.sleep(1.0)
    assert build_reads(buildkite) == reads, "a refused webhook made tack look"
    assert client.statuses() == ["pending", "running"]

    genuine = signed(body)
    assert deliver(spindle, body, genuine)[0] == 200
    wait_until(lambda: client.statuses()[-1:] == ["success"], timeout=10, what="success")
    after = build_reads(buildkite)
    assert deliver(spindle, body, genuine) == (401, {"error": "Unauthorized"}), "a replay"
    time.sleep(0.5)
    assert build_reads(buildkite) == after


# --- the CI's own timeout -------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["tekton", "sourcehut"])
def test_a_run_the_ci_itself_timed_out_ends_as_timeout(serve_repo, knot, make_fake, provider):
    fake = make_fake(provider)
    fake.ends_in_timeout = True
    client, _ = push_workflow(serve_repo(backend_config(fake)), knot, fake.workflow_raw)
    wait_until(lambda: client.statuses()[-1:] == ["timeout"], timeout=30)
    error = client.frames[-1]["event"]["error"]
    assert ("PipelineRunTimeout" in error) if provider == "tekton" else ("timeout" in error)


# --- sourcehut's log URLs ---------------------------------------------------------------------


def test_sourcehut_sends_its_token_to_no_log_host_but_its_own(serve_repo, knot, make_fake):
    fake = make_fake("sourcehut")
    fake.logs_elsewhere = True  # the fake refuses (401) a log request that carries the token
    spindle = serve_repo(backend_config(fake))
    client, rkey = push_workflow(spindle, knot, fake.workflow_raw)
    wait_until(lambda: client.statuses()[-1:] == ["success"], timeout=30)
    lines = read_log(spindle.server.port, f"/logs/{knot.name}/{rkey}/ci.yml").lines
    assert "1 passed" in [line["content"] for line in lines]
    assert any(path.startswith("/elsewhere/") for _, _, path in fake.requests)


def test_a_sourcehut_manifest_with_yaml_aliases_is_refused_unsubmitted(serve_repo, knot, make_fake):
    fake = make_fake("sourcehut")
    bomb = "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n"
    raw = "engine: tack\ntack:\n  sourcehut:\n    manifest: |\n" + "".join(
        f"      {line}\n" for line in bomb.splitlines()
    )
    client, _ = push_workflow(serve_repo(backend_config(fake)), knot, raw, engine="tack")
    wait_until(lambda: client.statuses()[-1:] == ["failed"], timeout=30)
    assert "aliases" in client.frames[-1]["event"]["error"]
    assert not fake.runs, "nothing was submitted"


# --- Tekton from inside a cluster ----------------------------------------------------------


def test_tekton_in_cluster_uses_the_service_account_over_tls(
    serve_repo, knot, tmp_path, monkeypatch, make_fake
):
    account = tmp_path / "serviceaccount"
    account.mkdir()
    tls, ca_file = self_signed_tls(account)
    (account / "token").write_text(TOKEN + "\n")
    fake = make_fake("tekton", tls=tls)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", fake.url.rsplit(":", 1)[1])
    toml = (
        '[backends.k8s]\ntype = "tekton"\nnamespace = "ci"\npipeline = "build"\n'
        f'service_account_dir = "{account}"\npoll_interval = 0.1\n'
    )
    client, _ = push_workflow(serve_repo(toml), knot, "steps: []\n", engine="k8s")
    wait_until(lambda: client.statuses()[-1:] == ["success"], timeout=30)
    assert fake.url.startswith("https://") and ca_file.exists()


def test_tekton_outside_a_cluster_without_api_url_is_a_clear_start_up_error(tmp_path, monkeypatch):
    from tack.backends import Context, build

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError) as error:
        build("k8s", {"type": "tekton", "namespace": "ci"}, Context(HOSTNAME, True))
    assert "api_url: is required outside a Kubernetes cluster" in str(error.value)


# --- the original tack's settings ------------------------------------------------------------


def test_the_original_names_of_settings_are_accepted():
    loaded = config.load(
        {
            "TACK_HOSTNAME": "ci.example.com",
            "TACK_OWNER_DID": OWNER,
            "TACK_LISTEN_ADDR": ":8080",
            "TACK_DB_PATH": "/var/lib/tack/tack.db",
            "TACK_JETSTREAM_URL": "ws://127.0.0.1:6008/subscribe",
            "TACK_DEV": "1",
        }
    )
    assert (loaded.hostname, loaded.owner, loaded.listen) == (
        "ci.example.com",
        OWNER,
        ("0.0.0.0", 8080),
    )
    assert loaded.db_path == "/var/lib/tack/tack.db" and loaded.dev is True
    assert loaded.jetstream_endpoint == "ws://127.0.0.1:6008/subscribe"
    same = {"SPINDLE_SERVER_HOSTNAME": "ci.example.com", "TACK_HOSTNAME": "CI.example.com"}
    assert config.load({**same, "SPINDLE_SERVER_OWNER": OWNER}).hostname == "ci.example.com"


@pytest.mark.parametrize(
    ("both", "named"),
    [
        (
            {"SPINDLE_SERVER_HOSTNAME": "a.example.com", "TACK_HOSTNAME": "b.example.com"},
            "TACK_HOSTNAME",
        ),
        ({"SPINDLE_SERVER_DB_PATH": "a.db", "TACK_DB_PATH": "b.db"}, "TACK_DB_PATH"),
        ({"SPINDLE_SERVER_DEV": "false", "TACK_DEV": "yes"}, "TACK_DEV"),
    ],
)
def test_two_names_of_one_setting_that_disagree_stop_tack(tmp_path, both, named):
    env = {"SPINDLE_SERVER_HOSTNAME": "a.example.com", "SPINDLE_SERVER_OWNER": OWNER, **both}
    with pytest.raises(ConfigError) as error:
        config.load(env)
    assert named in str(error.value) and "disagrees" in str(error.value)


def test_the_original_provider_variables_configure_backends(tmp_path, jetstream):
    env = tack_env(tmp_path, jetstream.url)
    del env["TACK_CONFIG"]
    for official, original in (
        ("SPINDLE_SERVER_HOSTNAME", "TACK_HOSTNAME"),
        ("SPINDLE_SERVER_OWNER", "TACK_OWNER_DID"),
        ("SPINDLE_SERVER_DB_PATH", "TACK_DB_PATH"),
        ("SPINDLE_SERVER_JETSTREAM_ENDPOINT", "TACK_JETSTREAM_URL"),
        ("SPINDLE_SERVER_LISTEN_ADDR", "TACK_LISTEN_ADDR"),
        ("SPINDLE_SERVER_DEV", "TACK_DEV"),
    ):
        env[original] = env.pop(official)
    env.update(
        TACK_BUILDKITE_TOKEN="bk-api-token",
        TACK_BUILDKITE_ORG="acme",
        TACK_BUILDKITE_WEBHOOK_SECRET="bk-hook-secret",
        TACK_BUILDKITE_WEBHOOK_MODE="signature",
        TACK_SOURCEHUT_TOKEN="srht-token",
        TACK_SOURCEHUT_INSTANCE="https://builds.example.org",
    )
    proc = TackProcess(env, tmp_path / "tack.log")
    try:
        started = proc.wait_for_log("tack started")
    finally:
        assert proc.terminate() == 0
    assert started["backends"]["buildkite"] == "buildkite"
    assert started["backends"]["sourcehut"] == "sourcehut"
    assert started["owner"] == OWNER and started["dev"] is True
    log_text = proc.log_path.read_text()
    for secret in ("bk-api-token", "bk-hook-secret", "srht-token"):
        assert secret not in log_text


def test_an_original_workflow_for_a_provider_not_configured_fails_saying_so(serve_repo, knot):
    spindle = serve_repo()  # shell and dummy only
    client = EventsClient(spindle.server.port).start()
    workflows = [
        ("a.yml", "tack", "engine: tack\ntack:\n  tekton:\n    pipeline: build\n"),
        ("b.yml", "tack", "engine: tack\ntack: {}\n"),
        ("c.yml", "tack", "engine: tack\ntack:\n  jenkins: {}\n"),
    ]
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", workflows, SHA))
    wait_until(lambda: len(client.frames) == 3, timeout=15, what="three statuses")
    errors = {f["event"]["workflow"]: f["event"]["error"] for f in client.frames}
    assert {f["event"]["status"] for f in client.frames} == {"failed"}
    assert "no tekton backend is configured" in errors["a.yml"]
    assert "exactly one provider" in errors["b.yml"]
    assert "'jenkins' is not a provider" in errors["c.yml"]
