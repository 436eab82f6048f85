"""An OpenAI-compatible chat server over the continuous-batching engine.

    app = create_app(load)          # load() -> Model, run in the background
    uvicorn.run(app)                # bin/serve does this (jaxsft/cli/serve.py)

Routes (each a few lines: the work is in protocol.py, serving.py and worker.py):
  POST /v1/chat/completions   OpenAI chat completions, plain or `stream: true`
                              (server-sent `chat.completion.chunk` events, then `data: [DONE]`)
  GET  /v1/models             the one model served
  GET  /health                200 when ready (with the engine thread's liveness and the age of
                              its last step: null when idle); 503 while loading or compiling,
                              and {"status": "failed", "reason": ...} once the engine has failed
  GET  /metrics               Prometheus's text format (metrics.py)
  GET  /                      the chat page (jaxsft/static/chat.html, no external resources; page.py:
                              its Content-Security-Policy allows its own inline script and style only)

Before any route: guard.py (API keys on /v1/* and /metrics, or local Host names only; POST
bodies must be JSON), inside access_log.py (the request's id, its log line, its metrics).
A bad request gets an OpenAI-style error {"error": {"message", "type", "param",
"code"}} with a 4xx status; a full server gets 503 with Retry-After; a request whose
engine step failed gets 500 saying what failed. When the engine fails for good (worker.py)
on_fatal is called: bin/serve stops and exits 1.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from fastapi import APIRouter, FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from ..engine import compiled_programs
from .access_log import AccessLog, note, request_id
from .guard import Guard
from .metrics import CONTENT_TYPE, Metrics
from .page import chat_page
from .protocol import ApiError, parse_chat
from .serving import Answer, Model
from .worker import Worker

log = logging.getLogger("jaxsft.serve")

DEFAULT_MAX_BODY = 1 << 20  # bytes


@dataclass
class State:
    """The app's one piece of state (app.state.jaxsft): where loading is, and what it made."""
    max_waiting: int = 64
    max_body: int = DEFAULT_MAX_BODY
    status: str = "loading"  # loading -> compiling -> ready (or failed)
    model: Optional[Model] = None
    worker: Optional[Worker] = None
    compiled: int = 0
    started: float = field(default_factory=time.time)
    metrics: Metrics = field(default_factory=Metrics)

    def ready_model(self) -> Model:
        if self.status != "ready":
            raise ApiError(503, f"the model is {self.status}; try again shortly", None, "model_not_ready",
                           "server_error", {"Retry-After": "2"})
        return self.model


def freeze_start_up():
    """What start-up built (JAX, the model, the libraries: some 300,000 objects) out of the garbage
    collector's sight: a full collection scans every tracked object and holds the GIL throughout,
    stopping every stream (0.14 s on a 2-core EPYC; a few ms after the freeze). Python then runs
    one whenever the long-lived objects have grown by a quarter."""
    gc.collect()
    gc.freeze()


def load_model(state: State, load: Callable[[], Model], loop, warm_up: bool, on_fatal: Optional[Callable],
               freeze_gc: bool = False):
    """In a background thread at start-up: the checkpoint, the engine's compiles, the worker."""
    try:
        model = load()
        state.model = model
        state.status = "compiling"
        if warm_up:
            model.engine.warm_up()
        state.worker = Worker(model.engine, state.max_waiting, loop, on_fatal=on_fatal,
                              on_step=state.metrics.step.observe)
        state.worker.start()
        state.compiled = compiled_programs()
        if freeze_gc:
            freeze_start_up()
        state.status = "ready"
        log.info("ready: %s, %d slots, context %d, %d programs compiled in %.1f s", model.name,
                 model.engine.slots, model.engine.S, state.compiled, time.time() - state.started)
    except Exception:
        state.status = "failed"
        log.error("loading the model failed:\n%s", traceback.format_exc())
        if on_fatal:
            on_fatal()


MAX_DEPTH = 32  # JSON nesting: a chat body needs 5 (body, messages, message, content parts, part)
BODY_SECONDS = 60  # the whole body must arrive in this time (a client trickling bytes holds a connection)


class ClientGone(Exception):
    """The client closed the connection before its request body was whole."""


def _depth(v, limit: int) -> int:
    """How deeply `v` nests (a scalar 0), counting no further than limit + 1."""
    deepest, todo = 0, [(v, 1)]
    while todo:
        x, d = todo.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            if d <= limit:
                todo.extend((y, d + 1) for y in (x.values() if isinstance(x, dict) else x))
    return deepest


def parse_json(raw: bytes):
    """The body's JSON (in a worker thread: a 1 MiB body takes a while), or ApiError 400 when it
    is not JSON or nests deeper than MAX_DEPTH."""
    deep = ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels", None, "invalid_json")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise deep from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if _depth(body, MAX_DEPTH) > MAX_DEPTH:
        raise deep
    return body


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The request body, or ApiError: 413 as soon as it is known to exceed `limit` bytes, 408
    when it takes over BODY_SECONDS to arrive; ClientGone when the client leaves first."""
    too_big = ApiError(413, f"the request body exceeds {limit} bytes", None, "request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big

    async def whole():
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        async with asyncio.timeout(BODY_SECONDS):  # (wait_for would make a task of it: 3x the cost)
            return await whole()
    except ClientDisconnect:
        raise ClientGone() from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_SECONDS} s", None,
                       "request_timeout") from None


# -- routes

router = APIRouter()


def _state(request: HttpRequest) -> State:
    return request.app.state.jaxsft


def _parse(state: State, raw: bytes):
    """(model, ChatParams) of a chat body, in a worker thread; ApiError as the client gets it."""
    body = parse_json(raw)
    m = state.ready_model()
    return m, parse_chat(body, m.tok, m.engine.S, m.system_prompt, m.name)


@router.post("/v1/chat/completions")
async def chat(request: HttpRequest):
    state = _state(request)
    raw = await read_body(request, state.max_body)
    # parsing a body of up to --max-body, tokenising and the chat template take milliseconds: off the
    # event loop, which streams every answer (one trip to a worker thread, not one per stage)
    m, p = await run_in_threadpool(_parse, state, raw)
    answer = Answer(state.worker, m, p, request)
    if not answer.p.stream:
        return await answer.whole()
    return StreamingResponse(answer.events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/health")
async def health(request: HttpRequest):
    state = _state(request)
    if state.status != "ready":
        return JSONResponse({"status": state.status}, status_code=503, headers={"Retry-After": "2"})
    live = state.worker.liveness()
    if live.failure or not live.alive:
        reason = live.failure or "the engine thread is not running"
        return JSONResponse({"status": "failed", "reason": reason, "engine_alive": live.alive}, status_code=503)
    s = state.worker.status()
    age = None if live.step_age is None else round(live.step_age, 3)
    return {"status": state.status, "model": state.model.name, "slots": s.slots, "active": s.active,
            "waiting": s.waiting, "context": s.context, "compiled_programs": compiled_programs(),
            "compiled_at_ready": state.compiled, "engine_alive": live.alive, "last_step_age_s": age}


@router.get("/v1/models")
async def models(request: HttpRequest):
    state = _state(request)
    m = state.ready_model()
    return {"object": "list", "data": [{"id": m.name, "object": "model", "created": int(state.started),
                                        "owned_by": "jaxsft", "context_length": m.engine.S}]}


@router.get("/metrics")
async def metrics(request: HttpRequest):
    return Response(_state(request).metrics.text(), media_type=CONTENT_TYPE)


@router.get("/", response_class=HTMLResponse)
async def page():
    html, headers = chat_page()  # with its Content-Security-Policy (page.py)
    return HTMLResponse(html, headers=headers)


# -- errors: every one as {"error": {...}}

def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def api_error(request, e: ApiError):
    return error_response(e)


async def http_error(request, e: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(ApiError(e.status_code, msg.get(e.status_code, str(e.detail)), None, code))


async def client_gone(request, e: ClientGone):
    note(request.scope, "the client left before its request body was whole")
    return Response(status_code=499)  # nginx's "client closed request": no one reads it


async def server_error(request, e):
    rid = request_id(request.scope)
    log.error("request %s: unhandled error:\n%s", rid, traceback.format_exc())
    return error_response(ApiError(500, f"internal server error (request id {rid}: see the server log)", None,
                                   None, "server_error"))


def create_app(load: Callable[[], Model], max_waiting: int = 64, max_body: int = DEFAULT_MAX_BODY,
               on_fatal: Optional[Callable[[], None]] = None, warm_up: bool = True, api_keys: Sequence[str] = (),
               allow_hosts: Sequence[str] = (), freeze_gc: bool = False):
    """The app, inside its guard (API keys or local Host names; JSON bodies: guard.py) and its
    access log. load() runs in a background thread at start-up (the checkpoint, then the
    engine's compiles); until both are done /health and the chat route answer 503. freeze_gc
    (bin/serve): what start-up built is then frozen out of the garbage collector's sight."""
    state = State(max_waiting, max_body)
    state.metrics.watch(lambda: state.worker.status() if state.worker else None)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load_model, args=(state, load, asyncio.get_running_loop(), warm_up, on_fatal, freeze_gc),
                         name="load", daemon=True).start()
        yield
        if state.worker:
            state.worker.stop()
        log.info("stopped")

    app = FastAPI(title="jaxsft", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jaxsft = state
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(Exception, server_error)
    app.include_router(router)
    app.add_middleware(Guard, api_keys=api_keys, allow_hosts=allow_hosts)
    app.add_middleware(AccessLog, metrics=state.metrics)  # outermost: refusals are logged and counted too
    return app
