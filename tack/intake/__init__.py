"""Intake: where work enters tack.

- ``knots``: one reader per wanted knot's event stream (cursors, reconnects);
- ``frames``: knot frames and the events in them, validated;
- ``knot_frames``: what each frame does: ref updates, older knots' compiled
  pipelines, knot-managed collaborators;
- ``fetch``: reading ``.tangled/workflows`` at a commit from the knot;
- ``compiler``: the ``when`` rules, which workflows a trigger runs;
- ``pulls``: pull request events from jetstream, turned into pipelines;
- ``legacy``: the Dec 2025 ``sh.tangled.pipeline`` record, validated;
- ``accept``: the one transaction every path ends in (dedupe, pipeline id,
  workflows, first statuses).

``triggerPipeline`` (api/ci.py) uses ``fetch``, ``compiler`` and ``accept``
the same way.
"""
