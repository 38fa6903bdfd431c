"""Reading ``.tangled/workflows`` at a commit, from the repo's knot.

Today's knots hand the spindle a ref update, not compiled workflows, so tack
reads the workflow files itself (protocol-2026 §5.3). It keeps one bare,
partial mirror per repository and fetches only what it needs with git's
partial, shallow fetch: the commit and its trees in one round trip
(``--depth=1 --filter=blob:none``; fetching the commit alone left its trees
to a second one, and a lazy fetch of a tree brings every tree below it
anyway), then, lazily, the blobs of the regular files directly in
``.tangled/workflows`` that the mirror does not hold yet. This works with
git 2.39 (no ``--revision``).

Bounds and safety, because the knot and the repository are untrusted:

- git connects only to the address tack vetted (``http.curloptResolve``), over
  https (http in dev mode), follows no redirects, asks for no credentials;
- every git command has a deadline and runs in its own process group, which
  is killed when the deadline passes; files git writes are capped in size;
- nothing is checked out and no hook runs (a bare mirror, hooks disabled);
- mirrors are named by a hash of the repository's path, never by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from urllib.parse import quote

from .. import logs
from ..git import HostRefused, pin_knot, safe_settings
from ..net import vet_host, vetted_get_json
from ..workflow import UNREADABLE

log = logs.get("fetch")

WORKFLOW_DIR = ".tangled/workflows"
GIT_TIMEOUT = 60.0
MAX_FILE_BYTES = 256 * 1024  # a workflow file; larger ones fail that workflow
MAX_WORKFLOW_FILES = 50  # the lexicon's bound on a pipeline's workflows
MAX_WRITE_BYTES = 256 * 1024 * 1024  # any one file git writes (a pack)
MAX_PACKS = 256  # a mirror's packs, beyond which it is renewed
_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPO_PATH = re.compile(r"^did:[a-z]+:[A-Za-z0-9._:%-]{1,2040}(/[A-Za-z0-9._-]{1,255})?$")


class FetchError(Exception):
    """The workflow files could not be read; the message says why.

    ``transient`` tells whether trying again later may help (the knot was
    unreachable) or not (the commit does not exist, the name is refused).
    """

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class WorkflowFetcher:
    def __init__(
        self, cache_dir: Path, dev: bool, timeout: float = GIT_TIMEOUT, max_packs: int = MAX_PACKS
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.dev = dev
        self.timeout = timeout
        self.max_packs = max_packs
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # --- the public questions ---------------------------------------------------------

    def workflow_files(self, knot: str, repo_path: str, sha: str) -> dict[str, str]:
        """The regular files directly in ``.tangled/workflows`` at ``sha``, by name.

        ``repo_path`` is the repo DID (today's knots) or ``owner/name`` (older
        ones). A file over the size cap or not UTF-8 comes back marked
        unreadable, so the compiler fails that workflow and runs the others.
        """
        if not _SHA.match(sha):
            raise FetchError(f"not a commit id: {sha[:60]!r}", transient=False)
        if not _REPO_PATH.match(repo_path):
            raise FetchError("not a repository path tack can fetch", transient=False)
        url, resolve = self._remote(knot, repo_path)
        mirror = self.cache_dir / hashlib.sha256(f"{knot}/{repo_path}".encode()).hexdigest()[:32]
        with self._lock_for(str(mirror)):
            self._ensure_mirror(mirror, url)
            git = _Git(mirror, resolve, self.dev, self.timeout)
            if not git.has_commit(sha):
                git.fetch_commit(sha)
            entries = git.list_workflow_dir(sha)
            files = git.read_blobs(entries)
            self._renew_when_grown(git, knot, repo_path)
            return files

    def default_branch(self, knot: str, repo_did: str) -> str:
        """The knot's answer to ``sh.tangled.repo.getDefaultBranch``; "" when it has none."""
        scheme = "http" if self.dev else "https"
        url = (
            f"{scheme}://{knot}/xrpc/sh.tangled.repo.getDefaultBranch?repo="
            f"{quote(repo_did, safe=':')}"
        )
        try:
            vet_host(knot, self.dev)
            answer = vetted_get_json(url, self.dev, 10.0, 64 * 1024)
        except (OSError, ValueError, HostRefused) as exc:
            log.info(
                "default branch unknown",
                extra={"knot": knot, "repo_did": repo_did, "reason": str(exc)[:200]},
            )
            return ""
        name = answer.get("name")
        return name if isinstance(name, str) and 0 < len(name) <= 255 else ""

    # --- helpers ------------------------------------------------------------------------

    def _remote(self, knot: str, repo_path: str) -> tuple[str, str]:
        """The remote URL and the curl resolve entry pinning it to a vetted address."""
        try:
            resolve = pin_knot(knot, self.dev)
        except HostRefused as exc:
            raise FetchError(f"knot {knot!r} refused: {exc}", transient=False) from None
        except OSError as exc:
            raise FetchError(f"knot {knot!r} does not resolve: {exc}") from None
        scheme = "http" if self.dev else "https"
        return f"{scheme}://{knot}/{repo_path}", resolve

    def _renew_when_grown(self, git: _Git, knot: str, repo_path: str) -> None:
        """Throw the mirror away once it holds more than ``max_packs`` packs; the
        next push fetches into a new one.

        Each push leaves packs (the commit, its trees, its files) and a line in
        the shallow file, which every later fetch sends to the knot. A mirror
        is only a cache, and a cold fetch of one commit costs little more than
        a warm one, so starting afresh now and then keeps every push's cost
        flat (git's own gc is off: see ``_Git``).
        """
        packs = git.mirror / "objects" / "pack"
        count = sum(1 for entry in os.scandir(packs) if entry.name.endswith(".pack"))
        if count <= self.max_packs:
            return
        shutil.rmtree(git.mirror, ignore_errors=True)
        log.info("mirror renewed", extra={"knot": knot, "repo": repo_path, "packs": count})

    def _lock_for(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _ensure_mirror(self, mirror: Path, url: str) -> None:
        if (mirror / "config").exists():
            return
        tmp = mirror.with_name(mirror.name + ".new")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        _Git(tmp, "", self.dev, self.timeout).init(url)
        os.replace(tmp, mirror)


def mirror_config(url: str) -> list[tuple[str, str]]:
    """A partial clone's settings: objects missing from the shallow, tree-less
    fetch are fetched from ``origin`` when git needs them."""
    return [
        ("core.repositoryformatversion", "1"),
        ("remote.origin.url", url),
        ("remote.origin.promisor", "true"),
        ("remote.origin.partialclonefilter", "blob:none"),
        ("extensions.partialClone", "origin"),
    ]


class _Git:
    """git in one mirror, with tack's safety settings on every call."""

    def __init__(self, mirror: Path, resolve: str, dev: bool, timeout: float) -> None:
        self.mirror = mirror
        self.timeout = timeout
        self.settings = [
            *safe_settings(dev, resolve),
            # No detached gc or maintenance: it would rewrite the shallow file
            # under the next fetch, outside the mirror's lock.
            "-c", "gc.auto=0",
            "-c", "maintenance.auto=false",
        ]  # fmt: skip
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(mirror.parent),
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_ASKPASS": "true",
            "LC_ALL": "C",
        }

    def init(self, url: str) -> None:
        subprocess.run(["git", "init", "-q", "--bare", str(self.mirror)], env=self.env, check=True)
        for key, value in mirror_config(url):
            self.run("config", key, value)

    def run(self, *args: str, stdin: bytes | None = None) -> bytes:
        argv = ["prlimit", f"--fsize={MAX_WRITE_BYTES}", "git", *self.settings, *args]
        if shutil.which("prlimit") is None:
            argv = argv[2:]
        proc = subprocess.Popen(
            argv,
            cwd=self.mirror,
            env=self.env,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(stdin, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise FetchError(f"git {args[0]} took longer than {self.timeout:g}s") from None
        if proc.returncode != 0:
            message = err.decode("utf-8", "replace").strip().splitlines()
            raise FetchError(f"git {args[0]} failed: {(message or ['?'])[-1][:300]}")
        return out

    def fetch_commit(self, sha: str) -> None:
        """The commit and its trees, without history, in one round trip.

        No "have" lines are sent (noop negotiation): a depth-1 fetch needs
        none, and they would grow with the mirror.
        """
        self.run(
            "-c", "fetch.negotiationAlgorithm=noop",
            "fetch", "-q", "--depth=1", "--filter=blob:none", "--no-tags", "origin", sha,
        )  # fmt: skip

    def has_commit(self, sha: str) -> bool:
        """Whether the mirror holds the commit, without fetching it.

        Not ``cat-file -e``: in a partial clone, asking for a missing object
        fetches it from the knot with all the history behind it (a lazy
        fetch has no depth), so each push cost more than the one before.
        ``rev-list --missing`` never fetches.
        """
        try:
            self.run(
                "rev-list", "-n1", "--no-walk", "--missing=allow-any", f"{sha}^{{commit}}", "--"
            )
        except FetchError:
            return False
        return True

    def list_workflow_dir(self, sha: str) -> list[tuple[str, str]]:
        """(name, blob id) of the regular files directly in the workflow folder."""
        out = self.run("ls-tree", "-z", sha, f"{WORKFLOW_DIR}/")
        entries = []
        for record in out.split(b"\0"):
            if not record:
                continue
            meta, _, path = record.partition(b"\t")
            mode, kind, oid = meta.decode().split()
            name = path.decode("utf-8", "replace").rsplit("/", 1)[-1]
            if kind == "blob" and mode in ("100644", "100755"):
                entries.append((name, oid))
        return entries[: MAX_WORKFLOW_FILES + 1]

    def read_blobs(self, entries: list[tuple[str, str]]) -> dict[str, str]:
        if len(entries) > MAX_WORKFLOW_FILES:
            raise FetchError(
                f"more than {MAX_WORKFLOW_FILES} files in {WORKFLOW_DIR}", transient=False
            )
        if not entries:
            return {}
        # Two git processes for all the files (sizes, then the small ones),
        # not two per file.
        listed = "\n".join(oid for _, oid in entries).encode() + b"\n"
        sizes = dict(
            line.split()
            for line in self.run(
                "cat-file", "--batch-check=%(objectname) %(objectsize)", stdin=listed
            )
            .decode()
            .splitlines()
        )
        small = [oid for _, oid in entries if int(sizes[oid]) <= MAX_FILE_BYTES]
        contents = self._blobs(small) if small else {}
        files: dict[str, str] = {}
        for name, oid in entries:
            if oid not in contents:
                files[name] = _unreadable(f"larger than {MAX_FILE_BYTES} bytes")
                continue
            try:
                files[name] = contents[oid].decode("utf-8")
            except UnicodeDecodeError:
                files[name] = _unreadable("not UTF-8 text")
        return files

    def _blobs(self, oids: list[str]) -> dict[str, bytes]:
        """``git cat-file --batch``: each object as "<oid> <type> <size>\\n",
        its bytes, "\\n"."""
        out = self.run("cat-file", "--batch", stdin="\n".join(oids).encode() + b"\n")
        blobs, position = {}, 0
        for _ in oids:
            header_end = out.index(b"\n", position)
            oid, _kind, size = out[position:header_end].decode().split()
            start = header_end + 1
            blobs[oid] = out[start : start + int(size)]
            position = start + int(size) + 1
        return blobs


def _unreadable(reason: str) -> str:
    """A file the compiler must fail with ``reason`` (a NUL never starts YAML)."""
    return UNREADABLE + reason
