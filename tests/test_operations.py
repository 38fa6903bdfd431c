"""What an operator relies on: the systemd unit and the supervisord program
(checked by the tools that read them), and a running tack's /healthz and
/metrics (read by a client and by prometheus_client's own parser)."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .standins import (
    OWNER,
    REPO,
    Clock,
    KnotStandin,
    TackProcess,
    commit,
    push_pipeline,
    repo,
    tack_env,
    wait_until,
)

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_the_systemd_unit_verifies_and_is_hardened(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit = (SCRIPTS / "tack.service").read_text()
    # verify checks that ExecStart exists: point it at this Python.
    local = tmp_path / "tack.service"
    local.write_text(unit.replace("/opt/tack/.venv/bin/python", sys.executable))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in done.stderr.splitlines() if str(local) in line]
    assert done.returncode == 0 and complaints == [], done.stderr
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.optionxform = str
    service.read_string(unit)
    settings = service["Service"]
    assert settings["KillMode"] == "control-group"  # builds die with tack
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["Restart"] == "on-failure" and settings["RestartPreventExitStatus"] == "2"
    assert settings["DynamicUser"] == "yes"
    assert settings["StateDirectory"] == "tack" and settings["LogsDirectory"] == "tack"
    assert settings["Type"] == "exec"


def test_the_supervisord_program_names_a_user_and_its_folders():
    program = configparser.ConfigParser(interpolation=None)
    program.read(SCRIPTS / "supervisord.conf")
    tack = program["program:tack"]
    assert tack["user"] == "tack" and tack["directory"] == "/var/lib/tack"
    text = (SCRIPTS / "supervisord.conf").read_text()
    assert "useradd" in text and "install -d" in text  # the steps before it loads


# --- /healthz and /metrics of a real tack ----------------------------------------------


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def health(port: int) -> tuple[int, dict]:
    status, body = http_get(port, "/healthz")
    return status, json.loads(body)


def metric_samples(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics, parsed by prometheus_client's own parser."""
    status, body = http_get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def running_tack(tmp_path, jetstream):
    knot = KnotStandin()
    jetstream.add(commit(Clock(), OWNER, REPO, "r1", "create", repo("hello", knot.name)))
    proc = TackProcess(tack_env(tmp_path, jetstream.url), tmp_path / "tack.log")
    port = proc.wait_for_log("listening")["port"]
    wait_until(lambda: knot.open_connections == 1, what="knot subscription")
    yield proc, port, knot, tmp_path / "spindle.db"
    proc.terminate()
    knot.close()


def test_healthz_is_ok_then_names_jetstream_when_it_goes_down(running_tack, jetstream):
    _, port, _, _ = running_tack
    wait_until(lambda: health(port)[0] == 200, what="healthy")
    _, body = health(port)
    assert body["status"] == "ok" and body["failing"] == []
    assert body["checks"]["knots"] == {"ok": True, "followed": 1, "connected": 1}
    assert body["checks"]["workers"]["total"] == 2
    assert body["checks"]["jetstream"]["last_event_age_s"] is not None
    assert http_get(port, "/healthz")[0] == 200
    jetstream.close()
    wait_until(lambda: health(port)[0] == 503, timeout=20, what="jetstream reported down")
    _, body = health(port)
    assert body["failing"] == ["jetstream"] and body["checks"]["jetstream"]["connected"] is False


def test_healthz_names_a_database_locked_for_long(running_tack):
    _, port, _, db_path = running_tack
    holder = sqlite3.connect(db_path, timeout=10, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        status, body = health(port)
        assert status == 503 and body["failing"] == ["database"]
        assert "not writable" in body["checks"]["database"]["error"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert health(port)[0] == 200


def test_metrics_parse_and_move_with_a_run(running_tack):
    _, port, knot, _ = running_tack
    before = metric_samples(port)
    assert before[("tack_knots_followed", ())] == 1
    assert before[("tack_jetstream_events_applied_total", ())] >= 1  # the repo record
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("ci.yml", "dummy", "steps: []")]))
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "unknown", [("x.yml", "dummy", "")]))
    finished = ("tack_workflows_finished_total", (("status", "success"),))
    wait_until(lambda: metric_samples(port).get(finished) == 1, what="a finished workflow")
    after = metric_samples(port)
    assert after[("tack_pipelines_accepted_total", ())] == 1
    assert after[("tack_pipelines_rejected_total", (("reason", "not_served"),))] == 1
    assert after[("tack_workflow_duration_seconds_count", (("backend", "dummy"),))] == 1
    assert after[("tack_workflows_running", ())] == 0 and after[("tack_workflows_queued", ())] == 0
    metrics_ok = ("tack_http_requests_total", (("route", "/metrics"), ("status", "200")))
    assert after[metrics_ok] >= 2
    assert after[("tack_events_subscribers", ())] == 0


# --- retention and the log cap ---------------------------------------------------------


def test_a_log_stops_at_its_cap_with_one_line_saying_what_was_cut(tmp_path):
    from tack.worklogs import LogBook

    book = LogBook(tmp_path / "logs", max_bytes=64 * 1024)
    log = book.open(7)
    log.start_step(0, "noisy", 1)
    for index in range(5000):
        log.data(0, f"line {index} " + "x" * 40)
    log.end_step(0, "noisy", 1)
    log.close()
    lines = [json.loads(line) for line in book.path(7).read_text().splitlines()]
    assert book.path(7).stat().st_size < 64 * 1024 + 1024
    assert lines[-2]["kind"] == "control" and lines[-2]["step_status"] == "end"
    marker = lines[-1]["content"]
    kept = sum(1 for line in lines if line["content"].startswith("line "))
    assert f"{5000 - kept:,} more lines" in marker and "cap of 65,536 bytes" in marker


def test_tack_prune_deletes_old_logs_and_events_and_keeps_the_rows(running_tack, tmp_path):
    _, port, knot, db_path = running_tack
    for index in range(2):
        knot.send_pipeline(
            push_pipeline(knot.name, OWNER, "hello", [(f"w{index}.yml", "dummy", "")])
        )
    finished = ("tack_workflows_finished_total", (("status", "success"),))
    wait_until(lambda: metric_samples(port).get(finished) == 2, what="two finished workflows")
    logs_dir = tmp_path / "logs"
    assert len(list(logs_dir.glob("*.jsonl"))) == 2
    env = tack_env(tmp_path, "ws://127.0.0.1:9/subscribe")
    prune = [sys.executable, "-m", "tack", "prune", "--days", "0.00002", "--json"]
    time.sleep(2.0)  # 0.00002 days is 1.7 s
    done = subprocess.run(prune, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["workflows"] == 2 and result["log_files"] == 2
    assert result["status_events"] >= 6  # pending, running, success of each
    assert list(logs_dir.glob("*.jsonl")) == []
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM workflow").fetchone()[0] == 2
        assert db.execute("SELECT count(*) FROM pipeline").fetchone()[0] == 2
        assert db.execute("SELECT count(*) FROM status_event").fetchone()[0] == 0
    again = subprocess.run(prune, env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(again.stdout)["workflows"] == 0


def test_a_large_prune_lets_other_writes_in_between_its_batches(tmp_path):
    """Retention deletes a batch of events per transaction: a writer beside
    it sees them go in steps, where one long statement held every writer
    (a knot frame, a status) until the whole prune was done."""
    from tack import retention, store
    from tack.worklogs import LogBook

    db = store.open_database(str(tmp_path / "s.db"))
    long_ago = 1_000_000_000  # ns: final since 1970
    db.execute_sql(
        "INSERT INTO pipeline (knot, rkey, repo_owner, repo_name, record, accepted_at)"
        " VALUES ('k', 'p', 'did:plc:o', 'r', '{}', ?)",
        (long_ago,),
    )
    db.execute_sql(
        "INSERT INTO workflow (knot, rkey, name, engine, status, created_at, updated_at)"
        " VALUES ('k', 'p', 'w.yml', 'dummy', 'success', ?, ?)",
        (long_ago, long_ago),
    )
    count = 10 * retention.PRUNE_BATCH
    with db.atomic():
        db.cursor().executemany(
            "INSERT INTO status_event (rkey, created, workflow_id, status, frame)"
            " VALUES (?, ?, 1, 'success', '{}')",
            ((f"e{index}", long_ago - index) for index in range(count)),
        )
    seen: list[int] = []
    done = threading.Event()

    def write() -> None:
        while not done.is_set():
            with db.atomic():
                seen.append(db.execute_sql("SELECT count(*) FROM status_event").fetchone()[0])
        store.release_connection()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        pruned = retention.prune(LogBook(tmp_path / "logs"), days=1)
    finally:
        done.set()
        writer.join(10)
        db.close()
    assert pruned.status_events == count
    between = [n for n in seen if 0 < n < count]
    assert between, "no write got in between the prune's batches"


# --- the admin commands beside a running tack ------------------------------------------


def tack_command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = tack_env(tmp_path, "ws://127.0.0.1:9/subscribe")
    return subprocess.run(
        [sys.executable, "-m", "tack", *args], env=env, capture_output=True, text=True, timeout=60
    )


def tack_json(tmp_path: Path, *args: str):
    done = tack_command(tmp_path, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


SLOW = "steps:\n  - name: Wait\n    command: sleep\ndummy:\n  delay: 30\n"


def test_admin_commands_list_show_and_cancel_a_running_workflow(running_tack, tmp_path):
    _, _, knot, db_path = running_tack
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("quick.yml", "dummy", "")]))
    knot.send_pipeline(push_pipeline(knot.name, OWNER, "hello", [("slow.yml", "dummy", SLOW)]))
    wait_until(
        lambda: (
            {w["workflow"]: w["status"] for w in tack_json(tmp_path, "workflows")}
            == {"quick.yml": "success", "slow.yml": "running"}
        ),
        timeout=20,
        what="one finished, one running",
    )
    listed = tack_json(tmp_path, "workflows", "--status", "running")
    assert [w["workflow"] for w in listed] == ["slow.yml"]
    assert listed[0]["repo"] == f"{OWNER}/hello" and listed[0]["engine"] == "dummy"
    slow = listed[0]["id"]
    readable = tack_command(tmp_path, "workflows")
    assert readable.stdout.splitlines()[0].split()[:3] == ["ID", "STATUS", "REPO"]
    shown = tack_json(tmp_path, "show", str(slow))
    assert shown["statuses"][0]["status"] == "pending" and shown["status"] == "running"
    assert "dummy: would run: sleep" in shown["log_tail"]
    # Only the database named, nothing else configured: the running tack
    # recorded where its logs are.
    bare = subprocess.run(
        [sys.executable, "-m", "tack", "show", str(slow), "--json", "--db", str(db_path)],
        env={"PATH": os.environ["PATH"]}, cwd="/", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(bare.stdout)["log_tail"] == shown["log_tail"], bare.stderr

    started = time.monotonic()
    cancelled = tack_command(tmp_path, "cancel", str(slow))
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"workflow {slow}: cancelled"
    assert time.monotonic() - started < 10
    assert tack_json(tmp_path, "show", str(slow))["status"] == "cancelled"
    assert tack_json(tmp_path, "cancel", str(slow))["result"] == "already final"
    assert tack_command(tmp_path, "show", "99999").returncode == 1


def test_admin_commands_list_repos_members_collaborators_and_knots(running_tack, tmp_path):
    _, _, knot, _ = running_tack
    assert tack_json(tmp_path, "repos") == [
        {"owner": OWNER, "name": "hello", "repo_did": "", "knot": knot.name}
    ]
    assert tack_json(tmp_path, "members") == []
    assert tack_json(tmp_path, "collaborators") == []
    (row,) = tack_json(tmp_path, "knots")
    assert row["knot"] == knot.name and row["repos"] == 1 and row["followed"] == "yes"


def test_backup_of_a_live_database_under_write_load_opens_with_every_table(running_tack, tmp_path):
    _, _, knot, db_path = running_tack
    stop = threading.Event()

    def load() -> None:
        index = 0
        while not stop.is_set():
            record = push_pipeline(knot.name, OWNER, "hello", [(f"l{index}.yml", "dummy", "")])
            knot.send_pipeline(record)
            index += 1
            time.sleep(0.005)

    writer = threading.Thread(target=load, daemon=True)
    writer.start()
    try:
        time.sleep(1.0)
        target = tmp_path / "backup.db"
        result = tack_json(tmp_path, "backup", str(target))
    finally:
        stop.set()
        writer.join()
    assert result["bytes"] == target.stat().st_size > 0
    with sqlite3.connect(target) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        tables = {
            name for (name,) in copy.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        with sqlite3.connect(db_path) as live:
            expected = {
                name
                for (name,) in live.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        assert tables == expected and {"pipeline", "workflow", "status_event", "repo"} <= tables
        assert copy.execute("SELECT count(*) FROM pipeline").fetchone()[0] > 10
    assert tack_command(tmp_path, "backup", str(target)).returncode == 2  # never overwrites


# --- switching over from the official spindle ------------------------------------------


def official_database(path: Path, repo_did: str) -> None:
    """The official spindle's tables as its db.go and secrets/sqlite.go create
    them, with one plain-text secret for a repo named by its DID."""
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            create table repos (id integer primary key autoincrement, knot text not null,
                owner text not null, rkey text not null, repo_did text, created_at text,
                addedAt text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
                unique(owner, rkey));
            create table secrets (id integer primary key autoincrement, repo text not null,
                key text not null, value text not null,
                created_at text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
                created_by text not null, unique(repo, key));
            create table _jetstream (id integer primary key autoincrement,
                last_time_us integer not null);
            """
        )
        db.execute(
            "insert into repos (knot, owner, rkey, repo_did) values (?, ?, ?, ?)",
            ("knot.test", OWNER, "3lrepo", repo_did),
        )
        db.execute(
            "insert into secrets (repo, key, value, created_by) values (?, ?, ?, ?)",
            (repo_did, "DEPLOY_TOKEN", "plain-official-value", OWNER),
        )


def test_switching_over_imports_the_official_secrets_sealed_and_leaves_its_tables(
    tmp_path, jetstream
):
    from tack import store
    from tack.secrets import SecretStore, load_keys

    db_path = tmp_path / "spindle.db"
    repo_did = "did:plc:" + "r" * 24
    official_database(db_path, repo_did)
    uri = f"at://{OWNER}/sh.tangled.repo/3lrepo"

    def run_tack_once() -> None:
        log = tmp_path / f"tack-{len(list(tmp_path.glob('tack-*.log')))}.log"
        proc = TackProcess(tack_env(tmp_path, jetstream.url), log)
        proc.wait_for_log("tack started")
        assert proc.terminate() == 0

    run_tack_once()
    with sqlite3.connect(db_path) as db:
        (sealed,) = db.execute(
            "SELECT value FROM secret WHERE repo = ? AND key = 'DEPLOY_TOKEN'", (uri,)
        ).fetchone()
        assert b"plain-official-value" not in bytes(sealed)
        official = db.execute("SELECT repo, key, value FROM secrets").fetchall()
        assert official == [(repo_did, "DEPLOY_TOKEN", "plain-official-value")]  # left alone
    handle = store.open_database(str(db_path))
    secrets = SecretStore(handle, load_keys(None, str(tmp_path / "secrets.key")))
    assert secrets.values(uri) == {"DEPLOY_TOKEN": "plain-official-value"}
    assert secrets.remove(uri, "DEPLOY_TOKEN")  # removed through tack afterwards
    handle.close()
    run_tack_once()  # imported once: the next start does not bring it back
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM secret").fetchone()[0] == 0
