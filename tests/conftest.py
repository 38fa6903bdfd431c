"""Fixtures: stand-ins on loopback and tack itself, in-process or as a process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tack import config
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

    def build(start: bool = True, **overrides: str) -> Spindle:
        env = tack_env(tmp_path, jetstream.url, **overrides)
        spindle = Spindle(config.load(env))
        if start:
            spindle.start()
        started.append(spindle)
        return spindle

    yield build
    for spindle in started:
        if not spindle.db.is_closed():
            spindle.stop()
