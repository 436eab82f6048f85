"""The access log: one line per HTTP request once its response has ended (a stream's
at its last byte): client, request id, method, path, status, the route's note, milliseconds
from the request's acceptance. The same middleware gives each request its id (the client's
X-Request-Id when it is a sane one, else a new one), echoed in the response's X-Request-Id,
and counts the request in the metrics.

    127.0.0.1 id=9f2c1e0a7b3d4c55 "POST /v1/chat/completions" 200 prompt=21 completion=9 stop stream ttft=12ms 40 ms
"""
from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Optional

from .metrics import Metrics

log = logging.getLogger("jaxsft.serve")

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def note(scope: dict, text: str) -> None:
    """What a route adds to its request's line (tokens, finish reason, time to first token)."""
    scope.setdefault("state", {})["log"] = text


def request_id(scope: dict) -> str:
    return scope.get("state", {}).get("request_id", "-")


def accepted_at(scope: dict) -> float:
    """When the request was accepted (time.perf_counter()): latencies count from here."""
    return scope.get("state", {}).get("accepted", time.perf_counter())


class AccessLog:
    """ASGI middleware around the app: the request id, the line, the metrics."""

    def __init__(self, app, metrics: Optional[Metrics] = None):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"x-request-id"), "")
        rid = given if _CLIENT_ID.fullmatch(given) else secrets.token_hex(8)
        status = [0]
        # where a route finds the request's id and acceptance time, and leaves its note for this line
        scope.setdefault("state", {}).update(request_id=rid, accepted=t0)

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode()),
                                      (b"x-content-type-options", b"nosniff")]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            seconds = time.perf_counter() - t0
            info = scope.get("state", {}).get("log", "")
            client = scope.get("client") or ("-", 0)
            log.info('%s id=%s "%s %s" %s%s %.0f ms', client[0], rid, scope["method"], scope["path"],
                     status[0] or "-", f" {info}" if info else "", 1000 * seconds)
            if self.metrics is not None:
                self.metrics.request(scope["path"], status[0], seconds)
