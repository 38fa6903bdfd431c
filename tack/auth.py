"""atproto service auth: who is calling an XRPC method.

The caller sends ``Authorization: Bearer <JWT>`` signed with the signing key
in its DID document. Verification (signature, ES256K/ES256, key formats) is
the ``atproto`` package's; tack adds what the spindle needs on top: the
token must be addressed to this spindle (``aud``), must expire (``exp``),
must name this method when it names one (``lxm``), and must come from a
``did:plc`` or ``did:web`` identity (a ``did:key`` would vouch for itself).

DID documents are cached; on a signature failure the document is fetched
once more (the key may have rotated). Resolution has a timeout, and any
failure to resolve is a 401 with the reason, never a hang. Outside dev mode
did:web names get the same vetting as knot names (no IP literals or local
names), so a token cannot make tack fetch from inside the network.
"""

from __future__ import annotations

import time
from urllib.parse import unquote

from atproto_identity.cache.in_memory_cache import DidInMemoryCache
from atproto_identity.did.resolver import DidResolver
from atproto_identity.did.resolvers.web_resolver import DidWebResolver
from atproto_identity.exceptions import DidWebResolverError
from atproto_server.auth import jwt as atproto_jwt

from . import logs
from .knots import KnotRefused, vet_knot

log = logs.get("auth")

RESOLVE_TIMEOUT = 5.0
CACHE_SECONDS = 3600
MAX_TOKEN = 8192


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
            vet_knot(host, self._dev)
        except KnotRefused as exc:
            raise DidWebResolverError(f"refused did:web host: {exc}") from None
        scheme = "http" if self._dev else "https"
        return f"{scheme}://{host}/.well-known/did.json"


class _Resolver(DidResolver):
    def __init__(self, plc_url: str, timeout: float, dev: bool) -> None:
        super().__init__(plc_url, timeout, DidInMemoryCache(max_ttl=CACHE_SECONDS))
        self._methods["web"] = _WebResolver(timeout, dev)


class ServiceAuth:
    def __init__(
        self, service_did: str, plc_url: str, dev: bool, timeout: float = RESOLVE_TIMEOUT
    ) -> None:
        self.service_did = service_did
        self._resolver = _Resolver(plc_url, timeout, dev)

    def caller(self, authorization: str | None, method: str) -> str:
        """The DID that signed the request's token for ``method``; raises AuthError."""
        token = _bearer(authorization)
        try:
            payload = atproto_jwt.verify_jwt(token, self._signing_key, own_did=self.service_did)
        except AuthError:
            raise
        except atproto_jwt.TokenExpiredSignatureError:
            raise AuthError("token expired") from None
        except atproto_jwt.TokenInvalidAudienceError:
            raise AuthError(
                f"token is not for this spindle (aud must be {self.service_did})"
            ) from None
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
        if payload.exp is None or payload.exp <= time.time():
            raise AuthError("token must carry an expiry in the future")
        lxm = getattr(payload, "lxm", None)
        if lxm is not None and lxm != method:
            raise AuthError(f"token is for {lxm}, not {method}")
        return payload.iss

    def _signing_key(self, did: str, force_refresh: bool) -> str:
        if not did.startswith(("did:plc:", "did:web:")):
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
