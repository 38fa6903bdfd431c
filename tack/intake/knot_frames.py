"""What a knot's event stream brings in, frame by frame.

Three kinds of frame matter (protocol-2026 §5.1):

- ``sh.tangled.git.refUpdate``: a push. tack reads the repo's workflow files
  at the pushed commit from the knot, compiles them against the push and
  accepts the pipeline that results (if any workflow matches);
- ``sh.tangled.pipeline``: a pipeline an older knot compiled itself (Dec 2025,
  and early-2026 knots that send both). It is taken as it is, unless the knot
  has shown it sends today's ref updates, whose intake already covers the
  push; and whichever frame comes second for one push finds the push taken;
- ``sh.tangled.repo.collaboratorUpdate``: the knot adding or removing a
  collaborator of one of its repos.

Every frame is untrusted; a bad one is logged and skipped, and only what was
processed moves the knot's cursor. A workflow fetch that fails for a reason
that may pass (the knot's git unreachable) is retried in place; after
``FETCH_ATTEMPTS`` the push is logged as lost and skipped, so one broken
commit cannot stall a knot forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .. import logs, store
from ..store import Directory, KnotCollaborator, Repo
from . import frames
from .accept import Acceptor, NewPipeline, compile_pipeline, push_key
from .compiler import PUSH, CompiledWorkflow, Trigger
from .fetch import FetchError, WorkflowFetcher
from .frames import KnotFrame, RefUpdate
from .legacy import PipelineRecord, Rejected, validate

log = logs.get("intake")

FETCH_ATTEMPTS = 4
FETCH_RETRY_SECONDS = (1.0, 3.0, 9.0)
_MODERN_MARK = "knot-sends-ref-updates:"


class KnotIntake:
    def __init__(
        self,
        directory: Directory,
        acceptor: Acceptor,
        fetcher: WorkflowFetcher,
        stop: threading.Event,
        read_mark: Callable[[str], int | None] = store.get_cursor,
        write_mark: Callable[[str, int], None] = store.save_cursor,
        on_rejected: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._on_rejected = on_rejected
        self._directory = directory
        self._acceptor = acceptor
        self._fetcher = fetcher
        self._stop = stop
        self._read_mark = read_mark
        self._write_mark = write_mark
        self._modern: set[str] = set()
        self._marks_read: set[str] = set()
        self._told_ignoring: set[str] = set()

    def handle(self, knot: str, raw: str | bytes) -> tuple[int, bool] | None:
        """Process one knot frame; the cursor (unix ns) it moves the knot to, if
        any, and whether that is exact (the frame's ``created``) or a TID's time."""
        frame = frames.decode_frame(raw)
        if frame is None:
            log.warning(
                "knot frame skipped: not a {rkey, nsid, event} object",
                extra={"knot": knot, "size": len(raw)},
            )
            return None
        ids = {"knot": knot, "rkey": frame.rkey, "nsid": frame.nsid}
        try:
            if frame.nsid == frames.REF_UPDATE:
                self._ref_update(knot, frame, ids)
            elif frame.nsid == frames.PIPELINE:
                self._legacy_pipeline(knot, frame, ids)
            elif frame.nsid == frames.COLLABORATOR_UPDATE:
                self._collaborator_update(knot, frame, ids)
        except Rejected as exc:
            log.warning("knot event rejected", extra={**ids, "reason": str(exc)})
            self._on_rejected(str(exc))
        except Exception as exc:
            if store.is_transient(exc):
                raise  # the stream reconnects and the event is replayed: never skipped
            # Anything else this event makes us raise would recur on every
            # replay and stall the knot for good: log it and move past it.
            log.exception("knot event failed, skipped", extra=ids)
        if frame.created_ns is None:
            return None
        return frame.created_ns, frame.exact

    # --- pushes ------------------------------------------------------------------------

    def _ref_update(self, knot: str, frame: KnotFrame, ids: dict) -> None:
        update = frames.decode_ref_update(frame.event)
        if update.modern:
            self._mark_modern(knot)
        repo = self._repo_for(knot, update)
        ids |= {"did": repo.did, "repo_did": repo.repo_did, "ref": update.ref}
        if update.deletion:
            log.info("ref deleted, nothing to run", extra=ids)
            return
        if update.skip_ci:
            log.info("push asked to skip CI", extra=ids)
            return
        if self._acceptor.seen(knot, frame.rkey):
            log.info("push already taken in, replay ignored", extra=ids)
            return
        files = self._fetch(knot, repo.knot_path, update.new_sha, ids)
        if files is None:
            return
        push = {"ref": update.ref, "newSha": update.new_sha, "oldSha": update.old_sha}
        new = compile_pipeline(
            self._fetcher,
            repo,
            Trigger(PUSH, push, update.changed_files),
            files,
            knot_event=(knot, frame.rkey),
            push_key=_push_key("refUpdate", knot, repo, push),
            ids=ids,
        )
        if new is None:
            log.info("no workflow matches the push", extra={**ids, "files": len(files)})
            self._acceptor.mark_seen(knot, frame.rkey)
            return
        self._acceptor.accept(new)

    def _repo_for(self, knot: str, update: RefUpdate) -> Repo:
        """The served repo a push is for, or Rejected with the reason."""
        if update.repo_did is not None:
            repo = self._directory.repo_by_did(update.repo_did)
            if repo is None:
                raise Rejected("no served repo record holds this repo DID")
            if update.owner is not None and update.owner != repo.did:
                raise Rejected("ownerDid is not the author of the repo's record")
        else:
            repo = self._directory.repo_by_name(update.owner or "", update.repo_name or "")
            if repo is None:
                raise Rejected("no repo record naming this spindle matches owner and name")
        if repo.knot != knot:
            raise Rejected(f"the repo lives on knot {repo.knot!r}, not {knot!r}")
        if not self._directory.is_member(repo.did):
            raise Rejected("the repo owner is not the spindle owner or a member")
        return repo

    def _fetch(self, knot: str, path: str, sha: str, ids: dict) -> dict[str, str] | None:
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                return self._fetcher.workflow_files(knot, path, sha)
            except FetchError as exc:
                last = attempt == FETCH_ATTEMPTS or not exc.transient
                log.log(
                    40 if last else 30,
                    "workflow fetch failed, push skipped" if last else "workflow fetch failed",
                    extra={**ids, "sha": sha, "attempt": attempt, "reason": str(exc)},
                )
                if last or self._stop.wait(FETCH_RETRY_SECONDS[attempt - 1]):
                    return None
        return None

    def _mark_modern(self, knot: str) -> None:
        if knot in self._modern:
            return
        self._modern.add(knot)
        if self._read_mark(_MODERN_MARK + knot) is None:
            self._write_mark(_MODERN_MARK + knot, 1)

    def _is_modern(self, knot: str) -> bool:
        # The saved mark is read once per knot; after that, only a ref update
        # in this process (``_mark_modern``) can change the answer.
        if knot not in self._marks_read:
            self._marks_read.add(knot)
            if self._read_mark(_MODERN_MARK + knot) is not None:
                self._modern.add(knot)
        return knot in self._modern

    # --- pipelines older knots compiled -------------------------------------------------

    def _legacy_pipeline(self, knot: str, frame: KnotFrame, ids: dict) -> None:
        if self._is_modern(knot):
            if knot not in self._told_ignoring:
                self._told_ignoring.add(knot)
                log.info(
                    "knot sends ref updates: its compiled pipelines are ignored",
                    extra={"knot": knot},
                )
            return
        pipeline = validate(frame.event)
        repo = self._authorize_legacy(knot, pipeline)
        trigger = pipeline.record["triggerMetadata"]
        workflows = [
            CompiledWorkflow(w["name"], w["engine"], w.get("clone", {}), w["raw"])
            for w in pipeline.workflows
        ]
        key = None
        if pipeline.kind == PUSH:
            key = _push_key("pipeline", knot, repo, trigger["push"])
        self._acceptor.accept(
            NewPipeline(
                knot=knot,
                repo=repo,
                record=pipeline.record,
                workflows=workflows,
                rkey=frame.rkey,
                knot_event=(knot, frame.rkey),
                push_key=key,
                ids=ids | {"repo": repo.name},
            )
        )

    def _authorize_legacy(self, knot: str, pipeline: PipelineRecord) -> Repo:
        if pipeline.knot != knot:
            raise Rejected(f"names knot {pipeline.knot!r} but came from {knot!r}")
        repo = None
        if pipeline.repo_did:
            repo = self._directory.repo_by_did(pipeline.repo_did)
        if repo is None and pipeline.repo_name:
            repo = self._directory.repo_by_name(pipeline.owner, pipeline.repo_name)
        if repo is None:
            raise Rejected("no repo record naming this spindle matches the pipeline's repo")
        if repo.did != pipeline.owner:
            raise Rejected("the repo record belongs to another owner")
        if repo.knot != knot:
            raise Rejected(f"the repo lives on knot {repo.knot!r}, not {knot!r}")
        if not self._directory.is_member(repo.did):
            raise Rejected("the repo owner is not the spindle owner or a member")
        return repo

    # --- collaborators the knot manages ---------------------------------------------------

    def _collaborator_update(self, knot: str, frame: KnotFrame, ids: dict) -> None:
        update = frames.decode_collaborator_update(frame.event)
        repo = self._directory.repo_by_did(update.repo_did)
        if repo is None or repo.knot != knot:
            raise Rejected("not a served repo on this knot")
        row = {"knot": knot, "repo_did": update.repo_did, "subject": update.subject}
        if update.op == "add":
            KnotCollaborator.insert(**row).on_conflict_ignore().execute()
        else:
            KnotCollaborator.delete().where(
                (KnotCollaborator.knot == knot)
                & (KnotCollaborator.repo_did == update.repo_did)
                & (KnotCollaborator.subject == update.subject)
            ).execute()
        log.info("knot collaborator " + update.op, extra={**ids, **row})


def _push_key(source: str, knot: str, repo: Repo, push: dict) -> str:
    """One push, however a knot announces it: by the repo row, not the wire shape."""
    return push_key(source, knot, f"{repo.did}/{repo.rkey}", push)
