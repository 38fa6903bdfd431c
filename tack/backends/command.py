"""The ``command`` backend: hand the workflow to an operator-given program.

Any CI with a command-line client plugs in here. The program gets the
pipeline and workflow as JSON on stdin and the same environment a shell step
gets (workflow env < TANGLED_* < secrets); its output is the log (one step)
and its exit status the result. Timeout and cancel end its process group.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from ..worklogs import USER_STEP, WorkflowLog
from . import Backend, Context, Job, Outcome, process
from .checkout import outcome_of
from .options import Options
from .shell import workflow_environment


def describe(job: Job) -> dict:
    """The JSON a backend hands to an outside program: everything needed to run it."""
    return {
        "workflow_id": job.workflow_id,
        "pipeline_uri": job.pipeline_uri,
        "knot": job.knot,
        "rkey": job.rkey,
        "workflow": job.name,
        "engine": job.engine,
        "pipeline": job.pipeline,
        "definition": {
            "raw": job.workflow["raw"],
            "clone": job.workflow.get("clone", {}),
            "environment": job.spec.environment,
            "steps": [asdict(step) for step in job.spec.steps],
            "document": job.spec.document,
        },
        "env": job.env,
    }


class CommandBackend(Backend):
    type_name = "command"

    def __init__(self, name: str, options: Options, context: Context) -> None:
        super().__init__(name, options, context)
        self.command = options.argv("command", required=True)
        self.timeout = options.number("timeout", 3600, 1, 7 * 86400)
        self.kill_grace = options.number("kill_grace", 5, 0, 300)

    def run(self, job: Job, log: WorkflowLog) -> Outcome:
        deadline = time.monotonic() + self.timeout
        home = Path(tempfile.mkdtemp(prefix=f"tack-{job.workflow_id}-"))
        payload = json.dumps(describe(job)).encode()
        log.start_step(0, self.name, USER_STEP, " ".join(self.command))
        try:
            result = process.run(
                self.command,
                cwd=home,
                env=workflow_environment(job, home),
                cancel=job.cancel,
                deadline=deadline,
                stdin=payload,
                on_line=lambda stream, line: log.data(0, line, stream),
                kill_grace=self.kill_grace,
                on_start=lambda pid: job.save_state(process.leftover_state(pid, home)),
            )
        finally:
            log.end_step(0, self.name, USER_STEP)
            shutil.rmtree(home, ignore_errors=True)
        return outcome_of(result, "command", self.timeout) or Outcome("success")
