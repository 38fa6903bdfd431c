"""What the benchmarks share: a real tack process beside loopback stand-ins."""

from __future__ import annotations

import atexit
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.spindle_clients import EventsClient
from tests.standins import (
    OWNER,
    REPO,
    Clock,
    JetstreamStandin,
    KnotStandin,
    TackProcess,
    commit,
    repo,
    tack_env,
)

# How many times each benchmark repeats its measurement (median and spread).
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


class BenchTack:
    """``python -m tack`` in a temporary directory, quiet logs, its port known."""

    def __init__(self, jetstream_url: str, **env: str) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        path = Path(self._tmp.name)
        settings = tack_env(path, jetstream_url, TACK_LOG_LEVEL="info", **env)
        self.proc = TackProcess(settings, path / "tack.log")
        # A benchmark that fails half-way must not leave tack running: it
        # would load the machine under every later measurement.
        atexit.register(self._kill)
        self.port = self.proc.wait_for_log("listening", timeout=30)["port"]
        self.db_path = path / "spindle.db"

    def rss_mb(self) -> tuple[float, float]:
        """(current, peak) resident set size in MB."""
        fields = {}
        with open(f"/proc/{self.proc.proc.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                fields[key] = value
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self._tmp.cleanup()

    def _kill(self) -> None:
        if self.proc.proc.poll() is None:
            self.proc.proc.kill()


class PendingWatch:
    """Reads /events live (no backfill: only what happens from now on) and
    notes when each pipeline's first ``pending`` arrives, and each compiled
    pipeline's commit (from its ``sh.tangled.pipeline`` frame)."""

    def __init__(self, port: int) -> None:
        self._client = EventsClient(port, cursor=None)
        self._seen = threading.Condition()
        self.pending_at: dict[str, float] = {}
        self._sha_of: dict[str, str] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                frame = json.loads(self._client.ws.recv())
            except Exception:
                return  # tack stopped
            now = time.perf_counter()
            event = frame["event"]
            with self._seen:
                if frame["nsid"] == "sh.tangled.pipeline":
                    self._sha_of[frame["rkey"]] = event["triggerMetadata"]["push"]["newSha"]
                elif event.get("status") == "pending":
                    self.pending_at.setdefault(event["pipeline"].rsplit("/", 1)[1], now)
                self._seen.notify_all()

    def wait_for(self, rkey: str, timeout: float = 10.0) -> float:
        """When pipeline ``rkey``'s first ``pending`` arrived."""
        with self._seen:
            if not self._seen.wait_for(lambda: rkey in self.pending_at, timeout):
                raise SystemExit(f"no pending frame for pipeline {rkey}")
            return self.pending_at[rkey]

    def wait_for_sha(self, sha: str, timeout: float = 30.0) -> float:
        """When the first ``pending`` of the pipeline tack compiled for ``sha`` arrived."""

        def arrived() -> float | None:
            for rkey, pipeline_sha in self._sha_of.items():
                if pipeline_sha == sha and rkey in self.pending_at:
                    return self.pending_at[rkey]
            return None

        with self._seen:
            if not self._seen.wait_for(lambda: arrived() is not None, timeout):
                raise SystemExit(f"no pending status for {sha}")
            return arrived()


def insert_rows(db, table: str, columns: str, rows) -> None:
    """Rows written straight into one of tack's tables: a benchmark's store
    filled without going through intake (which would measure intake)."""
    placeholders = ", ".join("?" for _ in columns.split(","))
    db.cursor().executemany(f"INSERT INTO {table} ({columns}) VALUES ({placeholders})", rows)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


class Spread:
    """Repeated measurements of one figure: its median and its range."""

    def __init__(self, values: list[float]) -> None:
        self.values = sorted(values)
        self.median = statistics.median(self.values)
        self.low, self.high = self.values[0], self.values[-1]

    def __str__(self) -> str:
        return (
            f"{self.median:,.0f} (median of {len(self.values)},"
            f" spread {self.low:,.0f}-{self.high:,.0f})"
        )

    def __format__(self, spec: str) -> str:
        """``f"{spread:.2f}"`` formats the median and the range alike; no spec
        is ``str``'s thousands-grouped whole numbers."""
        if not spec:
            return str(self)
        return (
            f"{self.median:{spec}} (median of {len(self.values)},"
            f" spread {self.low:{spec}}-{self.high:{spec}})"
        )

    def ratio_to(self, floor: Spread) -> float:
        """This figure against its floor, median to median."""
        return self.median / floor.median

    def as_json(self) -> dict:
        return {
            "median": round(self.median, 2),
            "low": round(self.low, 2),
            "high": round(self.high, 2),
        }


class Latency:
    """Repeated runs of one latency: the median and range of each run's p50
    and of each run's p99 (milliseconds)."""

    def __init__(self, runs: list[list[float]]) -> None:
        self.p50 = Spread([percentile(run, 0.5) for run in runs])
        self.p99 = Spread([percentile(run, 0.99) for run in runs])

    def __str__(self) -> str:
        return f"p50 {self.p50:.1f} ms, p99 {self.p99:.1f} ms"

    def ratio_to(self, floor: Latency) -> float:
        """p50 against the floor's, medians of the runs."""
        return self.p50.ratio_to(floor.p50)

    def as_json(self) -> dict:
        return {"p50_ms": self.p50.as_json(), "p99_ms": self.p99.as_json()}


def repeated(measure: Callable[[], float], runs: int) -> Spread:
    """``measure`` run ``runs`` times: one run alone says little on a shared machine."""
    return Spread([measure() for _ in range(runs)])


def count_frames(sock, opcode_wanted: int, until: int | None = None) -> tuple[int, bytes, bytes]:
    """Counts a stream's data frames of one opcode as fast as the socket
    delivers them, to its close frame or to ``until`` frames: (count, first
    payload, last payload).

    websocket-client's per-frame cost (~25 us) would cap any server at about
    40,000 frames/s, so this reads the socket in large chunks and walks the
    frame headers (server frames are unmasked, RFC 6455 §5.2).
    """
    buffer, position, count = b"", 0, 0
    first = last = b""
    while until is None or count < until:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise SystemExit("the stream ended without a close frame")
        buffer = buffer[position:] + chunk
        position = 0
        while len(buffer) - position >= 2:
            opcode, length = buffer[position] & 0x0F, buffer[position + 1] & 0x7F
            extra = {126: 2, 127: 8}.get(length, 0)
            start = position + 2 + extra
            if start > len(buffer):
                break
            if extra:
                length = int.from_bytes(buffer[position + 2 : start], "big")
            if start + length > len(buffer):
                break
            if opcode == 0x8:
                return count, first, last
            if opcode == opcode_wanted:
                last = buffer[start : start + length]
                first = first or last
                count += 1
            position = start + length
    return count, first, last


def report(result: dict) -> None:
    """Benchmarks end with one JSON object on the last line."""
    print(json.dumps(result))


def tack_serving_one_repo(**env: str) -> tuple[BenchTack, KnotStandin, str]:
    """A tack process following a knot stand-in that hosts OWNER's repo; (tack, knot, repo)."""
    jetstream, knot = JetstreamStandin(), KnotStandin()
    jetstream.add(commit(Clock(), OWNER, REPO, "r1", "create", repo("bench", knot.name)))
    tack = BenchTack(jetstream.url, **env)
    while knot.open_connections < 1:
        time.sleep(0.01)
    return tack, knot, "bench"
