"""The chat server: request checks and text streaming as pure functions; a live bin/serve
(the tiny trained model) driven by the official `openai` client, 16 concurrent streams,
every bad request, a headless Chromium on the chat page, and SIGTERM; busy and
disconnecting clients against an in-process server whose engine is slowed down."""
import base64
import contextlib
import functools
import hashlib
import itertools
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
import jax
import numpy as np
import pytest

from conftest import QA, lazy_import
from live import chromium, free_server, live_app, never_ending_engine, openai_client, tiny_tokenizer, user
from jaxsft import chatml
from jaxsft import model as model_lib
from jaxsft.serve.protocol import ApiError, parse_chat
from jaxsft.tokenizer import SPECIALS, TextStream, Tokenizer

CONTEXT = 64  # the tiny run's max_seq_len
openai = lazy_import("openai")  # at first use (conftest.TOGETHER)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# -- pure functions

BAD = [  # (body, status, param, words in the message)
    ({}, 400, "messages", "required"),
    ({"messages": []}, 400, "messages", "empty"),
    ({"messages": "hi"}, 400, "messages", "array"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages[0].role", "bot"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "string"),
    ({"messages": user("你" * 60)}, 400, "messages", "context is 64"),
    # content parts: text only
    ({"messages": [{"role": "user", "content": ["hi"]}]}, 400, "messages[0].content[0]", "object"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "你"}, {"type": "image_url",
                                                                                 "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[1].type", "not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages[0].content[0].text", "string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]}, 400,
     "messages[0].content[0].x", "unrecognized"),
    ({"messages": [{"role": "user", "content": "a", "name": "bob"}]}, 400, "messages[0].name", "not supported"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": [{"id": "1"}]}]}, 400, "messages[0].tool_calls",
     "not supported"),
    ({"messages": [{"role": "user", "content": "a", "mood": "ok"}]}, 400, "messages[0].mood", "unrecognized"),
    ({"messages": [{"role": "tool", "content": "a"}]}, 400, "messages[0].role", "developer"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}]}, 400,
     "messages[1].role", "first"),
    # another model; keys OpenAI does not know; features this server lacks, other than "off"
    ({"messages": user("你好"), "model": "gpt-4o"}, 404, "model", "does not exist"),
    ({"messages": user("你好"), "model": 4}, 400, "model", "string"),
    ({"messages": user("你好"), "temprature": 0}, 400, "temprature", "unrecognized request argument"),
    ({"messages": user("你好"), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "not supported"),
    ({"messages": user("你好"), "tool_choice": "required"}, 400, "tool_choice", "not supported"),
    ({"messages": user("你好"), "functions": [{"name": "f"}]}, 400, "functions", "not supported"),
    ({"messages": user("你好"), "function_call": {"name": "f"}}, 400, "function_call", "not supported"),
    ({"messages": user("你好"), "logit_bias": {"7": 5}}, 400, "logit_bias", "not supported"),
    ({"messages": user("你好"), "response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
    ({"messages": user("你好"), "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ({"messages": user("你好"), "presence_penalty": -1}, 400, "presence_penalty", "not supported"),
    ({"messages": user("你好"), "presence_penalty": False}, 400, "presence_penalty", "not supported"),
    ({"messages": user("你好"), "audio": {"voice": "alloy", "format": "wav"}}, 400, "audio", "not supported"),
    ({"messages": user("你好"), "modalities": ["text", "audio"]}, 400, "modalities", "not supported"),
    ({"messages": user("你好"), "prediction": {"type": "content", "content": "x"}}, 400, "prediction",
     "not supported"),
    ({"messages": user("你好"), "reasoning_effort": "high"}, 400, "reasoning_effort", "not supported"),
    ({"messages": user("你好"), "verbosity": "low"}, 400, "verbosity", "not supported"),
    ({"messages": user("你好"), "web_search_options": {}}, 400, "web_search_options", "not supported"),
    ({"messages": user("你好"), "service_tier": "flex"}, 400, "service_tier", "not supported"),
    ({"messages": user("你好"), "store": True}, 400, "store", "not supported"),
    ({"messages": user("你好"), "metadata": {"k": "v"}}, 400, "metadata", "not supported"),
    ({"messages": user("你好"), "parallel_tool_calls": "yes"}, 400, "parallel_tool_calls", "not supported"),
    ({"messages": user("你好"), "user": 7}, 400, "user", "string"),
    # logprobs
    ({"messages": user("你好"), "logprobs": "yes"}, 400, "logprobs", "boolean"),
    ({"messages": user("你好"), "top_logprobs": 3}, 400, "top_logprobs", "'logprobs': true"),
    ({"messages": user("你好"), "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "[0, 20]"),
    ({"messages": user("你好"), "logprobs": True, "top_logprobs": -1}, 400, "top_logprobs", "[0, 20]"),
    ({"messages": user("你好"), "logprobs": True, "top_logprobs": 2.5}, 400, "top_logprobs", "integer"),
    # stream options
    ({"messages": user("你好"), "stream": True, "stream_options": {"include_usage": "no"}}, 400,
     "stream_options.include_usage", "boolean"),
    ({"messages": user("你好"), "stream": True, "stream_options": {"usage": True}}, 400, "stream_options.usage",
     "unrecognized"),
    ({"messages": user("你好"), "stream": True, "stream_options": {"include_obfuscation": True}}, 400,
     "stream_options.include_obfuscation", "not supported"),
    ({"messages": user("你好"), "stream": True, "stream_options": []}, 400, "stream_options", "object"),
    ({"messages": user("你好"), "stream_options": {"include_usage": True}}, 400, "stream_options", "'stream': true"),
    ({"messages": user("你好"), "max_tokens": 3, "max_completion_tokens": 4}, 400, "max_tokens", "not both"),
    # bounded work, before any tokenising: stop strings, messages, characters
    ({"messages": user("你好"), "stop": ["a" * 64, "b" * 65]}, 400, "stop", "at most 64 characters"),
    ({"messages": user("你") * 65}, 400, "messages", "65 messages"),
    ({"messages": user("你" * 65)}, 400, "messages", "65 characters"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "你" * 40}] * 2}]}, 400, "messages",
     "80 characters"),
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
        parse_chat(body, tok, CONTEXT, "", "tiny")
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


def test_parse_chat_joins_text_parts_takes_developer_as_system_and_off_values(tok):
    msgs = [{"role": "system", "content": "你好"}, {"role": "user", "content": "1+1等于几？"}]
    want = parse_chat({"messages": msgs}, tok, CONTEXT, "默认", "tiny")
    parts = [{"role": "developer", "content": [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]},
             {"role": "user", "content": [{"type": "text", "text": "1+1等于几？"}]}]
    # the "off" values of features this server lacks, the keys that ask for nothing, and the model's name
    off = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "tools": [], "tool_choice": "none",
           "functions": None, "parallel_tool_calls": False, "response_format": {"type": "text"},
           "modalities": ["text"], "audio": None, "store": False, "metadata": {}, "service_tier": "auto",
           "user": "u-1", "safety_identifier": "s", "prompt_cache_key": "k", "model": "tiny", "n": 1,
           "max_tokens": None}
    got = parse_chat({"messages": parts, **off}, tok, CONTEXT, "默认", "tiny")
    assert got.prompt.tolist() == want.prompt.tolist()
    assert parse_chat({"messages": msgs, "model": None}, tok, CONTEXT, "默认", "tiny").prompt.tolist() == \
        want.prompt.tolist()  # no model: the one served
    # an assistant message as a client echoes it back (null or empty extras)
    echoed = {"role": "assistant", "content": "等于2。", "refusal": None, "tool_calls": None, "function_call": None,
              "audio": None, "annotations": []}
    assert parse_chat({"messages": [*msgs, echoed, *user("你好")]}, tok, CONTEXT, "", "tiny").prompt.tolist() == \
        chatml.render([("system", "你好"), ("user", "1+1等于几？"), ("assistant", "等于2。"), ("user", "你好")], tok, "",
                      add_generation_prompt=True)[0].tolist()
    p = parse_chat({"messages": msgs, "logprobs": True, "top_logprobs": 20, "stream": True,
                    "stream_options": {"include_usage": True}}, tok, CONTEXT, "", "tiny")
    assert (p.logprobs, p.top_logprobs, p.include_usage) == (True, 20, True)
    p = parse_chat({"messages": msgs, "stream": True, "stream_options": {"include_usage": False}}, tok, CONTEXT, "",
                   "tiny")
    assert (p.logprobs, p.top_logprobs, p.include_usage) == (False, 0, False)


def test_the_bounds_are_what_can_never_fit(tok):
    """context messages and context x max_token_chars characters pass the bounds (the context
    check after rendering refuses them); one more of either is refused before tokenising."""
    for body in ({"messages": user("你") * 31 + [{"role": "user", "content": "你" * 33}]},
                 {"messages": user("你") * CONTEXT}):
        with pytest.raises(ApiError, match="the prompt is"):
            parse_chat(body, tok, CONTEXT, "", "tiny")
    assert tok.max_token_chars == 1
    big = [{"role": "user", "content": "你" * 33}] * 2
    with pytest.raises(ApiError, match="66 characters"):
        parse_chat({"messages": big}, tok, CONTEXT, "", "tiny")


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


def test_text_stream_says_which_tokens_its_text_carries():
    ts = TextStream(ByteTok(), stop=["好a"])
    carried = []
    for b in "你好b".encode():
        ts.feed(b)
        carried.append(ts.carried())
    assert carried == [0, 0, 3, 3, 3, 3, 7]  # 你 once whole; 好 once it cannot start "好a" any more
    assert ts.ends == [1, 1, 1, 2, 2, 2, 3]  # in characters: a byte of 你 ends where 你 does

    class Words:  # tokens of several characters
        def decode(self, ids):
            return "".join(["ab", "cd", "ef"][i] for i in ids)

    ts = TextStream(Words(), stop=["d"])
    assert (ts.feed(0), ts.carried()) == ("ab", 1)
    assert ts.feed(1) == "c" and ts.stopped and ts.carried() == 1
    assert ts.carried(final=True) == 2  # "cd" is cut by the stop string: its "c" is in the answer


def test_text_stream_costs_the_same_per_token_with_long_stop_strings():
    """A stop string is matched character by character as text arrives: 4 stop strings of 64
    characters whose starts keep matching cost about what 4 of 2 do (the old check tried every
    prefix of every stop string at every token: ~20x)."""
    class Chars:
        def decode(self, ids):
            return "a" * len(ids)

    def per_token(stop):
        best = float("inf")
        for _ in range(5):
            ts = TextStream(Chars(), stop)
            t = time.perf_counter()
            for _ in range(400):
                ts.feed(0)
            best = min(best, time.perf_counter() - t)
            assert not ts.stopped and ts.text == "a" * (400 - max(len(s) for s in stop) + 1)
        return best

    long_, short = per_token(["a" * 63 + "b", "a" * 62 + "bc", "a" * 61 + "bcd", "a" * 60 + "bcde"]), per_token(
        ["ab", "ab", "ab", "ab"])
    assert long_ < 4 * short, (long_, short)


# -- a live bin/serve on the tiny trained model

@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("serve") / "serve.log")
    proc, url = free_server(trained_run["run_dir"], log, "--slots", 8, "--queue", 8)
    yield {"url": url, "proc": proc, "log": log, "run": trained_run}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@functools.lru_cache
def served(url) -> str:
    """The name of the model the server at `url` serves (/v1/models): a request for another is a 404."""
    return openai_client(url).models.list().data[0].id


def ask(client, messages, stream=False, **kw):
    """(text, finish_reason) of one chat completion, streamed or not."""
    model = served(str(client.base_url).removesuffix("/v1/"))
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model=model, messages=messages, temperature=0, stream=True, **kw))
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
    r = client.chat.completions.create(model=served(server["url"]), messages=user(QA[0][0]), temperature=0)
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
        return client.chat.completions.create(model=served(server["url"]), messages=user(QA[0][0]), temperature=2.0,
                                              seed=seed,
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


# -- in-process, through the official openai client: an engine on a random tiny model (rows never end)

class SlowTok(Tokenizer):
    """The tiny tokenizer, 1 s slower at encoding a text with 慢 in it."""

    def encode(self, text, specials=False):
        if "慢" in text:
            time.sleep(1.0)
        return super().encode(text, specials)


@pytest.fixture(scope="module")
def quick(tok):
    slow = SlowTok(tok.itos[len(SPECIALS):])
    assert slow.itos == tok.itos
    with live_app(never_ending_engine(tok, delay=0)(2), slow) as (url, state):
        yield {"url": url, "state": state, "client": openai_client(url), "model": served(url)}


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_requests_are_tokenised_off_the_event_loop(quick):
    """A request that takes 1 s to tokenise does not hold up the server's other requests."""
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, quick["url"] + "/v1/chat/completions", timeout=60,
                           json={"messages": user("慢"), "max_tokens": 1})
        time.sleep(0.3)
        t = time.perf_counter()
        assert httpx.get(quick["url"] + "/v1/models", timeout=60).status_code == 200
        assert time.perf_counter() - t < 0.5 and not slow.done()
        assert slow.result().status_code == 200


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_openai_client_sends_content_parts_and_the_developer_role(quick):
    client, model = quick["client"], quick["model"]

    def answer(messages, **kw):
        r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8, **kw)
        return r.choices[0].message.content, r.usage.prompt_tokens

    plain = answer([{"role": "system", "content": "你好"}, *user("1+1等于几？")])
    parts = [{"role": "developer", "content": [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]},
             {"role": "user", "content": [{"type": "text", "text": "1+1"}, {"type": "text", "text": "等于几？"}]}]
    assert answer(parts) == plain
    # "off" values are accepted, anything else is refused naming the key, never ignored
    assert answer(parts, frequency_penalty=0, tools=[], response_format={"type": "text"}, user="u-1") == plain
    image = [{"role": "user", "content": [{"type": "text", "text": "你"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
    for messages, kw, param in [(image, {}, "messages[0].content[1].type"), (parts, {"presence_penalty": 1}, "presence_penalty"),
                                (parts, {"extra_body": {"beam_width": 4}}, "beam_width")]:
        with pytest.raises(openai.BadRequestError) as e:
            answer(messages, **kw)
        assert e.value.status_code == 400 and e.value.param == param, e.value


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_openai_client_gets_404_for_another_model(quick):
    with pytest.raises(openai.NotFoundError) as e:
        quick["client"].chat.completions.create(model="gpt-4o", messages=user("你好"))
    assert (e.value.code, e.value.param, e.value.type) == ("model_not_found", "model", "invalid_request_error")
    assert quick["model"] in e.value.message


def _ends(content):
    """Where each logprobs entry's text ends in the answer (characters)."""
    return list(itertools.accumulate(len(bytes(e.bytes).decode()) for e in content))


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_openai_client_gets_logprobs_whole_and_streamed(quick, tok):
    """Each token's logprob is log_softmax(model.apply(prompt + answer)) at the position before it,
    to 1e-4 (float32, cached vs whole forward pass); top_logprobs are the most likely tokens, most
    likely first, the chosen one first when greedy; a streamed chunk carries the entries of the
    tokens whose text it carries, also when a stop string holds text back."""
    client, model, eng = quick["client"], quick["model"], quick["state"].model.engine
    # sampled (the random model's greedy answer is one marker again and again), seeded: the same each time
    body = dict(model=model, messages=user("你好"), temperature=1.0, seed=3, max_tokens=16)
    r = client.chat.completions.create(**body, logprobs=True, top_logprobs=5)
    text, content = r.choices[0].message.content, r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 16 and len(text) > 8
    assert b"".join(bytes(e.bytes) for e in content).decode() == text
    prompt = parse_chat({"messages": user("你好")}, tok, CONTEXT, "").prompt
    seq = np.concatenate([prompt, [tok.stoi[e.token] for e in content]])[None]
    want = np.asarray(jax.jit(lambda p, s: jax.nn.log_softmax(model_lib.apply(eng.graphdef, p, s)[0][0], axis=-1))(
        eng.params, seq))
    for i, e in enumerate(content):
        row = want[len(prompt) - 1 + i]
        assert abs(e.logprob - row[tok.stoi[e.token]]) < 1e-4
        top = [c.logprob for c in e.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True)
        np.testing.assert_allclose(top, np.sort(row)[::-1][:5], atol=1e-4)
        assert [tok.stoi[c.token] for c in e.top_logprobs] == list(np.argsort(-row)[:5])
    greedy = client.chat.completions.create(**{**body, "temperature": 0}, logprobs=True, top_logprobs=3)
    for e in greedy.choices[0].logprobs.content:  # the chosen token is the most likely one
        assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
    plain = client.chat.completions.create(**body)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == text
    bare = client.chat.completions.create(**body, logprobs=True).choices[0].logprobs.content
    assert [(e.token, e.logprob, e.top_logprobs) for e in bare] == [(e.token, e.logprob, []) for e in content]

    def streamed(**kw):
        chunks = list(client.chat.completions.create(**body, stream=True, logprobs=True, top_logprobs=2, **kw))
        out = []
        for c in chunks:
            if c.choices and c.choices[0].delta.content:
                got = c.choices[0].logprobs.content
                assert b"".join(bytes(e.bytes) for e in got).decode() == c.choices[0].delta.content
                out += got
            elif c.choices and c.choices[0].logprobs:
                assert all(not e.bytes for e in c.choices[0].logprobs.content)
                out += c.choices[0].logprobs.content
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), out

    got, entries = streamed()
    assert got == text and [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]
    assert [len(e.top_logprobs) for e in entries] == [2] * 16
    # a stop string: its first character is held back, then cut with it; the entries end before it
    stop = text[2:4]
    cut = text.find(stop)
    got, entries = streamed(stop=[stop])
    assert got == text[:cut]
    assert [e.token for e in entries] == [e.token for e, end in zip(content, _ends(content)) if end <= cut]


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


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
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


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_bin_serve_freezes_what_start_up_built_out_of_the_collectors_sight(slow_engine, tok):
    """freeze_gc (bin/serve passes it): once ready, the engine and everything built before it are
    in the collector's permanent generation, so no full collection scans them mid-stream."""
    import gc
    eng = slow_engine(1)
    try:
        with live_app(eng, tok, freeze_gc=True) as (url, state):
            assert state.status == "ready" and gc.get_freeze_count() > 10_000
            assert not any(o is eng for o in gc.get_objects())
            r = httpx.post(url + "/v1/chat/completions", json={"messages": user("你好"), "max_tokens": 2}, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        gc.unfreeze()  # the rest of the suite's process collects as usual


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
