"""Pull requests: jetstream pull events become pipelines (protocol-2026 §5.4).

The jetstream applier only stores a branch pull request into a served repo
and queues its event (``pull_trigger``), in the same transaction as its
cursor; it never waits on the network (invariant 2). This worker takes the
queue in order: it checks push rights (the pull's author, and the event's
author when another DID changed its status), finds the source commit in the
latest round's patch, fetched from the author's PDS, reads the workflows at
that commit from the target repo's knot, compiles them with the
``pull_request`` trigger and accepts the pipeline, consuming the queued event
in the same transaction, so each event makes at most one pipeline.

A failure that may pass (a PDS or knot not answering) leaves the event queued
and is tried again with a growing delay, up to ``ATTEMPTS`` times; anything
else is logged and the event dropped.
"""

from __future__ import annotations

import re
import threading
import zlib
from urllib.parse import quote, urlsplit

from .. import logs, retry
from ..auth import ServiceAuth
from ..net import HostRefused, vet_host, vetted_get
from ..store import Directory, Pull, PullTrigger, Repo
from .accept import Acceptor, NewPipeline, compile_pipeline
from .compiler import PULL_REQUEST, Trigger
from .fetch import FetchError, WorkflowFetcher

log = logs.get("pulls")

ATTEMPTS = 5
RETRY_SECONDS = (1.0, 3.0, 10.0, 30.0)
MAX_PATCH_BLOB = 16 * 1024 * 1024  # gzip as stored on the PDS
MAX_PATCH_TEXT = 64 * 1024 * 1024  # once inflated
BLOB_TIMEOUT = 30.0
# `git format-patch` starts each commit with "From <sha> Mon Sep 17 00:00:00 2001".
_PATCH_FROM = re.compile(rb"^From ([0-9a-f]{40}) ", re.MULTILINE)


class Dropped(Exception):
    """This pull request event makes no pipeline; the message says why."""


class Later(Exception):
    """This event could not be handled now, but may be later."""


class PullRequests:
    def __init__(
        self,
        directory: Directory,
        acceptor: Acceptor,
        fetcher: WorkflowFetcher,
        auth: ServiceAuth,
        *,
        dev: bool,
        stop: threading.Event,
    ) -> None:
        self._directory = directory
        self._acceptor = acceptor
        self._fetcher = fetcher
        self._auth = auth
        self._dev = dev
        self._stop = stop
        self._wake = threading.Event()
        self._attempts: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name="pull-requests", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """New events are queued (called by the applier after its commit)."""
        self._wake.set()

    def join(self, timeout: float) -> None:
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._next()
                if event is None:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                self._handle(event)
            except Exception:
                log.exception("pull request worker failed; carrying on")
                self._stop.wait(1.0)

    def _next(self) -> PullTrigger | None:
        return PullTrigger.select().order_by(PullTrigger.id).first()

    def _handle(self, event: PullTrigger) -> None:
        ids = {
            "did": event.pull_did,
            "pull": event.pull_rkey,
            "action": event.action,
            "actor": event.actor,
        }
        try:
            new = self._pipeline_for(event, ids)
        except Dropped as exc:
            log.info("pull request event makes no pipeline", extra={**ids, "reason": str(exc)})
            self._drop(event)
            return
        except Later as exc:
            attempt = self._attempts.get(event.id, 0) + 1
            self._attempts[event.id] = attempt
            if attempt >= ATTEMPTS:
                log.error("pull request event dropped", extra={**ids, "reason": str(exc)})
                self._drop(event)
                return
            log.warning("pull request event delayed", extra={**ids, "reason": str(exc)})
            self._stop.wait(RETRY_SECONDS[attempt - 1])
            return
        self._acceptor.accept(new)
        self._attempts.pop(event.id, None)

    def _drop(self, event: PullTrigger) -> None:
        self._attempts.pop(event.id, None)
        retry.store_writes(self._stop, log, "store busy, retrying")(
            lambda: PullTrigger.delete().where(PullTrigger.id == event.id).execute()
        )

    def _pipeline_for(self, event: PullTrigger, ids: dict) -> NewPipeline:
        pull = Pull.get_or_none((Pull.did == event.pull_did) & (Pull.rkey == event.pull_rkey))
        if pull is None:
            raise Dropped("the pull request record is not known here")
        repo = self._directory.repo_by_did(pull.target_repo_did)
        if repo is None:
            raise Dropped("the target repo is not served by this spindle")
        if not self._directory.may_push(repo, pull.did):
            raise Dropped("the pull request's author has no push rights on the repo")
        if event.actor != pull.did and not self._directory.may_push(repo, event.actor):
            raise Dropped("the status change's author has no push rights on the repo")
        sha = self.source_sha(pull)
        data = {
            "action": event.action,
            "sourceBranch": pull.source_branch,
            "targetBranch": pull.target_branch,
            "sourceSha": sha,
            "pull": pull.at_uri,
        }
        new = compile_pipeline(
            self._fetcher,
            repo,
            Trigger(PULL_REQUEST, data),
            self._workflow_files(repo, sha),
            pull_trigger_id=event.id,
            ids=ids | {"repo_did": repo.repo_did, "sha": sha},
        )
        if new is None:
            raise Dropped("no workflow matches the pull request")
        return new

    def _workflow_files(self, repo: Repo, sha: str) -> dict[str, str]:
        try:
            return self._fetcher.workflow_files(repo.knot, repo.knot_path, sha)
        except FetchError as exc:
            raise (Later if exc.transient else Dropped)(f"workflow fetch: {exc}") from None

    def source_sha(self, pull: Pull) -> str:
        """The last commit of the latest round's patch, from the author's PDS."""
        try:
            pds = self._auth.pds_endpoint(pull.did)
            host = urlsplit(pds).netloc
            vet_host(host, self._dev)
            url = (
                f"{pds}/xrpc/com.atproto.sync.getBlob?did={quote(pull.did, safe=':')}"
                f"&cid={quote(pull.patch_blob)}"
            )
            blob = vetted_get(url, self._dev, BLOB_TIMEOUT, MAX_PATCH_BLOB)
        except HostRefused as exc:
            raise Dropped(f"the author's PDS is refused: {exc}") from None
        except LookupError as exc:
            raise Later(f"the author's PDS is unknown: {exc}") from None
        except (OSError, ValueError) as exc:
            raise Later(f"patch blob not fetched: {exc}") from None
        return last_patch_commit(blob)


def last_patch_commit(blob: bytes) -> str:
    """The sha of the last ``From <sha>`` header in a (gzipped) format-patch."""
    text = blob
    if blob[:2] == b"\x1f\x8b":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            text = inflater.decompress(blob, MAX_PATCH_TEXT)
        except zlib.error as exc:
            raise Dropped(f"patch blob is not valid gzip: {exc}") from None
        if inflater.unconsumed_tail:
            raise Dropped(f"patch larger than {MAX_PATCH_TEXT} bytes")
    shas = _PATCH_FROM.findall(text)
    if not shas:
        raise Dropped("patch names no commit (no 'From <sha>' line)")
    return shas[-1].decode()
