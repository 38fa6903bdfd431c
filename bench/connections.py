"""Many connections at once: /events subscribers, idle knots, idle clients.

A real tack process follows ``BENCH_KNOTS`` idle knots (each its own port on
127.0.0.1, served by one selector thread here that completes the websocket
handshake and then says nothing), while ``BENCH_SUBSCRIBERS`` clients
subscribe to /events. Reported: tack's RSS, threads and descriptors. Then,
with ``BENCH_IDLE`` more connections open and silent, ``GET /`` is timed;
the floor is the same request with none of them open (same run), and the
two alternate ``BENCH_RUNS`` times.

Targets on 2 cores: 2,000 subscribers and 2,000 idle knots served at once;
``GET /`` under 100 ms with 1,000 idle connections open.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time

import websocket
from _common import RUNS, BenchTack, Latency, report
from websockets.server import ServerProtocol

from tests.standins import OWNER, REPO, Clock, JetstreamStandin, commit, repo

KNOTS = int(os.environ.get("BENCH_KNOTS", "2000"))
SUBSCRIBERS = int(os.environ.get("BENCH_SUBSCRIBERS", "2000"))
IDLE = int(os.environ.get("BENCH_IDLE", "1000"))


class IdleKnots:
    """Many knot ports on 127.0.0.1; every stream is accepted and left quiet."""

    def __init__(self, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.listeners = []
        self.streams = 0
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, "listen")
            self.listeners.append(sock)
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def names(self) -> list[str]:
        return [f"127.0.0.1:{sock.getsockname()[1]}" for sock in self.listeners]

    def drop_all(self) -> int:
        """Close every stream at once, as a network blip on tack's side would;
        how many were open. The ports keep accepting."""
        held, self._held = self._held, []
        for conn in held:
            conn.close()
        return len(held)

    def _serve(self) -> None:
        while True:
            for key, _ in self.selector.select(1.0):
                if key.data == "listen":
                    conn, _ = key.fileobj.accept()
                    conn.setblocking(True)
                    conn.settimeout(5)
                    self._handshake(conn)

    def _handshake(self, conn: socket.socket) -> None:
        protocol = ServerProtocol()
        try:
            events: list = []
            while not events:
                protocol.receive_data(conn.recv(65536))
                events = protocol.events_received()
            request = events[0]
            protocol.send_response(protocol.accept(request))
            conn.sendall(b"".join(protocol.data_to_send()))
            self._held.append(conn)
            self.streams += 1
        except OSError:
            conn.close()


def process_figures(pid: int) -> tuple[float, int, int]:
    """(RSS MB, threads, open descriptors) of a process."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"]), descriptors


def time_banner(port: int, rounds: int = 50, timeout: float = 10) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while conn.recv(65536):
                pass
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    jetstream = JetstreamStandin()
    knots = IdleKnots(KNOTS)
    clock = Clock()
    for index, name in enumerate(knots.names()):
        jetstream.add(commit(clock, OWNER, REPO, f"r{index}", "create", repo(f"r{index}", name)))
    limit = str(KNOTS + SUBSCRIBERS + IDLE + 1000)
    tack = BenchTack(
        jetstream.url, TACK_MAX_CONNECTIONS=limit, TACK_MAX_CONNECTIONS_PER_CLIENT=limit
    )
    pid = tack.proc.proc.pid
    try:
        deadline = time.monotonic() + 180
        while knots.streams < KNOTS:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {knots.streams} of {KNOTS} knots followed in 180 s")
            time.sleep(0.2)
        subscribers = [
            websocket.create_connection(f"ws://127.0.0.1:{tack.port}/events", timeout=30)
            for _ in range(SUBSCRIBERS)
        ]
        time.sleep(2.0)  # settle
        rss, threads, descriptors = process_figures(pid)
        print(
            f"{KNOTS} idle knots and {SUBSCRIBERS} /events subscribers: RSS {rss:.0f} MB,"
            f" {threads} threads, {descriptors} descriptors"
        )
        time_banner(tack.port, 20)  # warm up
        floor_runs, loaded_runs = [], []
        for _ in range(RUNS):
            floor_runs.append(time_banner(tack.port))  # the same, without the idle connections
            idle = [socket.create_connection(("127.0.0.1", tack.port)) for _ in range(IDLE)]
            time.sleep(1.0)
            loaded_runs.append(time_banner(tack.port))
            for conn in idle:
                conn.close()
            time.sleep(1.0)  # tack lets them go
        floor, loaded = Latency(floor_runs), Latency(loaded_runs)
        print(
            f"GET / with {IDLE} idle connections open: {loaded} (target < 100 ms);"
            f" with none: {floor}; p50 ratio {loaded.ratio_to(floor):.1f}"
        )
        for conn in subscribers:
            conn.close()
    finally:
        started = time.monotonic()
        code = tack.proc.terminate(timeout=120)
        print(f"tack stopped in {time.monotonic() - started:.1f} s (exit status {code})")
        jetstream.close()
    report(
        {
            "knots": KNOTS,
            "subscribers": SUBSCRIBERS,
            "rss_mb": round(rss),
            "threads": threads,
            "descriptors": descriptors,
            "banner": loaded.as_json(),
            "banner_floor": floor.as_json(),
        }
    )


if __name__ == "__main__":
    main()
