"""The server when its engine fails, with real failures injected: a prefill or decode
program that raises (tests/faults.py; before it ran, or after JAX took its donated
cache), a cache that cannot be allocated again, steps that keep failing, a callback that
raises a BaseException in the engine thread. Every request running or queued gets its
answer or an error within seconds, none hangs; /health says what happened; after a failed
step the server answers again, after a failure for good it refuses requests, /health says
503 with the reason and on_fatal is called (bin/serve: exit 1). An in-process server
(tests/live.py) on a random tiny engine whose rows never end, 30 ms a decode step."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from faults import Flaky
from live import free_server, live_app, never_ending_engine, tiny_tokenizer, user
from jaxsft import engine
from jaxsft.engine import Engine, Request
from jaxsft.serve.worker import Worker

WITHIN = 10  # seconds: the most any answer or error may take here (a hung request would take forever)
INJECTED = "RuntimeError: injected failure 1"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def make(tok):
    return never_ending_engine(tok)


@pytest.fixture
def fault(monkeypatch):
    def install(name):
        flaky = Flaky(getattr(engine, name))
        monkeypatch.setattr(engine, name, flaky)
        return flaky
    return install


def chat(url, max_tokens=5, timeout=WITHIN):
    return httpx.post(url + "/v1/chat/completions", timeout=timeout,
                      json={"messages": user("你好"), "max_tokens": max_tokens, "temperature": 0})


def content(r):
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def stream_error(url, max_tokens):
    """A streamed answer that must fail after its headers went out: its error event's message."""
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=WITHIN,
                      json={"messages": user("你好"), "max_tokens": max_tokens, "stream": True}) as r:
        lines = list(r.iter_lines())
    assert r.status_code == 200 and "data: [DONE]" in lines, lines
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    errors = [e["error"] for e in events if "error" in e]
    assert len(errors) == 1, lines
    return without_id(errors[0]["message"], r)


def without_id(msg, r):
    """A 500's message, which ends naming the request's id (its X-Request-Id), without that."""
    end = f" (request id {r.headers['x-request-id']})"
    assert msg.endswith(end), msg
    return msg[:-len(end)]


def failed_with(r, words):
    """`r` is a 500 whose message says `words`, in one line: no traceback, no device report."""
    assert r.status_code == 500, r.text
    msg = r.json()["error"]["message"]
    assert words in msg and "second line" not in msg and "Traceback" not in msg, msg
    return without_id(msg, r)


def health(url):
    return httpx.get(url + "/health", timeout=WITHIN)


def wait_for(cond, what):
    end = time.time() + WITHIN
    while not cond():
        assert time.time() < end, f"not within {WITHIN} s: {what}"
        time.sleep(0.01)


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
@pytest.mark.parametrize("consume", [False, True], ids=["cache-intact", "cache-lost"])
def test_a_failed_prefill_fails_its_request_and_the_server_goes_on(make, tok, fault, consume):
    eng = make(2)
    prefill = fault("_prefill")
    with live_app(eng, tok) as (url, state):
        want = content(chat(url, timeout=120))  # compiles first
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(chat, url, 40)  # 1.2 s of decoding
            wait_for(lambda: eng.active == 1, "a running answer")
            prefill.arm(consume)
            failed_with(chat(url), f"prefill failed: {INJECTED}")
            first = running.result(WITHIN)
        if consume:  # JAX took the donated cache: the running row went with it
            failed_with(first, f"the KV cache was lost when a prefill failed: {INJECTED}")
        else:  # its row is intact: it goes on to the end
            assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 40
        h = health(url)
        assert h.status_code == 200 and h.json()["status"] == "ready" and h.json()["engine_alive"] is True
        assert content(chat(url)) == want


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_a_failed_decode_fails_the_running_requests_and_the_queued_one_is_answered(make, tok, fault):
    eng = make(1)
    decode = fault("_decode")
    with live_app(eng, tok) as (url, state):
        want = content(chat(url, timeout=120))
        wait_for(lambda: health(url).json()["last_step_age_s"] is None, "idle: no step age")
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(stream_error, url, 40)
            wait_for(lambda: eng.active == 1, "a running answer")
            h = health(url).json()
            assert h["engine_alive"] is True and 0 <= h["last_step_age_s"] < 5, h
            queued = pool.submit(chat, url)
            wait_for(lambda: eng.queued == 1, "a queued request")
            decode.arm(consume=True)
            assert running.result(WITHIN) == f"the answer failed: decode failed: {INJECTED}"
            assert content(queued.result(WITHIN)) == want  # admitted into the fresh cache
        assert health(url).status_code == 200
        assert content(chat(url)) == want


def no_memory(self):
    raise RuntimeError("RESOURCE_EXHAUSTED: injected: out of memory")


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_a_lost_cache_that_cannot_be_allocated_again_marks_the_server_failed(make, tok, fault, monkeypatch):
    eng = make(1)
    decode = fault("_decode")
    fatal = threading.Event()
    with live_app(eng, tok, on_fatal=fatal.set) as (url, state):
        content(chat(url, timeout=120))
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(chat, url, 40)
            wait_for(lambda: eng.active == 1, "a running answer")
            queued = pool.submit(chat, url)
            wait_for(lambda: eng.queued == 1, "a queued request")
            monkeypatch.setattr(Engine, "_allocate", no_memory)
            decode.arm(consume=True)
            failed_with(running.result(WITHIN), f"decode failed: {INJECTED}")
            failed_with(queued.result(WITHIN), "the KV cache was lost and allocating another failed: "
                                               "RuntimeError: RESOURCE_EXHAUSTED")
        assert fatal.wait(WITHIN)
        h = health(url)
        assert h.status_code == 503 and h.json()["status"] == "failed"
        assert "allocating another failed" in h.json()["reason"]
        r = chat(url)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_steps_that_keep_failing_mark_the_server_failed(make, tok, fault):
    eng = make(1)
    decode = fault("_decode")
    fatal = threading.Event()
    with live_app(eng, tok, on_fatal=fatal.set) as (url, state):
        content(chat(url, timeout=120))
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(chat, url, 40)
            wait_for(lambda: eng.active == 1, "a running answer")
            queued = [pool.submit(chat, url) for _ in range(3)]
            wait_for(lambda: eng.queued == 3, "three queued requests")
            decode.always = False  # every decode step fails from now on (the cache intact)
            # each failed step fails the request it held; the third in a row fails the engine, and
            # with it the request still queued
            failed_with(running.result(WITHIN), f"decode failed: {INJECTED}")
            msgs = sorted(failed_with(r.result(WITHIN), "failed") for r in queued)
        assert msgs == ["the answer failed: 3 engine steps failed in a row, the last: decode failed: RuntimeError: "
                        "injected failure 3", *(f"the answer failed: decode failed: RuntimeError: injected failure {i}"
                                                for i in (2, 3))]
        assert fatal.wait(WITHIN) and decode.failed == 3
        h = health(url)
        assert h.status_code == 503 and "3 engine steps failed in a row" in h.json()["reason"]


class Boom(BaseException):
    """What a buggy callback might raise: no Exception, so no `except Exception` stops it."""


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_an_engine_thread_that_dies_fails_every_request(make, tok, monkeypatch):
    eng = make(2)
    fatal = threading.Event()
    with live_app(eng, tok, on_fatal=fatal.set) as (url, state):
        content(chat(url, timeout=120))
        with ThreadPoolExecutor(3) as pool:
            streamed, plain = pool.submit(stream_error, url, 40), pool.submit(chat, url, 40)
            wait_for(lambda: eng.active == 2, "two running answers")
            queued = pool.submit(chat, url)
            wait_for(lambda: eng.queued == 1, "a queued request")
            post, bugs = Worker.post, [Boom("a bug in a callback")]

            def buggy(self, queue, item):  # the next token's delivery raises, once
                if bugs:
                    raise bugs.pop()
                return post(self, queue, item)

            monkeypatch.setattr(Worker, "post", buggy)
            assert streamed.result(WITHIN) == "the answer failed: decode failed: Boom: a bug in a callback"
            failed_with(plain.result(WITHIN), "decode failed: Boom: a bug in a callback")
            failed_with(queued.result(WITHIN), "the engine thread died: Boom: a bug in a callback")
        assert fatal.wait(WITHIN)
        h = health(url)
        assert h.status_code == 503 and h.json() == {"status": "failed", "engine_alive": h.json()["engine_alive"],
                                                     "reason": "the engine thread died: Boom: a bug in a callback"}
        state.worker.thread.join(WITHIN)
        assert health(url).json()["engine_alive"] is False
        r = chat(url)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
        assert "the engine thread died" in r.json()["error"]["message"]


def test_on_step_gets_each_steps_seconds(make, tok):
    eng = make(1)
    steps = []
    worker = Worker(eng, 4, loop=None, on_step=steps.append)  # these callbacks post nothing: no loop needed
    worker.start()
    done = threading.Event()
    try:
        worker.submit(Request(np.asarray(tok.encode("你好"), np.int32), 5, on_finish=lambda r: done.set()))
        assert done.wait(120)
        wait_for(lambda: worker.liveness().step_age is None, "idle: no step age")
    finally:
        worker.stop()
    # 5 tokens: the prefill's, then 4 decode steps (each 30 ms or more), one admitting the prompt too
    assert len(steps) == eng.stats["decode_steps"] == 4 and all(isinstance(s, float) and s >= 0.03 for s in steps)


# a bin/serve whose engine breaks at its first request: every decode step after the warm-up
# fails after JAX took the donated cache, and no other cache can be allocated
BROKEN_SERVE = """
from jaxsft import decode, engine, model
from jaxsft.config import ModelConfig
from jaxsft.tokenizer import Tokenizer
tok = Tokenizer.build(["你好，有帮助的助手。"])
cfg = ModelConfig(vocab_size=len(tok), max_seq_len=64, d_model=32, n_heads=2, n_layers=1, d_ff=64)
params = model.init(cfg, 0)[1]
decode.Generator.from_run = classmethod(lambda cls, run, system=None: cls(params, cfg, tok, ""))
real, calls = engine._decode, []
def lost(params, cache, *args, **kw):
    calls.append(1)
    out = real(params, cache, *args, **kw)
    if len(calls) > 2:  # after warm-up's two (the plain step and the one with log-probabilities)
        raise RuntimeError("injected failure")
    return out
lost._cache_size = real._cache_size
engine._decode = lost
allocate = engine.Engine._allocate
def once(self):
    if calls:
        raise RuntimeError("RESOURCE_EXHAUSTED: injected")
    allocate(self)
engine.Engine._allocate = once
from jaxsft.cli.serve import main
main()
"""


@pytest.mark.slow  # starts a program
def test_bin_serve_exits_1_when_its_engine_breaks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # bin/serve checks that it names a run; the patched loader reads nothing
    log = str(tmp_path / "serve.log")
    proc, url = free_server(str(run), log, "--slots", 2, deadline=120, code=BROKEN_SERVE)
    try:
        failed_with(chat(url, timeout=60), "decode failed: RuntimeError: injected failure")
        assert proc.wait(timeout=30) == 1
        text = open(log, encoding="utf-8").read()
        assert "the engine has failed: decode failed" in text and "allocating another failed" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_text_decoded_before_a_failure_goes_out_before_its_error(tok):
    """The tokens a row wrote before its step failed reach the event loop in the same batch as
    the end (one wake-up per step): their text is sent, then the error."""
    import asyncio
    from types import SimpleNamespace
    from jaxsft.serve.protocol import ApiError
    from jaxsft.serve.serving import Answer
    from jaxsft.tokenizer import TextStream
    ids = tok.encode("你好")
    a = Answer.__new__(Answer)  # what _pieces reads, without a server around it
    a.tokens, a.entries, a.text = asyncio.Queue(), None, TextStream(tok)
    a.req = SimpleNamespace(finish_reason="error", error="decode failed: RuntimeError: boom")
    a.http, a.worker = SimpleNamespace(scope={"state": {"request_id": "r1"}}), None

    async def pieces():
        for t in [*ids, None]:
            a.tokens.put_nowait(t)
        got = []
        with pytest.raises(ApiError) as e:
            async for p in a._pieces():
                got.append(p.text)
        return got, e.value

    got, err = asyncio.run(pieces())
    assert "".join(got) == "你好"
    assert err.status == 500 and err.message == "the answer failed: decode failed: RuntimeError: boom (request id r1)"
