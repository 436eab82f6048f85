"""The access log: one line per HTTP request once its response has ended (a stream's
at its last byte): client, method, path, status, the route's note, milliseconds.

    127.0.0.1 "POST /v1/chat/completions" 200 prompt=21 completion=9 stop stream ttft=12ms 40 ms
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("jaxsft.serve")


def note(scope: dict, text: str) -> None:
    """What a route adds to its request's line (tokens, finish reason, time to first token)."""
    scope.setdefault("state", {})["log"] = text


class AccessLog:
    """ASGI middleware around the app: writes the line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]
        scope.setdefault("state", {})  # where a route leaves its note for this line

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            info = scope.get("state", {}).get("log", "")
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %s%s %.0f ms', client[0], scope["method"], scope["path"], status[0] or "-",
                     f" {info}" if info else "", 1000 * (time.perf_counter() - t0))
