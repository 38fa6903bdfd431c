"""The ``dummy`` backend, as the official spindle has: logs each step, runs nothing.

It lets an operator (and the tests) see the whole path from knot to /events
and /logs without executing anything from a repository.
"""

from __future__ import annotations

from ..worklogs import USER_STEP, WorkflowLog
from . import Backend, Job, Outcome


class DummyBackend(Backend):
    type_name = "dummy"

    def run(self, job: Job, log: WorkflowLog) -> Outcome:
        for step_id, step in enumerate(job.spec.steps):
            if job.cancel.is_set():
                return Outcome("cancelled")
            log.start_step(step_id, step.name, USER_STEP, step.command)
            log.data(step_id, f"dummy: would run: {step.command}")
            log.end_step(step_id, step.name, USER_STEP)
        return Outcome("success")
