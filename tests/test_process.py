"""``python -m tack`` as a real process: configuration, crashes, shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tack.config import SETTINGS

from .standins import (
    MEMBER,
    OWNER,
    Clock,
    TackProcess,
    commit,
    db_cursor,
    db_rows,
    fake_podman,
    member,
    repo,
    tack_env,
    wait_until,
)

REPO = "sh.tangled.repo"


def run_tack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tack", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_help_explains_every_setting():
    result = run_tack({"PATH": os.environ["PATH"]}, "--help")
    assert result.returncode == 0
    for setting in SETTINGS:
        assert setting.env in result.stdout


@pytest.mark.parametrize(
    ("override", "setting", "phrase"),
    [
        ({"SPINDLE_SERVER_HOSTNAME": ""}, "SPINDLE_SERVER_HOSTNAME", "required"),
        ({"SPINDLE_SERVER_OWNER": "alice"}, "SPINDLE_SERVER_OWNER", "DID"),
        ({"SPINDLE_SERVER_LISTEN_ADDR": "6555"}, "SPINDLE_SERVER_LISTEN_ADDR", "HOST:PORT"),
        ({"SPINDLE_SERVER_QUEUE_SIZE": "lots"}, "SPINDLE_SERVER_QUEUE_SIZE", "whole number"),
        ({"SPINDLE_SERVER_DEV": "maybe"}, "SPINDLE_SERVER_DEV", "true or false"),
        (
            {"SPINDLE_NIXERY_PIPELINES_WORKFLOW_TIMEOUT": "five minutes"},
            "SPINDLE_NIXERY_PIPELINES_WORKFLOW_TIMEOUT",
            "such as 5m",
        ),
        (
            {"SPINDLE_SERVER_JETSTREAM_ENDPOINT": "http://x"},
            "SPINDLE_SERVER_JETSTREAM_ENDPOINT",
            "ws://",
        ),
        ({"TACK_LOG_FORMAT": "xml"}, "TACK_LOG_FORMAT", "json"),
    ],
)
def test_bad_setting_exits_2_with_one_line_naming_it(tmp_path, override, setting, phrase):
    env = tack_env(tmp_path, "ws://127.0.0.1:9/subscribe", **override)
    env = {k: v for k, v in env.items() if v != "" or k not in override}
    result = run_tack(env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert setting in lines[0] and phrase in lines[0]
    assert "Traceback" not in result.stderr


def _stream(clock: Clock, count: int) -> list[dict]:
    """Repo churn whose end state depends on every event applying in order."""
    events = []
    for i in range(count):
        rkey = f"r{i % 97}"
        if i % 11 == 5:
            events.append(commit(clock, OWNER, REPO, rkey, "delete"))
        elif i % 13 == 7:
            events.append(
                commit(clock, OWNER, MEMBER, f"m{i % 17}", "create", member(f"did:plc:u{i}"))
            )
        else:
            events.append(
                commit(clock, OWNER, REPO, rkey, "create", repo(f"n{i}", f"knot{i % 5}.test"))
            )
    return events


def test_kill_9_mid_stream_then_restart_ends_in_the_clean_pass_state(tmp_path, jetstream):
    events = _stream(Clock(), 20_000)
    jetstream.add(*events)
    last = events[-1]["time_us"]

    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    clean = TackProcess(tack_env(clean_dir, jetstream.url), clean_dir / "tack.log")
    wait_until(lambda: db_cursor(clean_dir / "spindle.db") == last, timeout=60, what="clean pass")
    assert clean.terminate() == 0

    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    env = tack_env(crash_dir, jetstream.url)
    first = TackProcess(env, crash_dir / "tack.log")
    wait_until(
        lambda: (db_cursor(crash_dir / "spindle.db") or 0) > events[2_000]["time_us"],
        timeout=60,
        what="some progress",
    )
    first.kill()
    killed_at = db_cursor(crash_dir / "spindle.db")
    assert killed_at < last, "the crash must come mid-stream for this test to mean anything"

    second = TackProcess(env, crash_dir / "tack.log")
    wait_until(lambda: db_cursor(crash_dir / "spindle.db") == last, timeout=60, what="recovery")
    assert second.terminate() == 0
    assert db_rows(crash_dir / "spindle.db") == db_rows(clean_dir / "spindle.db")
    assert jetstream.subscriptions[-1].cursor == killed_at - 5_000_000


def test_sigterm_drains_saves_the_cursor_and_exits_0(tmp_path, jetstream):
    events = _stream(Clock(), 3_000)
    jetstream.add(*events)
    proc = TackProcess(tack_env(tmp_path, jetstream.url), tmp_path / "tack.log")
    wait_until(lambda: db_cursor(tmp_path / "spindle.db") == events[-1]["time_us"], timeout=30)
    started = time.monotonic()
    assert proc.terminate() == 0
    assert time.monotonic() - started < 10
    lines = proc.log_lines()  # every line is one JSON object
    stopped = [line for line in lines if line["message"] == "tack stopped"]
    assert stopped and stopped[-1]["cursor"] == events[-1]["time_us"]
    assert {"time", "level", "component", "message"} <= set(lines[0])


def test_sigterm_while_the_store_is_locked_exits_promptly_without_advancing(tmp_path, jetstream):
    """Shutdown interrupts an in-place retry; the unapplied events are not skipped."""
    import sqlite3

    clock = Clock()
    first = commit(clock, OWNER, MEMBER, "m1", "create", member("did:plc:a"))
    jetstream.add(first)
    db_path = tmp_path / "spindle.db"
    proc = TackProcess(tack_env(tmp_path, jetstream.url), tmp_path / "tack.log")
    wait_until(lambda: db_cursor(db_path) == first["time_us"], timeout=30)

    blocker = sqlite3.connect(db_path, timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    later = commit(clock, OWNER, MEMBER, "m2", "create", member("did:plc:b"))
    jetstream.add(later)
    time.sleep(1.0)
    started = time.monotonic()
    assert proc.terminate() == 0
    assert time.monotonic() - started < 10
    blocker.execute("ROLLBACK")
    blocker.close()
    assert db_cursor(db_path) == first["time_us"]
    assert [row[2] for row in db_rows(db_path)["member"]] == ["did:plc:a"]


def test_no_cursor_means_live_tail_and_the_cursor_survives_restart(tmp_path: Path, jetstream):
    clock = Clock()
    event = commit(clock, OWNER, MEMBER, "m1", "create", member("did:plc:a"))
    jetstream.add(event)
    env = tack_env(tmp_path, jetstream.url)
    proc = TackProcess(env, tmp_path / "tack.log")
    wait_until(lambda: db_cursor(tmp_path / "spindle.db") == event["time_us"], timeout=30)
    assert proc.terminate() == 0
    proc = TackProcess(env, tmp_path / "tack.log")
    wait_until(lambda: len(jetstream.subscriptions) == 2, timeout=30)
    assert jetstream.subscriptions[1].cursor == event["time_us"] - 5_000_000
    assert proc.terminate() == 0


# --- what an operator sees at start ------------------------------------------------------


def test_one_start_up_line_says_what_runs_where(tmp_path, jetstream):
    proc = TackProcess(
        tack_env(tmp_path, jetstream.url, SPINDLE_SERVER_SECRETS_PROVIDER="openbao"),
        tmp_path / "tack.log",
    )
    try:
        started = proc.wait_for_log("tack started")
        ignored = proc.wait_for_log(
            "settings of the official spindle that tack does not implement are ignored"
        )
    finally:
        assert proc.terminate() == 0
    from tack import __version__

    assert started["version"] == __version__
    assert started["database"] == str((tmp_path / "spindle.db").resolve())
    assert Path(started["log_dir"]).is_absolute() and started["dev"] is True
    assert started["backends"] == {"dummy": "dummy", "shell": "shell"}
    assert started["listen"].startswith("127.0.0.1:") and started["owner"] == OWNER
    assert ignored["settings"] == ["SPINDLE_SERVER_SECRETS_PROVIDER"]
    assert "openbao" not in proc.log_path.read_text()  # named, never its value


def test_text_logs_keep_the_fields(tmp_path, jetstream):
    log_path = tmp_path / "tack.log"
    proc = TackProcess(tack_env(tmp_path, jetstream.url, TACK_LOG_FORMAT="text"), log_path)
    try:
        wait_until(lambda: " tack started " in log_path.read_text(), what="start-up line")
    finally:
        assert proc.terminate() == 0
    line = next(ln for ln in log_path.read_text().splitlines() if " tack started " in ln)
    assert " INFO service tack started " in line
    assert f"owner={OWNER}" in line and "dev=true" in line
    assert '"shell": "shell"' in line


def test_the_official_nixery_settings_become_container_defaults(monkeypatch, tmp_path):
    from tack import config
    from tack.backends import Context, default_backends

    fake_podman(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    settings = config.load(
        {
            "SPINDLE_SERVER_HOSTNAME": "ci.example.com",
            "SPINDLE_SERVER_OWNER": OWNER,
            "SPINDLE_NIXERY_PIPELINES_NIXERY": "nixery.tangled.sh",
            "SPINDLE_NIXERY_PIPELINES_WORKFLOW_TIMEOUT": "1h30m",
            "SPINDLE_NIXERY_PIPELINES_MAX_JOB_MEMORY_MB": "6144",
        }
    )
    nixery = default_backends(Context.for_config(settings)).resolve("nixery")
    assert nixery.registry == "nixery.tangled.sh"
    assert nixery.timeout == 5400 and nixery.memory == "6144m"
    assert config.unimplemented_settings(
        {"SPINDLE_SERVER_SECRETS_PROVIDER": "sqlite", "SPINDLE_S3_LOG_BUCKET": "b"}
    ) == ["SPINDLE_S3_LOG_BUCKET"]
