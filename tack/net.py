"""Vetted network access: the one way tack reaches a host named by untrusted input.

Knots, did:web hosts and PDSes are named in records anyone can write. Outside
dev mode tack refuses IP literals and local names, resolves the name itself,
keeps only public addresses, and connects to the very address it checked, so
a second DNS lookup (rebinding) cannot steer it into the operator's network.
Everything fetched has a size cap and a deadline.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from .config import is_hostname


class HostRefused(Exception):
    """A host tack will not connect to (bad name, private address): permanent."""


def vet_host(host_port: str, dev: bool) -> None:
    """Raise HostRefused unless ``host_port`` is a ``hostname[:port]`` we may contact."""
    if not is_hostname(host_port):
        raise HostRefused("not a hostname[:port]")
    if dev:
        return
    host = host_port.rsplit(":", 1)[0] if ":" in host_port else host_port
    if _is_ip_literal(host):
        raise HostRefused("IP literals are refused outside dev mode")
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        raise HostRefused("local names are refused outside dev mode")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def vetted_addresses(host: str, port: int, dev: bool) -> list[tuple]:
    """getaddrinfo results tack may connect to: all in dev mode, else public ones."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [info for info in infos if dev or is_public(info[4][0])]
    if not addresses:
        raise HostRefused(f"{host} resolves only to non-public addresses")
    return addresses


# IPv6 ranges that carry an IPv4 address inside: the address that counts is
# the embedded one (NAT64 64:ff9b::/96 and 64:ff9b:1::/48 at the end, 6to4
# 2002::/16 after the prefix; mapped and compatible ::/96 forms at the end).
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_COMPATIBLE = ipaddress.ip_network("::/96")


def is_public(address: str) -> bool:
    """A globally routable address, judged by the IPv4 address an IPv6 one
    embeds where it embeds one (a NAT64 prefix reaches 127.0.0.1 as well)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return embedded.is_global
    return ip.is_global


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in network for network in (*_NAT64, _COMPATIBLE)):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


# How much a one-byte read takes in at once (see ``_ReadAhead``).
READ_AHEAD_BYTES = 4096


class _ReadAhead:
    """A socket whose one-byte reads are served from a read-ahead buffer.

    websocket-client reads the handshake's answer a byte at a time: some 200
    system calls (or OpenSSL reads) per connection, each giving up and taking
    back the interpreter lock. With hundreds of knots reconnecting together,
    those hand-overs kept both cores busy in the kernel. Reading ahead loses
    nothing: what came after the answer (the first frames) is served from the
    buffer, in order, before the socket is read again, whichever read asks.
    """

    _ahead = b""
    _taken = 0  # how much of ``_ahead`` was served

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._taken < len(self._ahead):
            data = self._ahead[self._taken : self._taken + bufsize]
            self._taken += len(data)
            return data
        if bufsize == 1 and not flags:
            self._ahead, self._taken = super().recv(READ_AHEAD_BYTES), 1  # type: ignore[misc]
            return self._ahead[:1]
        return super().recv(bufsize, flags)  # type: ignore[misc]

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self._taken < len(self._ahead):
            view = memoryview(buffer).cast("B")
            size = min(nbytes or len(view), len(self._ahead) - self._taken)
            view[:size] = self._ahead[self._taken : self._taken + size]
            self._taken += size
            return size
        return super().recv_into(buffer, nbytes, flags)  # type: ignore[misc]


class _ReadAheadSocket(_ReadAhead, socket.socket):
    pass


class _ReadAheadSSLSocket(_ReadAhead, ssl.SSLSocket):
    pass


def open_vetted_socket(url: str, dev: bool, timeout: float = 10.0) -> socket.socket:
    """Resolve, refuse non-public addresses (outside dev), connect, and do TLS
    (for ``wss://`` and ``https://``)."""
    parts = urlsplit(url)
    host, secure = parts.hostname or "", parts.scheme in ("wss", "https")
    port = parts.port or (443 if secure else 80)
    error: OSError | None = None
    for family, kind, proto, _, address in vetted_addresses(host, port, dev):
        sock = _ReadAheadSocket(family, kind, proto)  # as create_connection: each in turn
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        try:
            if secure:
                context = ssl.create_default_context()
                context.sslsocket_class = _ReadAheadSSLSocket
                sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return sock
    assert error is not None
    raise error


def vetted_get(url: str, dev: bool, timeout: float, max_bytes: int) -> bytes:
    """GET ``url`` over a vetted connection: no redirects (one could point
    anywhere), at most ``max_bytes``, and one deadline for the whole exchange."""
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    # TLS, when https, is already done on the socket, for this very host name.
    connection.sock = open_vetted_socket(url, dev, timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", path or "/", headers={"Accept": "application/json, */*"})
        response = connection.getresponse()
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        body = bytearray()
        while len(body) <= max_bytes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete answer within {timeout:g}s")
            chunk = response.read1(64 * 1024)
            if not chunk:
                break
            body += chunk
    finally:
        connection.close()
    if len(body) > max_bytes:
        raise ValueError(f"answer larger than {max_bytes} bytes")
    return bytes(body)


def vetted_get_json(url: str, dev: bool, timeout: float, max_bytes: int) -> dict[str, Any]:
    """``vetted_get`` of a JSON object; any malformed answer is a ValueError."""
    body = vetted_get(url, dev, timeout, max_bytes)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"answer is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError("answer is not a JSON object")
    return document
