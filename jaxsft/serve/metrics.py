"""The server's Prometheus metrics (prometheus_client), served at GET /metrics.

    jaxsft_requests_total{path, status}          requests answered, by route and status
    jaxsft_request_seconds{path}                 from the request's acceptance to its last byte
    jaxsft_time_to_first_token_seconds           from acceptance to the answer's first token
    jaxsft_prompt_tokens_total                   tokens in (the rendered prompts)
    jaxsft_generation_tokens_total               tokens out
    jaxsft_requests_running / _waiting           in a slot now / queued for one
    jaxsft_engine_step_seconds                   one engine step (admissions + one decode step)

Each app has its own registry (several apps in one process, as in the tests, do not mix).
"""
from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# latencies from a few ms (a short answer on a GPU) to minutes (a long one on a loaded CPU)
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# the routes a request is counted under; anything else is "other" (no label per unknown path)
PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jaxsft_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.latency = Histogram("jaxsft_request_seconds", "request time from acceptance to the last byte",
                                 ["path"], buckets=SECONDS, registry=r)
        self.ttft = Histogram("jaxsft_time_to_first_token_seconds", "from acceptance to the first answer token",
                              buckets=SECONDS, registry=r)
        self.prompt_tokens = Counter("jaxsft_prompt_tokens", "prompt tokens of the requests run", registry=r)
        self.generation_tokens = Counter("jaxsft_generation_tokens", "answer tokens generated", registry=r)
        self.running = Gauge("jaxsft_requests_running", "requests in an engine slot", registry=r)
        self.waiting = Gauge("jaxsft_requests_waiting", "requests queued for a slot", registry=r)
        self.step = Histogram("jaxsft_engine_step_seconds", "one engine step: admissions and one decode step",
                              buckets=STEP_SECONDS, registry=r)

    def watch(self, status: Callable[[], Optional[object]]) -> None:
        """status() -> the engine's Status (active, waiting) or None before it exists: read at each scrape."""
        self.running.set_function(lambda: getattr(status(), "active", 0))
        self.waiting.set_function(lambda: getattr(status(), "waiting", 0))

    def request(self, path: str, status: int, seconds: float) -> None:
        path = path if path in PATHS else "other"
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def answer(self, prompt_tokens: int, generation_tokens: int, ttft: Optional[float]) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)

    def text(self) -> bytes:
        return generate_latest(self.registry)
