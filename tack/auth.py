"""atproto service auth: who is calling an XRPC method.

The caller sends ``Authorization: Bearer <JWT>`` signed with the signing key
in its DID document. Verification (signature, ES256K/ES256, key formats) is
the ``atproto`` package's; tack adds what the spindle needs on top: the
token must be addressed to this spindle (``aud``), must expire (``exp``),
must name this method when it names one (``lxm``), and must come from a
``did:plc`` or ``did:web`` identity (a ``did:key`` would vouch for itself).

DID documents are cached (at most ``CACHE_ENTRIES``, oldest out first); on a
signature failure the document is fetched once more (the key may have
rotated). Resolution has a timeout, and any failure to resolve is a 401 with
the reason, never a hang. Outside dev mode did:web hosts get the same vetting
as knots: the name (no IP literals or local names), then the address it
resolves to (public only), and the document is fetched from that very address,
so a token cannot make tack fetch from inside the network.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import unquote

import httpx
from atproto_identity.cache.in_memory_cache import DidInMemoryCache
from atproto_identity.did.resolver import DidResolver
from atproto_identity.did.resolvers.plc_resolver import DidPlcResolver
from atproto_identity.did.resolvers.web_resolver import DidWebResolver
from atproto_identity.exceptions import DidPlcResolverError, DidWebResolverError
from atproto_server.auth import jwt as atproto_jwt

from . import logs
from .net import HostRefused, vet_host, vetted_get_json

log = logs.get("auth")

RESOLVE_TIMEOUT = 5.0
CACHE_SECONDS = 3600
CACHE_ENTRIES = 10_000
MAX_TOKEN = 8192
MAX_DID_DOCUMENT = 64 * 1024
# Clock differences between the token's minter and us that are forgiven on
# ``iat`` and ``exp``, as the reference validator allows.
CLOCK_LEEWAY = 5
SERVICE_FRAGMENT = "#tangled_spindle"
PLC_DID = re.compile(r"^did:plc:[a-z2-7]{24}$")
WEB_DID = re.compile(r"^did:web:[A-Za-z0-9.-]{1,253}(%3[Aa][0-9]{1,5})?$")


class AuthError(Exception):
    """The request is not authenticated; ``str(exc)`` is safe to send back."""


class _WebResolver(DidWebResolver):
    """did:web with a port (``did:web:host%3A8080``), plain http only in dev mode."""

    def __init__(self, timeout: float, dev: bool) -> None:
        super().__init__(timeout)
        self._dev = dev

    def _parse_web_did(self, did: str) -> str:  # type: ignore[override]
        parts = did.split(":")[2:]
        if len(parts) != 1 or not parts[0]:
            raise DidWebResolverError(f"unsupported did:web {did}")
        host = unquote(parts[0]).lower()
        try:
            vet_host(host, self._dev)
        except HostRefused as exc:
            raise DidWebResolverError(f"refused did:web host: {exc}") from None
        scheme = "http" if self._dev else "https"
        return f"{scheme}://{host}/.well-known/did.json"

    def resolve_without_validation(self, did: str) -> dict[str, Any]:
        url = self._parse_web_did(did)
        try:
            return fetch_did_document(url, self._dev, self._timeout or RESOLVE_TIMEOUT)
        except HostRefused as exc:
            raise DidWebResolverError(f"refused did:web host: {exc}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise DidWebResolverError(f"cannot fetch {url}: {exc}") from None


def fetch_did_document(url: str, dev: bool, timeout: float) -> dict[str, Any]:
    """GET a did.json from the vetted address: no redirects, a size cap, and
    one deadline for the whole exchange."""
    return vetted_get_json(url, dev, timeout, MAX_DID_DOCUMENT)


class _BoundedCache(DidInMemoryCache):
    """The library's cache with a size cap: anyone can mint DIDs, and only
    the ones that resolved are cached, but the server must not grow without
    bound either way. Least recently stored goes first."""

    def __init__(self, max_entries: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cache: OrderedDict = OrderedDict()
        self._max_entries = max_entries
        self._guard = threading.Lock()

    def set(self, did: str, document: Any) -> None:
        with self._guard:
            super().set(did, document)
            self._cache.move_to_end(did)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)

    def delete(self, did: str) -> None:
        with self._guard:
            self._cache.pop(did, None)

    @property
    def entries(self) -> int:
        # Not __len__: the library tests the cache for truth ("if cache:").
        return len(self._cache)


class _PlcResolver(DidPlcResolver):
    """did:plc from the operator's PLC directory, streamed with a size cap and
    one deadline for the whole answer (the library reads any size, for as
    long as the server drips it)."""

    def resolve_without_validation(self, did: str) -> dict[str, Any] | None:
        if not PLC_DID.match(did):
            raise DidPlcResolverError(f"not a did:plc identifier: {did[:80]}")
        deadline = time.monotonic() + (self._timeout or RESOLVE_TIMEOUT)
        try:
            with self._client.stream("GET", f"{self._plc_url}/{did}", timeout=self._timeout) as r:
                if r.status_code == 404:
                    return None
                r.raise_for_status()
                body = bytearray()
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > MAX_DID_DOCUMENT:
                        raise DidPlcResolverError(f"document over {MAX_DID_DOCUMENT} bytes")
                    if time.monotonic() > deadline:
                        raise DidPlcResolverError("no complete document in time")
        except httpx.HTTPError as exc:
            raise DidPlcResolverError(f"cannot resolve {did}: {exc}") from None
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise DidPlcResolverError("document is not JSON") from None
        if not isinstance(document, dict):
            raise DidPlcResolverError("document is not a JSON object")
        return document


class _Resolver(DidResolver):
    def __init__(self, plc_url: str, timeout: float, dev: bool, cache_entries: int) -> None:
        self.cache = _BoundedCache(cache_entries, max_ttl=CACHE_SECONDS)
        super().__init__(plc_url, timeout, self.cache)
        self._methods["web"] = _WebResolver(timeout, dev)
        self._methods["plc"] = _PlcResolver(plc_url, timeout, self.cache)


class ServiceAuth:
    def __init__(
        self,
        service_did: str,
        plc_url: str,
        dev: bool,
        timeout: float = RESOLVE_TIMEOUT,
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        self.service_did = service_did
        self._resolver = _Resolver(plc_url, timeout, dev, cache_entries)

    @property
    def cached_identities(self) -> int:
        return self._resolver.cache.entries

    def caller(self, authorization: str | None, method: str, require_lxm: bool = False) -> str:
        """The DID that signed the request's token for ``method``; raises AuthError.

        ``require_lxm``: the token must name exactly this method (the
        ``sh.tangled.ci`` procedures, as the official validator requires).
        """
        token = _bearer(authorization)
        try:
            # The audience is checked before any DID is resolved: a token for
            # another service costs no network round trip.
            claimed = atproto_jwt.decode_jwt_payload(atproto_jwt.parse_jwt(token)[0])
            if claimed.aud not in self.audiences:
                raise AuthError(f"token is not for this spindle (aud must be {self.service_did})")
            payload = atproto_jwt.verify_jwt(token, self._signing_key, leeway=CLOCK_LEEWAY)
        except AuthError:
            raise
        except atproto_jwt.TokenExpiredSignatureError:
            raise AuthError("token expired") from None
        except atproto_jwt.TokenInvalidSignatureError:
            raise AuthError("bad token signature") from None
        except (
            atproto_jwt.TokenDecodeError,
            atproto_jwt.TokenImmatureSignatureError,
            atproto_jwt.TokenInvalidIssuedAtError,
        ):
            raise AuthError("malformed or not yet valid token") from None
        except Exception as exc:  # the library's other refusals (unsupported alg, key format…)
            log.info("token refused", extra={"reason": f"{type(exc).__name__}: {exc}"[:300]})
            raise AuthError("token could not be verified") from None
        if payload.exp is None or payload.exp <= time.time() - CLOCK_LEEWAY:
            raise AuthError("token must carry an expiry in the future")
        lxm = getattr(payload, "lxm", None)
        if lxm is None and require_lxm:
            raise AuthError(f"token must name the method it is for (lxm {method})")
        if lxm is not None and lxm != method:
            raise AuthError(f"token is for {lxm}, not {method}")
        return payload.iss

    @property
    def audiences(self) -> tuple[str, str]:
        """This spindle's DID, alone or with its service fragment (a PDS proxy
        mints tokens for ``did:web:<host>#tangled_spindle``)."""
        return (self.service_did, f"{self.service_did}{SERVICE_FRAGMENT}")

    def pds_endpoint(self, did: str) -> str:
        """The PDS that hosts ``did``'s records, from its DID document."""
        document = self._resolver.resolve(did)
        if document is None:
            raise LookupError(f"{did} does not resolve")
        for service in document.service or []:
            if service.id in ("#atproto_pds", f"{did}#atproto_pds"):
                return str(service.service_endpoint).rstrip("/")
        raise LookupError(f"{did} names no PDS")

    def _signing_key(self, did: str, force_refresh: bool) -> str:
        # Checked whole, not by prefix: the DID becomes part of a URL.
        if not (PLC_DID.match(did) or WEB_DID.match(did)):
            raise AuthError("token issuer must be a did:plc or did:web identity")
        try:
            return self._resolver.resolve_atproto_key(did, force_refresh)
        except Exception as exc:
            log.info(
                "issuer not resolved",
                extra={"did": did, "reason": f"{type(exc).__name__}: {exc}"[:300]},
            )
            raise AuthError(f"could not resolve the signing key of {did}") from None


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("authorization required: Bearer <service auth JWT>")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("authorization must be Bearer <service auth JWT>")
    if len(token) > MAX_TOKEN or token.count(".") != 2:
        raise AuthError("malformed token")
    return token
