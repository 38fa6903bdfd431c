"""git against a knot, safely: the settings every git tack runs carries.

Knots and the repositories on them are untrusted. git talks only to the
address tack vetted for the knot (``http.curloptResolve``), over https (http
in dev mode), follows no redirects, asks for no credentials and runs no
hooks.
"""

from __future__ import annotations

from .net import HostRefused, vet_host, vetted_addresses


def pin_knot(knot: str, dev: bool) -> str:
    """The ``http.curloptResolve`` entry (``host:port:address``) pinning
    ``knot`` to an address tack may connect to.

    Raises HostRefused when the knot's name or every address it resolves to
    is refused, OSError when it does not resolve.
    """
    vet_host(knot, dev)
    host, _, port_text = knot.partition(":")
    port = int(port_text) if port_text else (80 if dev else 443)
    address = vetted_addresses(host, port, dev)[0][4][0]
    pinned = f"[{address}]" if ":" in address else address
    return f"{host}:{port}:{pinned}"


def safe_settings(dev: bool, resolve: str) -> list[str]:
    """``-c`` options for one git command talking to a knot."""
    allowed = "http" if dev else "https"
    settings = [
        "-c", "protocol.allow=never",
        "-c", f"protocol.{allowed}.allow=always",
        "-c", "http.followRedirects=false",
        "-c", "credential.helper=",
        "-c", "core.hooksPath=/dev/null",
        "-c", "http.lowSpeedLimit=1024",
        "-c", "http.lowSpeedTime=15",
    ]  # fmt: skip
    if resolve:
        settings += ["-c", f"http.curloptResolve={resolve}"]
    return settings


__all__ = ["HostRefused", "pin_knot", "safe_settings"]
