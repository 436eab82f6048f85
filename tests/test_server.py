"""The chat server: request checks and text streaming as pure functions; a live bin/serve
(the tiny trained model) driven by the official `openai` client, 16 concurrent streams,
every bad request, a headless Chromium on the chat page, and SIGTERM; busy and
disconnecting clients against an in-process server whose engine is slowed down."""
import json
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import QA
from live import chromium, free_server, live_app, never_ending_engine, openai_client, tiny_tokenizer, user
from jaxsft import chatml
from jaxsft.serve.protocol import ApiError, parse_chat
from jaxsft.tokenizer import TextStream, Tokenizer

CONTEXT = 64  # the tiny run's max_seq_len


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# -- pure functions

BAD = [  # (body, status, param, words in the message)
    ({}, 400, "messages", "required"),
    ({"messages": []}, 400, "messages", "empty"),
    ({"messages": "hi"}, 400, "messages", "array"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages[0].role", "bot"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, 400, "messages[0].content", "string"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "string"),
    ({"messages": user("你" * 80)}, 400, "messages", "context is 64"),
    ({"messages": user("你好"), "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"messages": user("你好"), "max_tokens": -3}, 400, "max_tokens", "at least 1"),
    ({"messages": user("你好"), "max_tokens": 500}, 400, "max_tokens", "at most"),
    ({"messages": user("你好"), "max_tokens": "10"}, 400, "max_tokens", "integer"),
    ({"messages": user("你好"), "temperature": 2.5}, 400, "temperature", "[0.0, 2.0]"),
    ({"messages": user("你好"), "temperature": -0.1}, 400, "temperature", "[0.0, 2.0]"),
    ({"messages": user("你好"), "top_p": 0}, 400, "top_p", "(0.0, 1.0]"),
    ({"messages": user("你好"), "top_p": 1.5}, 400, "top_p", "(0.0, 1.0]"),
    ({"messages": user("你好"), "n": 2}, 400, "n", "n=1"),
    ({"messages": user("你好"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"messages": user("你好"), "stream": "yes"}, 400, "stream", "boolean"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400, "messages[1].role",
     "first"),
]


@pytest.mark.parametrize("body,status,param,words", BAD)
def test_parse_chat_refuses_bad_requests(tok, body, status, param, words):
    with pytest.raises(ApiError) as e:
        parse_chat(body, tok, CONTEXT, "")
    assert (e.value.status, e.value.param) == (status, param)
    assert words in e.value.message
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_parse_chat_renders_chatml_and_fills_defaults(tok):
    msgs = [{"role": "system", "content": "你好"}, {"role": "user", "content": "1+1等于几？"},
            {"role": "assistant", "content": "等于2。"}, {"role": "user", "content": "你好"}]
    p = parse_chat({"messages": msgs, "seed": 5, "stop": "。"}, tok, CONTEXT, "默认")
    want, _ = chatml.render([(m["role"], m["content"]) for m in msgs], tok, "默认", add_generation_prompt=True)
    assert p.prompt.tolist() == want.tolist()
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed, p.stream) == (
        CONTEXT - len(want), 1.0, 1.0, ["。"], 5, False)


class ByteTok:
    """A byte-level tokenizer: a token may end inside a UTF-8 character."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_releases_whole_characters_and_never_a_stop_string():
    ts = TextStream(ByteTok())
    out = [ts.feed(b) for b in "你好a".encode()]
    assert out == ["", "", "你", "", "", "好", "a"]
    ts = TextStream(ByteTok(), stop=["好a", "zz"])
    out = [ts.feed(b) for b in "你好a好b".encode()]
    assert "".join(out) == "你" and ts.stopped and ts.text == "你"
    ts = TextStream(ByteTok(), stop=["ab"])
    out = [ts.feed(b) for b in b"xa"]
    assert out == ["x", ""]  # "a" may start "ab": held back ...
    assert ts.flush() == "a" and ts.text == "xa"  # ... until the answer ends without it


# -- a live bin/serve on the tiny trained model

@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("serve") / "serve.log")
    proc, url = free_server(trained_run["run_dir"], log, "--slots", 8, "--queue", 8)
    yield {"url": url, "proc": proc, "log": log, "run": trained_run}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def ask(client, messages, stream=False, **kw):
    """(text, finish_reason) of one chat completion, streamed or not."""
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


@pytest.mark.slow
def test_openai_client_gets_bin_chats_greedy_answer(server):
    run = server["run"]
    # bin/chat's greedy answers, one question or a file of them, are QA's: test_cli.py's
    # test_chat_prints_the_trained_answer and test_chat_file_writes_one_line_per_row
    chat_answers = [a for _, a in QA]
    client = openai_client(server["url"])
    for (q, a), want in zip(QA, chat_answers):
        assert ask(client, user(q)) == (want, "stop")
        assert ask(client, user(q), stream=True) == (want, "stop")
    r = client.chat.completions.create(model="tiny", messages=user(QA[0][0]), temperature=0)
    prompt, _ = chatml.render([("user", QA[0][0])], Tokenizer.load(os.path.join(run["run_dir"], "tokenizer.json")),
                              "你是一个有帮助的AI助手。", add_generation_prompt=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(QA[0][1]))
    assert r.usage.total_tokens == len(prompt) + len(QA[0][1])
    assert r.model == os.path.basename(run["run_dir"]) and r.object == "chat.completion"
    models = client.models.list().data
    assert [m.id for m in models] == [os.path.basename(run["run_dir"])]
    # sampling at temperature 2: seeds 0..5 draw more than one answer, a seed drawn again gives its answer
    # again, and top_p 0.01 keeps the most likely token only: the greedy answer at any seed
    def sample(seed, **kw):
        return client.chat.completions.create(model="tiny", messages=user(QA[0][0]), temperature=2.0, seed=seed,
                                              max_tokens=12, **kw).choices[0].message.content
    sampled = [sample(seed) for seed in range(6)]
    assert len(set(sampled)) > 1, sampled
    assert sample(3) == sampled[3]
    greedy, _ = ask(client, user(QA[0][0]), max_tokens=12)
    assert [sample(seed, top_p=0.01) for seed in range(3)] == [greedy] * 3, greedy
    assert server["url"].startswith("http://127.0.0.1:")  # bound to this machine only by default


@pytest.mark.slow
def test_16_concurrent_streams_each_get_their_answer_alone(server):
    client = openai_client(server["url"])
    # different questions, lengths, multi-turn histories, max_tokens cuts and stop strings side by side
    cases = []
    for i in range(16):
        q, a = QA[i % 4]
        msgs = user(q) if i % 3 else [*user(QA[(i + 1) % 4][0]), {"role": "assistant", "content": QA[(i + 1) % 4][1]},
                                      *user(q)]
        kw = {"max_tokens": 3} if i % 5 == 4 else {"stop": [a[2:4]]} if i % 7 == 6 else {}
        cases.append((msgs, kw))
    alone = [ask(client, msgs, stream=True, **kw) for msgs, kw in cases]
    assert {r for _, r in alone} == {"stop", "length"}
    start = threading.Barrier(16)

    def together(case):
        start.wait()
        return ask(openai_client(server["url"]), case[0], stream=True, **case[1])

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(together, cases)) == alone


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    url = server["url"] + "/v1/chat/completions"
    for body, status, param, words in BAD:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"
    for raw, status, words in [(b"{not json", 400, "not valid JSON"), (b"[1, 2]", 400, "JSON object"),
                               (b"\xff\xfe", 400, "not valid JSON"), (b"x" * (1 << 20 + 1), 413, "exceeds")]:
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    r = httpx.get(server["url"] + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(url, json={"messages": user(QA[2][0]), "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == QA[2][1]
    assert "Traceback" not in open(server["log"], encoding="utf-8").read()


@pytest.mark.slow
def test_page_health_and_no_recompilation(server):
    page = httpx.get(server["url"] + "/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)  # nothing from elsewhere
    assert "@import" not in page.text and "url(" not in page.text
    h = httpx.get(server["url"] + "/health", timeout=30).json()
    assert h["status"] == "ready" and h["slots"] == 8
    assert h["compiled_programs"] == h["compiled_at_ready"]  # every request so far ran warm programs
    log = open(server["log"], encoding="utf-8").read()
    assert re.search(r'"POST /v1/chat/completions" 200 prompt=\d+ completion=\d+ stop( stream)? ttft=\d+ms \d+ ms',
                     log)


@pytest.mark.slow
def test_chat_page_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    browser, profile = chromium()
    try:
        browser.get(server["url"] + "/")
        wait = WebDriverWait(browser, 60)
        box = browser.find_element(By.ID, "input")
        history = []
        for turn, (q, _) in enumerate(QA[:2]):
            box.send_keys(q, Keys.ENTER)
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant:not(.pending)")) > turn)
            answers = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".assistant")]
            # the page sends the whole conversation: the API's greedy answer to it
            history += user(q)
            want = ask(openai_client(server["url"]), history)[0]
            assert answers[turn] == want
            history.append({"role": "assistant", "content": want})
        assert answers[0] == QA[0][1]
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")] == [q for q, _ in QA[:2]]
        browser.save_screenshot(str(tmp_path / "chat-page.png"))
        # a refused request says why
        temp = browser.find_element(By.ID, "temperature")
        temp.clear()
        temp.send_keys("5")
        box.send_keys("你好", Keys.ENTER)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".error"))
        err = browser.find_element(By.CSS_SELECTOR, ".error").text
        assert "refused" in err and "400" in err and "temperature" in err
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_sigterm_finishes_the_streams_in_flight_and_exits_0(trained_run, tmp_path):
    log = str(tmp_path / "serve.log")
    proc, url = free_server(trained_run["run_dir"], log, "--slots", 4, slow=True)
    try:
        started = threading.Semaphore(0)

        def stream(q):
            lines = []
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                              json={"messages": user(q), "temperature": 0, "stream": True}) as r:
                for line in r.iter_lines():
                    if len(lines) == 2:  # the role chunk, then the first token's: the answer is running
                        started.release()
                    lines.append(line)
            return lines

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream, QA[i][0]) for i in range(4)]
            for _ in range(4):
                assert started.acquire(timeout=60)
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        for (q, a), lines in zip(QA, results):  # every answer finished, whole
            events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
            assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == a
            assert events[-1]["choices"][0]["finish_reason"] == "stop" and "data: [DONE]" in lines
        assert proc.wait(timeout=60) == 0
        text = open(log, encoding="utf-8").read()
        assert "stopped" in text and "Traceback" not in text
        assert len(re.findall(r'"POST /v1/chat/completions" 200 .* stop stream', text)) == 4
    finally:
        if proc.poll() is None:
            proc.kill()


# -- in-process: an engine slowed down so that requests overlap for sure

@pytest.fixture(scope="module")
def slow_engine(tok):
    return never_ending_engine(tok)


@pytest.mark.slow  # a server behaviour, not a numerical check: the full suite runs it
def test_busy_server_answers_503_with_retry_after(slow_engine, tok):
    with live_app(slow_engine(1), tok, max_waiting=1) as (url, state):
        body = {"messages": user("你好"), "max_tokens": 20, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
            end = time.time() + 30
            while state.model.engine.active < 1 and time.time() < end:
                time.sleep(0.01)
            waiting = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
            while len(state.model.engine.waiting) < 1 and time.time() < end:
                time.sleep(0.01)
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "server_busy"
            first, second = running.result(), waiting.result()
        assert first.status_code == second.status_code == 200
        assert first.json()["choices"][0]["message"] == second.json()["choices"][0]["message"]
        assert first.json()["usage"]["completion_tokens"] == 20
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_slot(slow_engine, tok):
    eng = slow_engine(2)
    with live_app(eng, tok) as (url, state):
        body = {"messages": user("你好"), "max_tokens": 50, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            end = time.time() + 30
            while eng.stats["tokens"] < 3 and time.time() < end:
                time.sleep(0.01)
            assert eng.active == 1
        # the connection is closed here, 50 tokens would take 1.5 s more
        end = time.time() + 30
        while eng.active and time.time() < end:
            time.sleep(0.01)
        assert eng.active == 0 and eng.stats["tokens"] < 45
        # and the server goes on
        r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
