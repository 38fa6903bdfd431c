"""Identities for tests: DIDs with real signing keys minting real service-auth
JWTs, and one HTTP host serving their DID documents as a PLC directory
(``GET /<did>``) and as a did:web host (``GET /.well-known/did.json``), and
their records' blobs as a PDS (``GET /xrpc/com.atproto.sync.getBlob``).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from atproto_crypto.did import format_multikey
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .standins import HOSTNAME

SPINDLE_DID = f"did:web:{HOSTNAME}"
ORDERS = {
    "ES256K": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    "ES256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
}


class Identity:
    """A DID with a freshly generated signing key, able to mint service-auth JWTs."""

    def __init__(self, did: str, alg: str = "ES256K") -> None:
        self.did = did
        self.alg = alg
        curve = ec.SECP256K1() if alg == "ES256K" else ec.SECP256R1()
        self.key = ec.generate_private_key(curve)

    def document(self) -> dict:
        public = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        return {
            "@context": ["https://www.w3.org/ns/did/v1"],
            "id": self.did,
            "verificationMethod": [
                {
                    "id": f"{self.did}#atproto",
                    "type": "Multikey",
                    "controller": self.did,
                    "publicKeyMultibase": format_multikey(self.alg, public),
                }
            ],
        }

    def token(self, lxm: str | None, aud: str = SPINDLE_DID, exp_in: float = 60, key=None) -> str:
        header = {"alg": self.alg, "typ": "JWT"}
        payload = {
            "iss": self.did,
            "aud": aud,
            "iat": int(time.time()),
            "exp": int(time.time() + exp_in),
        }
        if lxm:
            payload["lxm"] = lxm
        signing_input = f"{_b64(json.dumps(header))}.{_b64(json.dumps(payload))}"
        der = (key or self.key).sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        order = ORDERS[self.alg]
        s = min(s, order - s)  # atproto requires low-S signatures
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{_b64(signature)}"


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class DocumentHost:
    """Serves DID documents: as a PLC directory (``GET /<did>``) and as a did:web
    host (``GET /.well-known/did.json``)."""

    def __init__(self) -> None:
        self.documents: dict[str, dict] = {}
        self.web_document: dict | None = None
        self.web_redirect: str | None = None
        self.requests = 0
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requests += 1
                parts = urlsplit(self.path)
                if parts.path == "/xrpc/com.atproto.sync.getBlob":
                    self._blob(parse_qs(parts.query))
                    return
                if parts.path == "/xrpc/com.atproto.repo.listRecords":
                    self._list(parse_qs(parts.query))
                    return
                if self.path == "/.well-known/did.json" and host.web_redirect:
                    self.send_response(302)
                    self.send_header("Location", host.web_redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/.well-known/did.json":
                    doc = host.web_document
                else:
                    doc = host.documents.get(self.path.lstrip("/"))
                body = json.dumps(doc or {"message": "DID not registered"}).encode()
                self.send_response(200 if doc else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _blob(self, query: dict) -> None:
                """As com.atproto.sync.getBlob: the blob's bytes, 400 BlobNotFound else
                (https://docs.bsky.app/docs/api/com-atproto-sync-get-blob)."""
                key = (query.get("did", [""])[0], query.get("cid", [""])[0])
                host.blob_requests.append(key)
                blob = host.blobs.get(key)
                status = 200 if blob is not None else 400
                body = blob if blob is not None else b'{"error":"BlobNotFound"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _list(self, query: dict) -> None:
                """As com.atproto.repo.listRecords: ``records`` of {uri, cid,
                value} and a ``cursor`` while more remain
                (https://docs.bsky.app/docs/api/com-atproto-repo-list-records)."""
                did = query.get("repo", [""])[0]
                collection = query.get("collection", [""])[0]
                limit = int(query.get("limit", ["50"])[0])
                start = int(query.get("cursor", ["0"])[0])
                host.list_requests.append((did, collection, start))
                listed = host.records.get((did, collection), [])
                page = listed[start : start + limit]
                answer: dict = {
                    "records": [
                        {
                            "uri": f"at://{did}/{collection}/{rkey}",
                            "cid": "bafy" + rkey,
                            "value": value,
                        }
                        for rkey, value in page
                    ]
                }
                if start + limit < len(listed):
                    answer["cursor"] = str(start + limit)
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        # (did, collection) -> [(rkey, record)]: what each author's PDS lists.
        self.records: dict[tuple[str, str], list[tuple[str, dict]]] = {}
        self.list_requests: list[tuple[str, str, int]] = []
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.blob_requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def register(self, identity: Identity, pds: bool = True) -> Identity:
        """Publish the identity's document; it names this host as its PDS."""
        document = identity.document()
        if pds:
            document["service"] = [
                {
                    "id": "#atproto_pds",
                    "type": "AtprotoPersonalDataServer",
                    "serviceEndpoint": self.url,
                }
            ]
        self.documents[identity.did] = document
        return identity
