"""The knot side of tack: which knot event streams to follow.

The jetstream applier decides *which* knots are wanted; whoever implements
``KnotSubscriptions`` decides *how* to follow them. The split keeps invariant 2
of the design: the applier never waits on the network, so both methods must
return at once and do their connecting on threads of their own.
"""

from __future__ import annotations

from typing import Protocol

from . import logs

log = logs.get("knots")


class KnotSubscriptions(Protocol):
    def add_knot(self, knot: str) -> None:
        """Start following ``knot``'s event stream (idempotent, non-blocking)."""

    def remove_knot(self, knot: str) -> None:
        """Stop following ``knot`` and close its stream (idempotent, non-blocking)."""


class LoggedKnotSubscriptions:
    """Records wanted knots without connecting; used until a consumer is wired in."""

    def __init__(self) -> None:
        self.knots: set[str] = set()

    def add_knot(self, knot: str) -> None:
        self.knots.add(knot)
        log.info("knot wanted", extra={"knot": knot})

    def remove_knot(self, knot: str) -> None:
        self.knots.discard(knot)
        log.info("knot released", extra={"knot": knot})
