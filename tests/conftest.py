"""Fixtures: stand-ins on loopback and tack itself, in-process or as a process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tack import config
from tack.knots import LoggedKnotSubscriptions
from tack.service import Spindle

from .standins import Clock, JetstreamStandin, tack_env


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
