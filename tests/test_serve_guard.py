"""Who may use the server and what a request may be (jaxsft/serve/guard.py, app.py's body
reading, access_log.py's request ids, metrics.py): the app in this process on a tiny engine,
driven by the official `openai` client and by raw HTTP; bin/serve's key options in process."""
import json
import logging
import socket
import time

import httpx
import pytest

from conftest import one_line_error, run_main
from live import live_app, never_ending_engine, openai_client, tiny_tokenizer, user

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    return never_ending_engine(tok, delay=0)


@pytest.fixture(scope="module")
def keyed(engine, tok):
    with live_app(engine(2), tok, api_keys=[KEY, "sk-other"]) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def open_app(engine, tok):
    with live_app(engine(2), tok) as (url, state):
        yield url, state


def chat(url, **headers):
    return httpx.post(url + "/v1/chat/completions", json={"messages": user("你好"), "max_tokens": 3,
                                                           "temperature": 0}, headers=headers, timeout=60)


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_api_key_with_the_openai_client(keyed):
    url, _ = keyed
    import openai
    for wrong in ("nope", KEY + "x", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as e:
            openai_client(url, api_key=wrong).chat.completions.create(model="slow", messages=user("你好"), max_tokens=3)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for key in (KEY, "sk-other"):
        r = openai_client(url, api_key=key).chat.completions.create(model="slow", messages=user("你好"),
                                                                     max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
    assert chat(url).status_code == 401
    assert chat(url, authorization=f"Basic {KEY}").status_code == 401  # the key, but not as a bearer token
    r = chat(url, authorization=f"Bearer {KEY}")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(url + "/metrics", timeout=30).status_code == 401
    # open without a key: the page (it asks for one) and the health check
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert httpx.get(url + "/", timeout=30).status_code == 200
    # with a key any Host name is served: the key is what DNS rebinding cannot get
    assert chat(url, authorization=f"Bearer {KEY}", host="example.com").status_code == 200


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_without_a_key_only_local_host_names(open_app, tok):
    url, _ = open_app
    port = url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert chat(url, host=host).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"192.168.1.5:{port}", ""):
        r = chat(url, host=host)
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", host
        assert httpx.get(url + "/health", headers={"host": host}, timeout=30).status_code == 403
    with live_app(never_ending_engine(tok, delay=0)(1), tok, allow_hosts=["box.lan"]) as (url2, _):
        assert chat(url2, host="box.lan:8000").status_code == 200
        assert chat(url2, host="evil.example").status_code == 403


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_bad_bodies_get_4xx_and_the_server_goes_on(open_app):
    url, _ = open_app
    post = url + "/v1/chat/completions"
    body = json.dumps({"messages": user("你好"), "max_tokens": 2})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": ctype} if ctype else {}
        r = httpx.post(post, content=body, headers=headers, timeout=30)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", ctype
    r = httpx.post(post, content=body, headers={"content-type": "application/json; charset=utf-8"}, timeout=30)
    assert r.status_code == 200
    # deep JSON: past the limit (33 levels) and past Python's recursion limit (100,000)
    for depth in (33, 100_000):
        r = httpx.post(post, content="[" * depth + "]" * depth, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 400 and "deeper than 32" in r.json()["error"]["message"], depth
    ok = {"messages": user("你好"), "max_tokens": 2, "metadata": {"a": [[[[[[[[1]]]]]]]]}}  # within the limit
    r = httpx.post(post, json=ok, timeout=30)
    assert r.status_code != 400 or "deeper" not in r.text
    assert chat(url).status_code == 200


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_an_abandoned_upload_is_one_info_line(open_app, caplog):
    url, _ = open_app
    host, port = url[7:].rsplit(":", 1)
    with caplog.at_level(logging.INFO, logger="jaxsft.serve"):
        for _ in range(3):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"messages\": [")
            time.sleep(0.05)
            s.close()
        end = time.time() + 10
        while time.time() < end and sum("left before" in r.getMessage() for r in caplog.records) < 3:
            time.sleep(0.05)
    lines = [r for r in caplog.records if r.name == "jaxsft.serve"]
    gone = [r for r in lines if "left before" in r.getMessage()]
    assert len(gone) == 3 and all(r.levelno == logging.INFO and '" 499 ' in r.getMessage() for r in gone)
    assert not [r for r in lines if r.levelno >= logging.WARNING], [r.getMessage() for r in lines]
    assert chat(url).status_code == 200


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_a_body_that_trickles_in_past_the_deadline_gets_408(open_app, monkeypatch):
    """A client that sends its headers and then too little of its body, too slowly, holds a
    connection: once BODY_SECONDS have passed it gets 408 with an error body, and the server goes on."""
    from jaxsft.serve import app
    monkeypatch.setattr(app, "BODY_SECONDS", 0.5)
    url, _ = open_app
    host, port = url[7:].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"messages\": [")
        t, reply = time.time(), b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            piece = s.recv(4096)
            if not piece:
                break
            reply += piece
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and 0.4 < time.time() - t < 10, head
    assert b"did not arrive within 0.5 s" in body and b'"request_timeout"' in body
    assert chat(url).status_code == 200


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_request_ids_are_echoed_and_logged(open_app, caplog):
    url, _ = open_app
    with caplog.at_level(logging.INFO, logger="jaxsft.serve"):
        r = chat(url, **{"x-request-id": "my-req.42"})
        assert r.headers["x-request-id"] == "my-req.42" and r.headers["x-content-type-options"] == "nosniff"
        made = chat(url, **{"x-request-id": "bad id with spaces"}).headers["x-request-id"]
        assert made != "bad id with spaces" and len(made) == 16 and int(made, 16) >= 0
        assert chat(url).headers["x-request-id"] not in (made, "my-req.42")
        bad = httpx.post(url + "/v1/chat/completions", json={}, headers={"x-request-id": "bad-1"}, timeout=30)
        assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-1"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert 'id=my-req.42 "POST /v1/chat/completions" 200' in text
    assert f'id={made} "POST /v1/chat/completions" 200' in text
    assert 'id=bad-1 "POST /v1/chat/completions" 400' in text


def metric(text, name, **labels):
    """One sample's value from Prometheus's text format (prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@pytest.mark.slow  # end to end: a live HTTP server (uvicorn in this process) and real clients
def test_metrics_count_requests_tokens_and_steps(tok):
    with live_app(never_ending_engine(tok, delay=0)(2), tok) as (url, state):
        for _ in range(3):
            assert chat(url).status_code == 200
        assert httpx.post(url + "/v1/chat/completions", json={}, timeout=30).status_code == 400
        r = httpx.get(url + "/metrics", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = r.text
        assert metric(m, "jaxsft_requests_total", path="/v1/chat/completions", status="200") == 3
        assert metric(m, "jaxsft_requests_total", path="/v1/chat/completions", status="400") == 1
        assert metric(m, "jaxsft_generation_tokens_total") == 9
        prompt = len(state.model.tok.encode("你好"))  # the rendered prompt is longer than the words
        assert metric(m, "jaxsft_prompt_tokens_total") > 3 * prompt
        assert metric(m, "jaxsft_time_to_first_token_seconds_count") == 3
        assert metric(m, "jaxsft_request_seconds_count", path="/v1/chat/completions") == 4
        assert metric(m, "jaxsft_requests_running") == 0 and metric(m, "jaxsft_requests_waiting") == 0
        assert metric(m, "jaxsft_engine_step_seconds_count") >= 3 * 2  # each answer: a prefill, then 2 steps


@pytest.mark.parametrize("args,env,words", [
    (["--host", "0.0.0.0"], None, "without an API key"),
    (["--api-key-file", "{tmp}/missing"], None, "cannot read the API key file"),
    (["--api-key-file", "{tmp}/empty"], None, "holds no API key"),
    (["--api-key", "a b"], None, "may not be empty or hold spaces"),
    (["--max-connections", "0"], None, "--max-connections"),
])
def test_serve_refuses_unsafe_or_bad_key_options(tmp_path, capsys, monkeypatch, trained_dir, args, env, words):
    (tmp_path / "empty").write_text("# no keys here\n\n")
    monkeypatch.delenv("JAXSFT_API_KEY", raising=False)
    code, _, err = run_main("serve", ["--checkpoint", trained_dir, *[a.format(tmp=tmp_path) for a in args]],
                            capsys, monkeypatch)
    one_line_error(code, err, words)


@pytest.fixture
def trained_dir(tmp_path):
    """A directory bin/serve takes for a run (the options are checked before the model is read)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    return str(tmp_path / "run")


def test_api_keys_from_the_file_and_the_environment(tmp_path):
    from jaxsft.cli.serve import api_keys, is_local
    f = tmp_path / "keys"
    f.write_text("# the team's keys\nsk-a\n\n  sk-b  \n")
    assert api_keys(["sk-c"], str(f), " sk-env ") == ["sk-c", "sk-a", "sk-b", "sk-env"]
    assert api_keys([], None, "") == []
    assert [is_local(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.1", "example.com")] == [
        True, True, True, False, False, False]
