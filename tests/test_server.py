"""The chat server: request checks and text streaming as pure functions; a live bin/serve
(the tiny trained model) driven by the official `openai` client, 16 concurrent streams,
every bad request, a headless Chromium on the chat page, and SIGTERM; busy and
disconnecting clients against an in-process server whose engine is slowed down."""
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

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
    # a streamed answer of its own: the log line below does not depend on which tests ran before
    r = httpx.post(server["url"] + "/v1/chat/completions", timeout=60,
                   json={"messages": user(QA[1][0]), "temperature": 0, "stream": True})
    assert r.status_code == 200 and "data: [DONE]" in r.text
    page = httpx.get(server["url"] + "/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]  # page.py's headers from bin/serve too
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
    from selenium.webdriver.support.ui import WebDriverWait
    with chat_page(server["url"]) as browser:  # under its Content-Security-Policy: a violation fails here
        wait = WebDriverWait(browser, 60)
        history = []
        for turn, (q, _) in enumerate(QA[:2]):
            page_ask(browser, q)
            answers = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".assistant")]
            # the page sends the whole conversation: the API's greedy answer to it
            history += user(q)
            want = ask(openai_client(server["url"]), history)[0]
            assert answers[turn] == want
            history.append({"role": "assistant", "content": want})
        assert answers[0] == QA[0][1]
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")] == [q for q, _ in QA[:2]]
        assert not browser.find_element(By.ID, "keyform").is_displayed()  # a server without keys: no key asked
        assert not browser.find_elements(By.CSS_SELECTOR, ".failed, .error")
        browser.save_screenshot(str(tmp_path / "chat-page.png"))
        # a refused request says why
        temp = browser.find_element(By.ID, "temperature")
        temp.clear()
        temp.send_keys("5")
        page_ask(browser, "你好", answered=False)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".error"))
        err = browser.find_element(By.CSS_SELECTOR, ".error").text
        assert "refused" in err and "400" in err and "temperature" in err


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


# -- the chat page: its Content-Security-Policy, failed answers, API keys

class PageParts(HTMLParser):
    """The page as a browser parses it: the text of each inline <script> and <style>, and every attribute."""

    def __init__(self, html):
        super().__init__()
        self.inline, self.attrs, self.tag = {"script": [], "style": []}, [], None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k) for k, _ in attrs]
        if tag in self.inline:
            self.tag = tag
            self.inline[tag].append("")

    def handle_endtag(self, tag):
        self.tag = None

    def handle_data(self, data):
        if self.tag:
            self.inline[self.tag][-1] += data


def test_page_csp_allows_its_own_script_and_style_by_hash():
    from fastapi.testclient import TestClient
    from jaxsft.serve.app import create_app
    client = TestClient(create_app(lambda: None), base_url="http://localhost")  # no lifespan: no model
    r = client.get("/")
    assert r.status_code == 200 and client.get("/health").headers["x-content-type-options"] == "nosniff"
    parts = PageParts(r.text)
    assert [len(parts.inline["script"]), len(parts.inline["style"])] == [1, 1]

    def sha256(text):
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    csp = dict(d.strip().split(None, 1) for d in r.headers["content-security-policy"].split(";"))
    assert csp == {"default-src": "'none'", "script-src": sha256(parts.inline["script"][0]),
                   "style-src": sha256(parts.inline["style"][0]), "connect-src": "'self'",
                   "base-uri": "'none'", "form-action": "'none'", "frame-ancestors": "'none'"}
    assert (r.headers["x-content-type-options"], r.headers["referrer-policy"], r.headers["x-frame-options"]) == (
        "nosniff", "no-referrer", "DENY")
    # what a hash-only policy would block: event-handler and style attributes, scripts from files
    assert not [a for a in parts.attrs if a[1].startswith("on") or a[1] in ("style", "src", "href")], parts.attrs


@contextlib.contextmanager
def chat_page(url):
    """The chat page in a headless Chromium, its script running; yields the browser. A
    Content-Security-Policy violation in the console (or a policy it cannot read), at load
    or later, fails the test."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser, profile = chromium()
    console = []

    def blocked():
        console.extend(browser.get_log("browser"))
        return [e["message"] for e in console if e["source"] == "security" or "Content Security" in e["message"]]

    try:
        browser.get(url + "/")
        # the script fills in the status line at once; a blocked one never does
        WebDriverWait(browser, 30).until(lambda b: blocked() or b.find_element(By.ID, "status").text)
        assert not blocked()
        yield browser
        assert not blocked()
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def page_ask(browser, question, answered=True):
    """Types `question` into the page; with `answered`, waits for its answer to end and
    returns the answer's element."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    n, e = (len(browser.find_elements(By.CSS_SELECTOR, c)) for c in (".assistant", ".error"))
    browser.find_element(By.ID, "input").send_keys(question, Keys.ENTER)
    if answered:
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant:not(.pending)")) > n
                                         or len(b.find_elements(By.CSS_SELECTOR, ".error")) > e)
        answers = browser.find_elements(By.CSS_SELECTOR, ".assistant")
        assert len(answers) > n, browser.find_elements(By.CSS_SELECTOR, ".error")[-1].text  # refused: no answer
        return answers[-1]


@pytest.fixture(scope="module")
def trained(trained_run):
    """The tiny trained model in this process (Generator: params, cfg, tok, system_prompt)."""
    from jaxsft.decode import Generator
    return Generator.from_run(trained_run["run_dir"])


def trained_engine(g, slots=2, engine_class=None):
    from jaxsft.engine import Engine
    return (engine_class or Engine)(g.params, g.cfg, g.tok.stop_ids, slots, g.tok.pad_id)


@pytest.mark.slow
def test_page_leaves_a_failed_answer_out_of_the_conversation(trained, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from jaxsft.engine import Engine
    from jaxsft.serve import protocol

    class Failing(Engine):
        """Keeps each request's prompt; with `fail_in` set, the decode step that many steps on
        waits for `go`, then raises."""
        prompts, fail_in, go = [], None, threading.Event()

        def submit(self, req):
            self.prompts.append([int(t) for t in req.prompt])
            return super().submit(req)

        def decode(self):
            if self.fail_in is not None:
                self.fail_in -= 1
                if self.fail_in < 0:
                    self.fail_in = None
                    self.go.wait(60)
                    raise RuntimeError("a decode step failed (the test's)")
            return super().decode()

    g = trained
    eng = trained_engine(g, engine_class=Failing)

    def sent(*turns):  # the prompt the server makes of these turns
        msgs = [{"role": r, "content": c} for r, c in turns]
        return parse_chat({"messages": msgs}, g.tok, g.cfg.max_seq_len, g.system_prompt).prompt.tolist()

    (q0, a0), (q1, a1), (q2, a2), (q3, a3) = QA
    with live_app(eng, g.tok, system_prompt=g.system_prompt) as (url, _), chat_page(url) as browser:
        def last_error():
            return browser.find_elements(By.CSS_SELECTOR, ".error")[-1].text

        assert page_ask(browser, q1).text == a1 and eng.prompts == [sent(("user", q1))]
        history = [("user", q1), ("assistant", a1)]  # what every later request must carry: no failed turn
        # 1. an error event mid-stream: the engine fails after a few tokens
        eng.fail_in = 2
        page_ask(browser, q0, answered=False)  # the prefill's token and two decode steps' are shown ...
        WebDriverWait(browser, 60).until(lambda b: len(b.find_element(By.CSS_SELECTOR, ".pending").text) == 3)
        eng.go.set()  # ... then the third step fails
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".failed"))
        out = browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
        assert "failed" in out.get_attribute("class") and len(out.text) == 3 and "stopped the answer" in last_error()
        # 2. a stream that ends without its [DONE]: the whole text came, the end did not
        monkeypatch.setattr(protocol, "DONE", "")
        out = page_ask(browser, q3)
        assert eng.prompts[-1] == sent(*history, ("user", q3))
        assert "failed" in out.get_attribute("class") and out.text and "broke off" in last_error()
        # 3. a broken connection: the server's stream raises after the answer's text
        monkeypatch.setattr(protocol, "DONE", None)
        broken = page_ask(browser, q2)
        assert eng.prompts[-1] == sent(*history, ("user", q2))
        # (what the page had not read yet when the connection broke is lost: Chrome drops it)
        assert "failed" in broken.get_attribute("class") and "No answer" in last_error()
        monkeypatch.undo()
        # and after the three, the next request still carries the first turn only
        out = page_ask(browser, q2)
        assert eng.prompts[-1] == sent(*history, ("user", q2))
        assert "failed" not in out.get_attribute("class") and out.text.startswith(broken.text)  # the same request
        assert len(browser.find_elements(By.CSS_SELECTOR, ".failed")) == 3 and len(eng.prompts) == 5


@pytest.mark.slow
def test_page_asks_for_the_api_key_and_keeps_it_for_the_tab(trained):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    g = trained
    (_, _), (q1, a1), (q2, a2), _ = QA
    with live_app(trained_engine(g), g.tok, system_prompt=g.system_prompt, api_keys=("sk-right",)) as (url, _), \
            chat_page(url) as browser:
        wait = WebDriverWait(browser, 60)
        form, prompt, key = (browser.find_element(By.ID, i) for i in ("keyform", "keyprompt", "key"))
        assert not form.is_displayed()
        page_ask(browser, q1, answered=False)
        wait.until(lambda b: form.is_displayed())  # the 401 asks for a key
        assert "needs an API key" in prompt.text and key.get_attribute("type") == "password"
        key.send_keys("sk-wrong", Keys.ENTER)
        wait.until(lambda b: "refused" in prompt.text and form.is_displayed())  # refused: asked again
        key.send_keys("sk-right", Keys.ENTER)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant:not(.pending)"))
        assert browser.find_element(By.CSS_SELECTOR, ".assistant").text == a1 and not form.is_displayed()
        assert browser.execute_script("return [sessionStorage.getItem('jaxsft-api-key'), localStorage.length]") == [
            "sk-right", 0]
        # the tab's key goes with the next question (a new conversation's) without asking
        browser.find_element(By.ID, "clear").click()
        assert page_ask(browser, q2).text == a2 and not form.is_displayed()
        assert not browser.find_elements(By.CSS_SELECTOR, ".error, .failed")
