"""The ``dummy`` backend, as the official spindle has: logs each step, runs nothing.

It lets an operator (and the tests) see the whole path from knot to /events
and /logs without executing anything from a repository. A workflow may set
``dummy: {delay: SECONDS}`` (at most 60) to make each step take that long,
which is how a long-running workflow is staged without running anything.
"""

from __future__ import annotations

from ..worklogs import USER_STEP, WorkflowLog
from . import Backend, Job, Outcome


class DummyBackend(Backend):
    type_name = "dummy"

    def run(self, job: Job, log: WorkflowLog) -> Outcome:
        delay = _delay(job.spec.document.get("dummy"))
        for step_id, step in enumerate(job.spec.steps):
            log.start_step(step_id, step.name, USER_STEP, step.command)
            log.data(step_id, f"dummy: would run: {step.command}")
            if job.cancel.wait(delay):
                return Outcome("cancelled")
            log.end_step(step_id, step.name, USER_STEP)
        return Outcome("success")


def _delay(options: object) -> float:
    if not isinstance(options, dict):
        return 0.0
    value = options.get("delay", 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return min(max(float(value), 0.0), 60.0)
