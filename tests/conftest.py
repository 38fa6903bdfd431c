"""Fixtures: stand-ins on loopback and tack itself, in-process or as a process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tack import config
from tack.intake.knots import LoggedKnotSubscriptions
from tack.service import Spindle

from .standins import (
    OWNER,
    REPO,
    Clock,
    JetstreamStandin,
    KnotStandin,
    commit,
    repo,
    tack_env,
    wait_until,
)


@pytest.fixture
def jetstream() -> Iterator[JetstreamStandin]:
    standin = JetstreamStandin()
    yield standin
    standin.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_spindle(tmp_path: Path, jetstream: JetstreamStandin) -> Iterator:
    """Build (and later stop) an in-process Spindle: the real threads, the real store."""
    started: list[Spindle] = []

    def build(start: bool = True, real_knots: bool = False, **overrides: str) -> Spindle:
        """Ingest tests watch the applier's knot decisions, not knot connections."""
        env = tack_env(tmp_path, jetstream.url, **overrides)
        knots = None if real_knots else LoggedKnotSubscriptions()
        spindle = Spindle(config.load(env), knots=knots)
        if start:
            spindle.start()
        started.append(spindle)
        return spindle

    yield build
    for spindle in started:
        if not spindle.db.is_closed():
            spindle.stop()


@pytest.fixture
def knot(tmp_path: Path) -> Iterator[KnotStandin]:
    """A knot stand-in that also serves git repositories from ``tmp_path/git``."""
    standin = KnotStandin(git_root=tmp_path / "git")
    yield standin
    standin.close()


@pytest.fixture
def serve_repo(jetstream: JetstreamStandin, knot: KnotStandin, make_spindle, clock: Clock):
    """Start tack with ``config`` (tack.toml text, optional) serving OWNER's repo ``hello``."""

    def start(config: str | None = None, **env: str) -> Spindle:
        if config is not None:
            path = knot.git_root.parent / "custom.toml"
            path.write_text(config)
            env["TACK_CONFIG"] = str(path)
        spindle = make_spindle(real_knots=True, **env)
        jetstream.add(commit(clock, OWNER, REPO, "r1", "create", repo("hello", knot.name)))
        wait_until(lambda: knot.open_connections == 1, what="tack subscribed to the knot")
        return spindle

    return start
