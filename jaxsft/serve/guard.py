"""Who may use the server, checked before any route runs (ASGI middleware):

- API keys: with keys, every /v1/* request (and /metrics) needs `Authorization: Bearer <key>`,
  compared in constant time; otherwise 401 with OpenAI's error JSON. /health and the page stay
  open (the page asks for the key).
- Without keys, only local Host names (localhost, 127.0.0.1, [::1]) and those allowed with
  --allow-host are served: a web page elsewhere cannot use DNS rebinding to read the API.
- POST bodies must be JSON (415 otherwise): a web page can make a browser POST text/plain
  to any address without asking first, but not application/json.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Sequence

from starlette.responses import JSONResponse

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
PROTECTED = ("/v1/", "/metrics")


def error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": code}}, status_code=status, headers=headers)


def host_name(host: str) -> str:
    """A Host header without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware: keys (or local Host names), then the POST body's Content-Type."""

    def __init__(self, app, api_keys: Sequence[str] = (), allow_hosts: Sequence[str] = ()):
        self.app = app
        # digests: compare_digest then takes the same time whatever the lengths
        self.keys = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.hosts = {h.lower() for h in (*LOCAL_HOSTS, *allow_hosts)}

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.keys:
            if path.startswith(PROTECTED) and not self._key_ok(headers.get("authorization", "")):
                return error(401, "a valid API key is needed: send it as 'Authorization: Bearer <key>'",
                             "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        elif "*" not in self.hosts and host_name(headers.get("host", "")) not in self.hosts:
            return error(403, f"this server (started without an API key) answers only requests for "
                              f"{', '.join(LOCAL_HOSTS)}; not Host {headers.get('host', '(none)')!r} "
                              f"(see bin/serve --help: --api-key, --allow-host)", "host_not_allowed")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return error(415, f"the request body must be JSON, sent as Content-Type: application/json, "
                                  f"not {kind or 'no Content-Type'}", "unsupported_media_type")
        return None

    def _key_ok(self, authorization: str) -> bool:
        scheme, _, key = authorization.partition(" ")
        digest = hashlib.sha256(key.strip().encode()).digest()
        ok = False
        for k in self.keys:  # every key compared: the time does not say which one matched
            ok |= hmac.compare_digest(digest, k)
        return ok and scheme.lower() == "bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)
