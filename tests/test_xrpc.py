"""XRPC with atproto service auth: real signed JWTs, a local PLC directory and a
local did:web host, and tack deciding who may do what."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from .identities import SPINDLE_DID, DocumentHost, Identity
from .spindle_clients import EventsClient, read_log
from .standins import COLLABORATOR, OWNER, collaborator, commit, plc_did, push_pipeline, wait_until

ALICE = plc_did("alice")  # a collaborator the owner added
BOB = plc_did("bob")  # not related to the repo
CAROL = plc_did("carol")  # "granted" by Bob, who does not own the repo


@pytest.fixture
def plc():
    host = DocumentHost()
    yield host
    host.server.shutdown()


@pytest.fixture
def xrpc_tack(serve_repo, plc, jetstream, clock):
    """tack resolving did:plc through the local PLC host, serving OWNER's repo
    ``hello`` with Alice as collaborator (and Carol "granted" by Bob)."""
    spindle = serve_repo(SPINDLE_SERVER_PLC_URL=plc.url)
    uri = spindle.directory.repo_by_name(OWNER, "hello").at_uri
    jetstream.add(
        commit(clock, OWNER, COLLABORATOR, "c1", "create", collaborator(ALICE, uri)),
        commit(clock, BOB, COLLABORATOR, "c2", "create", collaborator(CAROL, uri)),
    )
    wait_until(
        lambda: spindle.directory.is_collaborator(
            spindle.directory.repo_by_name(OWNER, "hello"), ALICE
        )
    )
    return spindle, uri


def call(
    port: int,
    method: str,
    token: str | None,
    body: object = None,
    query: str = "",
    raw: bytes | None = None,
) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{port}/xrpc/{method}{query}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(
        url,
        data=data,
        method="GET" if data is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


ADD = "sh.tangled.repo.addSecret"
REMOVE = "sh.tangled.repo.removeSecret"
LIST = "sh.tangled.repo.listSecrets"
CANCEL = "sh.tangled.pipeline.cancelPipeline"


def test_owner_adds_lists_uses_and_removes_a_secret(xrpc_tack, plc, knot):
    spindle, uri = xrpc_tack
    owner = plc.register(Identity(OWNER))
    port = spindle.server.port
    client = EventsClient(port).start()
    raw = (
        'steps:\n  - name: use\n    command: echo "token=$DEPLOY_TOKEN"; test -n "$DEPLOY_TOKEN"\n'
    )

    def run_workflow() -> tuple[str, str]:
        """A workflow of this repo that needs the secret: (its status, its rkey)."""
        runs = len(client.statuses())
        record = push_pipeline(knot.name, OWNER, "hello", [("ci.yml", "shell", raw)])
        rkey = knot.send_pipeline(record)
        wait_until(lambda: client.statuses()[runs:][-1:] in (["success"], ["failed"]), timeout=30)
        return client.statuses()[-1], rkey

    # Before the secret exists (tack keeps each repo's sealed secrets in
    # memory between its writes: each write must count at once).
    assert run_workflow()[0] == "failed"
    assert call(
        port,
        ADD,
        owner.token(ADD),
        {"repo": uri, "key": "DEPLOY_TOKEN", "value": "s3cr3t-value-42"},
    ) == (200, {})
    status, listing = call(port, LIST, owner.token(LIST), query=f"?repo={uri}")
    assert status == 200
    assert [(s["key"], s["repo"], s["createdBy"]) for s in listing["secrets"]] == [
        ("DEPLOY_TOKEN", uri, OWNER)
    ]
    assert "s3cr3t-value-42" not in json.dumps(listing)
    status, body = call(
        port, ADD, owner.token(ADD), {"repo": uri, "key": "DEPLOY_TOKEN", "value": "x"}
    )
    assert (status, body["error"]) == (400, "DuplicateSecret")

    # The secret reaches this repo's workflow environment and is masked in its log.
    status, rkey = run_workflow()
    assert status == "success"
    lines = read_log(port, f"/logs/{knot.name}/{rkey}/ci.yml").lines
    assert [ln["content"] for ln in lines if ln["kind"] == "data"] == ["token=***"]

    # At rest the value is sealed: the database file never holds it in plain.
    db_bytes = Path(spindle.config.db_path).read_bytes() + _wal(spindle.config.db_path)
    assert b"s3cr3t-value-42" not in db_bytes
    key_file = spindle.config.key_file
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600

    assert call(port, REMOVE, owner.token(REMOVE), {"repo": uri, "key": "DEPLOY_TOKEN"}) == (
        200,
        {},
    )
    assert call(port, LIST, owner.token(LIST), query=f"?repo={uri}") == (200, {"secrets": []})
    assert run_workflow()[0] == "failed"  # removed: no longer injected
    status, body = call(port, REMOVE, owner.token(REMOVE), {"repo": uri, "key": "DEPLOY_TOKEN"})
    assert (status, body["error"]) == (404, "SecretNotFound")


def _wal(db_path: str) -> bytes:
    wal = Path(db_path + "-wal")
    return wal.read_bytes() if wal.exists() else b""


def test_collaborator_with_a_did_web_p256_key_may_manage_secrets(serve_repo, plc, jetstream, clock):
    web = DocumentHost()
    try:
        identity = Identity(f"did:web:127.0.0.1%3A{web.port}", alg="ES256")
        web.web_document = identity.document()
        spindle = serve_repo(SPINDLE_SERVER_PLC_URL=plc.url)
        uri = spindle.directory.repo_by_name(OWNER, "hello").at_uri
        jetstream.add(
            commit(clock, OWNER, COLLABORATOR, "c9", "create", collaborator(identity.did, uri))
        )
        repo = spindle.directory.repo_by_name(OWNER, "hello")
        wait_until(lambda: spindle.directory.is_collaborator(repo, identity.did))
        port = spindle.server.port
        assert call(port, ADD, identity.token(ADD), {"repo": uri, "key": "K", "value": "v"}) == (
            200,
            {},
        )
        status, listing = call(port, LIST, identity.token(LIST), query=f"?repo={uri}")
        assert status == 200 and listing["secrets"][0]["createdBy"] == identity.did
    finally:
        web.server.shutdown()


def test_collaborator_may_cancel_a_running_workflow(xrpc_tack, plc, knot):
    spindle, uri = xrpc_tack
    alice = plc.register(Identity(ALICE))
    port = spindle.server.port
    client = EventsClient(port).start()
    raw = "steps:\n  - name: long\n    command: sleep 341\n"
    rkey = knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("ci.yml", "shell", raw)]))
    wait_until(lambda: client.statuses() == ["pending", "running"], timeout=30)
    pipeline_uri = f"at://did:web:{knot.name}/sh.tangled.pipeline/{rkey}"
    body = {"repo": uri, "pipeline": pipeline_uri, "workflow": "ci.yml"}
    assert call(port, CANCEL, alice.token(CANCEL), body) == (200, {})
    wait_until(lambda: client.statuses() == ["pending", "running", "cancelled"], timeout=15)
    status, again = call(port, CANCEL, alice.token(CANCEL), body)
    assert (status, again["error"]) == (409, "AlreadyFinished") and "cancelled" in again["message"]
    status, missing = call(port, CANCEL, alice.token(CANCEL), {**body, "workflow": "nope.yml"})
    assert (status, missing["error"]) == (404, "WorkflowNotFound")


def test_every_unauthenticated_or_unauthorized_call_is_refused(xrpc_tack, plc):
    spindle, uri = xrpc_tack
    port = spindle.server.port
    owner = plc.register(Identity(OWNER))
    bob = plc.register(Identity(BOB))
    carol = plc.register(Identity(CAROL))
    stranger = Identity(plc_did("unregistered"))  # PLC answers 404 for it
    add = {"repo": uri, "key": "K", "value": "v"}

    def refused(token, body=add, method=ADD) -> tuple[int, str]:
        status, answer = call(port, method, token, body)
        return status, answer.get("error", "")

    assert refused(None) == (401, "AuthenticationRequired")
    assert refused("not.a.jwt") == (401, "AuthenticationRequired")
    assert refused("garbage") == (401, "AuthenticationRequired")
    other_key = ec.generate_private_key(ec.SECP256K1())
    assert refused(owner.token(ADD, key=other_key)) == (401, "AuthenticationRequired")
    assert refused(owner.token(ADD, exp_in=-30)) == (401, "AuthenticationRequired")
    assert refused(owner.token(ADD, aud="did:web:other.spindle")) == (401, "AuthenticationRequired")
    assert refused(owner.token(REMOVE)) == (401, "AuthenticationRequired")  # lxm for another method
    assert refused(stranger.token(ADD)) == (401, "AuthenticationRequired")
    assert refused(bob.token(ADD)) == (403, "Forbidden")
    assert refused(carol.token(ADD)) == (
        403,
        "Forbidden",
    )  # granted by someone who is not the owner
    assert refused(owner.token(ADD), {**add, "key": "1BAD"}) == (400, "InvalidRequest")
    assert refused(owner.token(ADD), {**add, "key": "BAD-KEY"}) == (400, "InvalidRequest")
    assert refused(owner.token(ADD), {**add, "key": "K" * 51}) == (400, "InvalidRequest")
    assert refused(owner.token(ADD), {**add, "value": "v" * 201}) == (400, "InvalidRequest")
    assert refused(owner.token(ADD), {**add, "value": 5}) == (400, "InvalidRequest")
    assert refused(owner.token(ADD), {**add, "repo": f"at://{OWNER}/sh.tangled.repo/none"}) == (
        404,
        "RepoNotFound",
    )
    assert refused(owner.token(ADD), {**add, "repo": "https://example.com"}) == (
        400,
        "InvalidRequest",
    )
    assert call(port, ADD, owner.token(ADD), raw=b"{not json")[0] == 400
    assert call(port, ADD, owner.token(ADD), raw=b"[1, 2]")[0] == 400
    assert call(port, ADD, owner.token(ADD), raw=b'{"repo": "' + b"x" * 10_000 + b'"}')[0] == 413
    # A token without lxm is accepted (lxm is checked only when present).
    assert refused(owner.token(None), {**add, "key": "NO_LXM"}) == (200, "")
    listing = call(port, LIST, owner.token(LIST), query=f"?repo={uri}")[1]["secrets"]
    assert [s["key"] for s in listing] == ["NO_LXM"], "no refused call stored anything"


def test_a_resolver_that_hangs_answers_401_within_its_timeout(serve_repo, jetstream):
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen()  # accepts connections, never answers
    try:
        spindle = serve_repo(SPINDLE_SERVER_PLC_URL=f"http://127.0.0.1:{hole.getsockname()[1]}")
        uri = spindle.directory.repo_by_name(OWNER, "hello").at_uri
        started = time.monotonic()
        status, body = call(
            spindle.server.port, LIST, Identity(OWNER).token(LIST), query=f"?repo={uri}"
        )
        assert (status, body["error"]) == (401, "AuthenticationRequired")
        assert "could not resolve" in body["message"]
        assert time.monotonic() - started < 15
        # Meanwhile the server still answers others.
        assert call(spindle.server.port, "sh.tangled.owner", None)[0] == 200
    finally:
        hole.close()


def test_did_documents_are_cached_and_refreshed_once_on_key_rotation(xrpc_tack, plc):
    spindle, uri = xrpc_tack
    port = spindle.server.port
    owner = plc.register(Identity(OWNER))
    assert call(port, LIST, owner.token(LIST), query=f"?repo={uri}")[0] == 200
    before = plc.requests
    assert call(port, LIST, owner.token(LIST), query=f"?repo={uri}")[0] == 200
    assert plc.requests == before, "the second call used the cached document"
    rotated = plc.register(Identity(OWNER))  # new key published for the same DID
    assert call(port, LIST, rotated.token(LIST), query=f"?repo={uri}")[0] == 200
    assert plc.requests == before + 1


def test_secrets_survive_a_key_rotation(tmp_path):
    from cryptography.fernet import Fernet

    from tack import store
    from tack.secrets import SecretStore, load_keys

    db = store.open_database(str(tmp_path / "s.db"))
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    SecretStore(db, load_keys(old, "unused")).add("at://r", "K", "value-1", OWNER)
    rotated = SecretStore(db, load_keys(f"{new},{old}", "unused"))
    assert rotated.rotate() == 1
    assert SecretStore(db, load_keys(new, "unused")).values("at://r") == {"K": "value-1"}
    sealed = sqlite3.connect(tmp_path / "s.db").execute("SELECT value FROM secret").fetchone()[0]
    assert b"value-1" not in sealed
    db.close()


def test_did_web_fetch_refuses_private_addresses_redirects_and_oversized_documents(plc):
    from tack.auth import MAX_DID_DOCUMENT, fetch_did_document
    from tack.net import HostRefused

    # The name check runs before this (see the did:web cases above); this is
    # the address check behind it: localhost resolves to loopback, refused
    # outside dev mode before any connection is made.
    with pytest.raises(HostRefused, match="non-public"):
        fetch_did_document("https://localhost:1/.well-known/did.json", dev=False, timeout=2)
    url = f"{plc.url}/.well-known/did.json"
    identity = Identity(f"did:web:127.0.0.1%3A{plc.port}")
    plc.web_document = identity.document()
    assert fetch_did_document(url, dev=True, timeout=2)["id"] == identity.did
    plc.web_redirect = "http://10.0.0.1/.well-known/did.json"
    with pytest.raises(ValueError, match="HTTP 302"):
        fetch_did_document(url, dev=True, timeout=2)
    plc.web_redirect = None
    plc.web_document = {"id": identity.did, "padding": "x" * MAX_DID_DOCUMENT}
    with pytest.raises(ValueError, match="larger than"):
        fetch_did_document(url, dev=True, timeout=2)


def test_the_did_cache_is_bounded(plc):
    from tack.auth import ServiceAuth

    auth = ServiceAuth(SPINDLE_DID, plc.url, dev=True, cache_entries=2)
    people = [plc.register(Identity(plc_did("person" + "abc"[i]))) for i in range(3)]
    for person in people:
        assert auth.caller(f"Bearer {person.token(LIST)}", LIST) == person.did
    assert auth.cached_identities == 2
    before = plc.requests
    assert auth.caller(f"Bearer {people[2].token(LIST)}", LIST) == people[2].did
    assert plc.requests == before, "the newest stayed cached"
    assert auth.caller(f"Bearer {people[0].token(LIST)}", LIST) == people[0].did
    assert plc.requests == before + 1, "the oldest was evicted and fetched again"
