"""An OpenAI-compatible chat server over the continuous-batching engine.

    app = create_app(load)          # load() -> Model, run in the background
    uvicorn.run(app)                # bin/serve does this (jaxsft/cli/serve.py)

Routes:
  POST /v1/chat/completions   OpenAI chat completions, plain or `stream: true`
                              (server-sent `chat.completion.chunk` events, then `data: [DONE]`)
  GET  /v1/models             the one model served
  GET  /health                200 when ready; 503 while loading or compiling
  GET  /                      the chat page (jaxsft/static/chat.html, no external resources)

Every request's tokens go to one `engine.Engine` stepped by a worker thread; the
HTTP side (asyncio) hands it requests and receives tokens through callbacks.
A bad request gets an OpenAI-style error {"error": {"message", "type", "param",
"code"}} with a 4xx status (`parse_chat` checks everything before the engine
sees it); a full server gets 503 with Retry-After. Text is streamed by decoding
the accumulated answer ids and sending only the new complete characters
(`TextStream`), so a token that ends inside a UTF-8 character, or inside a stop
string, is held back until it can be decided.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Optional

import numpy as np
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from . import chatml
from .engine import Engine, Request, compiled_programs

log = logging.getLogger("jaxsft.serve")

ROLES = ("system", "user", "assistant")
MAX_STOP = 4  # stop strings per request, as OpenAI allows
DEFAULT_MAX_BODY = 1 << 20  # bytes


class ApiError(Exception):
    """An error the client gets as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Model:
    """What the server serves: an engine (its slots, KV cache and parameters), the
    tokenizer, the default system prompt, and the name /v1/models lists."""
    engine: Engine
    tok: object
    system_prompt: Optional[str]
    name: str


# -- request validation: a pure function of the parsed JSON body

@dataclass
class ChatParams:
    prompt: np.ndarray
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: int
    stream: bool
    include_usage: bool


def _number(body, key, default, lo, hi, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{key}' must be a number", key, "invalid_type")
    if not (lo < v if lo_open else lo <= v) or v > hi:
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ApiError(400, f"'{key}' must be in {span}, not {v}", key, "invalid_value")
    return float(v)


def _integer(body, key):
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise ApiError(400, f"'{key}' must be an integer", key, "invalid_type")
    return v


def parse_messages(messages) -> list:
    """The `messages` array -> [(role, content)]; ApiError (400) naming the bad entry."""
    if messages is None:
        raise ApiError(400, "'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise ApiError(400, "'messages' must be an array of {role, content} objects", "messages", "invalid_type")
    if not messages:
        raise ApiError(400, "'messages' must not be empty", "messages", "empty_array")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, not {json.dumps(role)}",
                           f"{where}.role", "invalid_value")
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", f"{where}.content", "invalid_type")
        if role == "system" and i > 0:
            raise ApiError(400, f"{where}: a system message may only come first", f"{where}.role", "invalid_value")
        out.append((role, content))
    return out


def parse_chat(body, tok, context: int, system_prompt: Optional[str]) -> ChatParams:
    """A chat-completions body (parsed JSON) -> ChatParams, or ApiError (400) saying
    which parameter is wrong and why. `context` is the model's max_seq_len."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_type")
    messages = parse_messages(body.get("messages"))
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise ApiError(400, f"only n=1 is supported, not {n}", "n", "invalid_value")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or an array of at most {MAX_STOP} of them",
                       "stop", "invalid_value")
    seed = _integer(body, "seed")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")

    ids, _ = chatml.render(messages, tok, system_prompt, add_generation_prompt=True)
    if len(ids) >= context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context is {context} tokens, "
                            f"so the messages may take at most {context - 1}", "messages",
                       "context_length_exceeded")
    room = context - len(ids)
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = room
    elif max_tokens <= 0:
        raise ApiError(400, f"'{param}' must be at least 1, not {max_tokens}", param, "invalid_value")
    elif max_tokens > room:
        raise ApiError(400, f"'{param}' is {max_tokens}, but the prompt takes {len(ids)} of the {context} tokens "
                            f"of context: at most {room} are left to answer", param, "context_length_exceeded")
    return ChatParams(ids, max_tokens, temperature, top_p, stop,
                      (secrets.randbits(32) if seed is None else seed) % 2 ** 32, stream,
                      bool(opts.get("include_usage", False)))


# -- text out of tokens

class TextStream:
    """Token ids in, text out as soon as it is certain: the answer's ids are decoded
    as a whole (tok.decode), and only complete characters are released (a byte-level
    token may end inside a UTF-8 character, which decodes to U+FFFD), never the start
    of a possible stop string. feed() -> new text; .stopped once a stop string
    appeared (the text before it is all that is released)."""

    def __init__(self, tok, stop=()):
        self.tok, self.stop = tok, list(stop)
        self.ids: list = []
        self.sent = 0  # characters released
        self.text = ""
        self.stopped = False

    def feed(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        complete = text.rstrip("\ufffd")
        for s in self.stop:
            at = complete.find(s, max(self.sent - len(s) + 1, 0))
            if at >= 0:
                complete = complete[:at]
                self.stopped = True
        if not self.stopped:  # hold back a suffix that may grow into a stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if complete.endswith(s[:k])), default=0)
            complete = complete[:len(complete) - hold]
        return self._release(complete)

    def flush(self) -> str:
        """At the end: whatever is held back (the end of the text cannot start a stop string any more)."""
        if self.stopped:
            return ""
        return self._release(self.tok.decode(self.ids))

    def _release(self, complete: str) -> str:
        if len(complete) <= self.sent:
            return ""
        new = complete[self.sent:]
        self.sent = len(complete)
        self.text += new
        return new


# -- the engine's thread

class Busy(Exception):
    pass


class Worker:
    """Steps the engine in its own thread while it has work; sleeps otherwise.

    What a step produces for the HTTP side (tokens, ends) is posted to an outbox and
    handed to the event loop once per step boundary: one wake-up of the loop per
    step, not one per token."""

    def __init__(self, engine: Engine, max_waiting: int, loop: asyncio.AbstractEventLoop):
        self.engine, self.max_waiting, self.loop = engine, max_waiting, loop
        self.cond = threading.Condition()
        self.stopping = False
        self.outbox: list = []
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self):
        self.thread.start()

    def post(self, queue: asyncio.Queue, item):
        """From the engine's callbacks: `item` goes to `queue` at the end of this step."""
        self.outbox.append((queue, item))

    def _flush(self):
        if self.outbox:
            box, self.outbox = self.outbox, []
            self.loop.call_soon_threadsafe(_deliver, box)

    def submit(self, req: Request):
        with self.cond:
            if self.stopping:
                raise Busy("the server is shutting down")
            eng = self.engine
            if eng.active + len(eng.waiting) >= eng.slots + self.max_waiting:
                raise Busy("every slot is busy and the wait queue is full")
            self.engine.submit(req)
            self.cond.notify()

    def cancel(self, req: Request):
        self.engine.cancel(req)
        with self.cond:
            self.cond.notify()

    def stop(self):
        """Cancels what is still running or waiting and ends the thread."""
        with self.cond:
            self.stopping = True
            for r in list(self.engine.waiting) + [r for r in self.engine.req if r is not None]:
                self.engine.cancel(r)
            self.cond.notify()
        self.thread.join(timeout=30)

    def _run(self):
        eng = self.engine
        while True:
            with self.cond:
                while not self.stopping and not eng.busy:
                    self.cond.wait()
                if self.stopping and not eng.busy:
                    return
            try:
                eng.admit()
                self._flush()  # first tokens out before the decode step
                eng.decode()
            except Exception:  # a bug must not hang every client: fail what is in flight, keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                for s, r in enumerate(eng.req):
                    if r is not None:
                        eng.cancel(r)
                        eng._finish(s, "error")
            self._flush()


def _deliver(box):
    for queue, item in box:
        queue.put_nowait(item)


# -- the app

@dataclass
class State:
    status: str = "loading"  # loading -> compiling -> ready (or failed)
    model: Optional[Model] = None
    worker: Optional[Worker] = None
    compiled: int = 0
    started: float = field(default_factory=time.time)


def error_response(e: ApiError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_body(request, limit: int) -> bytes:
    """The request body, or ApiError 413 as soon as it is known to exceed `limit` bytes."""
    too_big = ApiError(413, f"the request body exceeds {limit} bytes", None, "request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class AccessLog:
    """ASGI middleware: one log line per HTTP request once its response has ended
    (a stream's at its last byte): method, path, status, tokens, milliseconds."""

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


def create_app(load: Callable[[], Model], max_waiting: int = 64, max_body: int = DEFAULT_MAX_BODY,
               on_fatal: Optional[Callable[[], None]] = None, warm_up: bool = True):
    """The FastAPI app. load() runs in a background thread at start-up (the checkpoint,
    then the engine's compiles); until both are done /health and the chat route answer 503."""
    state = State()

    def start(loop):
        try:
            model = load()
            state.model = model
            state.status = "compiling"
            if warm_up:
                model.engine.warm_up()
            state.worker = Worker(model.engine, max_waiting, loop)
            state.worker.start()
            state.compiled = compiled_programs()
            state.status = "ready"
            log.info("ready: %s, %d slots, context %d, %d programs compiled in %.1f s", model.name,
                     model.engine.slots, model.engine.S, state.compiled, time.time() - state.started)
        except Exception:
            state.status = "failed"
            log.error("loading the model failed:\n%s", traceback.format_exc())
            if on_fatal:
                on_fatal()

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=start, args=(asyncio.get_running_loop(),), name="load", daemon=True).start()
        yield
        if state.worker:
            state.worker.stop()
        log.info("stopped")

    app = FastAPI(title="jaxsft", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jaxsft = state

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(ApiError(e.status_code, msg.get(e.status_code, str(e.detail)), None, code))

    @app.exception_handler(Exception)
    async def server_error(request, e):
        log.error("unhandled error:\n%s", traceback.format_exc())
        return error_response(ApiError(500, "internal server error", None, None, "server_error"))

    def ready_model() -> Model:
        if state.status != "ready":
            raise ApiError(503, f"the model is {state.status}; try again shortly", None, "model_not_ready",
                           "server_error", {"Retry-After": "2"})
        return state.model

    @app.get("/health")
    async def health():
        body = {"status": state.status}
        if state.status != "ready":
            return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
        eng = state.model.engine
        return {**body, "model": state.model.name, "slots": eng.slots, "active": eng.active,
                "waiting": len(eng.waiting), "context": eng.S, "compiled_programs": compiled_programs(),
                "compiled_at_ready": state.compiled}

    @app.get("/v1/models")
    async def models():
        m = ready_model()
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": int(state.started),
                                            "owned_by": "jaxsft", "context_length": m.engine.S}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("jaxsft").joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        raw = await read_body(request, max_body)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json")
        m = ready_model()
        p = parse_chat(body, m.tok, m.engine.S, m.system_prompt)
        return await complete(request, m, p)

    async def complete(request, m: Model, p: ChatParams):
        worker = state.worker
        events: asyncio.Queue = asyncio.Queue()
        req = Request(p.prompt, p.max_tokens, p.temperature, 0, p.top_p, p.seed,
                      on_token=lambda r, t: worker.post(events, t), on_finish=lambda r: worker.post(events, None))
        try:
            worker.submit(req)
        except Busy as e:
            raise ApiError(503, f"the server is busy: {e}; retry shortly", None, "server_busy", "server_error",
                           {"Retry-After": "1"})
        cid = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        text = TextStream(m.tok, p.stop)

        def usage():
            return {"prompt_tokens": len(p.prompt), "completion_tokens": len(req.tokens),
                    "total_tokens": len(p.prompt) + len(req.tokens)}

        def reason():
            return "stop" if text.stopped or req.finish_reason == "stop" else "length"

        def note():
            ttft = f" ttft={1000 * (req.t_first - req.t_submit):.0f}ms" if req.t_first else ""
            request.scope.setdefault("state", {})["log"] = (
                f"prompt={len(p.prompt)} completion={len(req.tokens)} {req.finish_reason or 'unfinished'}"
                f"{' stream' if p.stream else ''}{ttft}")

        async def pieces():
            """The answer's new text until the row ends or a stop string: a piece per token,
            or per few tokens when the client side falls behind the engine."""
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                new = ""
                for t in batch:
                    if t is None:
                        if req.finish_reason == "error":
                            raise ApiError(500, "decoding failed; see the server log", None, None, "server_error")
                        new += text.flush()
                        if new:
                            yield new
                        return
                    if not text.stopped:
                        new += text.feed(t)
                        if text.stopped:
                            worker.cancel(req)  # free the slot now
                if new:
                    yield new

        async def watch_disconnect():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    worker.cancel(req)
                    return

        watcher = asyncio.create_task(watch_disconnect())

        if not p.stream:
            try:
                async for _ in pieces():
                    pass
            finally:
                watcher.cancel()
                worker.cancel(req)
                note()
            return {"id": cid, "object": "chat.completion", "created": created, "model": m.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text.text},
                                 "logprobs": None, "finish_reason": reason()}],
                    "usage": usage()}

        def chunk(delta, finish=None, **extra):
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": m.name,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        # a text chunk is this template around the JSON string of its text (one json.dumps of a str per chunk)
        head, tail = chunk({"content": "\0"}).split('"\\u0000"')

        async def sse():
            try:
                yield chunk({"role": "assistant", "content": ""})
                try:
                    async for new in pieces():
                        yield head + json.dumps(new, ensure_ascii=False) + tail
                except ApiError as e:  # the headers are out: the error goes as an event
                    yield f"data: {json.dumps(e.body())}\n\n"
                else:
                    yield chunk({}, reason(), **({"usage": None} if p.include_usage else {}))
                    if p.include_usage:  # OpenAI's last chunk: no choices, the counts
                        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": m.name,
                               "choices": [], "usage": usage()}
                        yield f"data: {json.dumps(obj)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the end, or the client went away (the task is cancelled): free the slot
                watcher.cancel()
                worker.cancel(req)
                note()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return AccessLog(app)

