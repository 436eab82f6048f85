"""What the server tests share: a bin/serve on a free port, the app in this process, the
official `openai` client, a headless Chromium."""
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import QA, REPO

CONTEXT = 64  # the tiny models' max_seq_len


def user(text):
    return [{"role": "user", "content": text}]


# bin/serve with every decode step (the worker's per-token call) 30 ms slower, so that answers are still running when a test acts
SLOW_SERVE = ("import time; from jaxsft import engine; decode = engine.Engine.decode; "
              "engine.Engine.decode = lambda self: time.sleep(0.03) or decode(self); "
              "from jaxsft.cli.serve import main; main()")


def free_server(run_dir, log_path, *args, deadline=300, slow=False, code=None):
    """Starts bin/serve on a free port (--port 0), its output to `log_path`; returns
    (process, base url) once /health answers 200. code: a `python -c` program to run
    instead (one that patches jaxsft, then calls jaxsft.cli.serve.main)."""
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONIOENCODING="utf-8")
    env.setdefault("JAX_PLATFORMS", "cpu")
    log = open(log_path, "w", encoding="utf-8")
    cmd = ["-c", code] if code else ["-c", SLOW_SERVE] if slow else [os.path.join(REPO, "bin", "serve")]
    proc = subprocess.Popen([sys.executable, *cmd, "--checkpoint", run_dir, "--port", "0", *map(str, args)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    end, url = time.time() + deadline, None
    while time.time() < end:
        text = open(log_path, encoding="utf-8").read()
        if proc.poll() is not None:
            raise AssertionError(f"bin/serve exited with {proc.returncode}:\n{text}")
        m = url or re.search(r"listening on (http://\S+)", text)
        if m:
            url = url or m.group(1)
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return proc, url
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"bin/serve not ready after {deadline} s:\n{open(log_path, encoding='utf-8').read()}")


def openai_client(url, api_key="none"):
    from openai import OpenAI
    return OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)


@contextlib.contextmanager
def live_app(engine, tok, system_prompt="", **kw):
    """The app on a free port in this process (uvicorn in a thread); yields (url, state)."""
    import uvicorn
    from jaxsft.serve.app import create_app
    from jaxsft.serve.serving import Model
    app = create_app(lambda: Model(engine, tok, system_prompt, "slow"), warm_up=False, **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.time() + 120
        while time.time() < end:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.05)
        yield url, app.state.jaxsft
    finally:
        server.should_exit = True
        thread.join(30)


def chromium():
    """A headless Chromium through selenium (Debian's chromium + chromium-driver), or skip."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("needs chromium and chromedriver: sudo apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", "--window-size=1000,700"):
        opts.add_argument(a)
    import tempfile
    profile = tempfile.mkdtemp(prefix="chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, CSP violations included
    return webdriver.Chrome(service=Service(driver), options=opts), profile


def tiny_tokenizer():
    from jaxsft.tokenizer import Tokenizer
    return Tokenizer.build([q + a for q, a in QA] + ["\n", "你是一个有帮助的AI助手。"])


def never_ending_engine(tok, delay=0.03, engine_class=None):
    """slots -> an Engine on a random tiny model whose rows never end (stop id -5), `delay` s
    more per decode step (the worker's per-token call), so that requests overlap for sure."""
    from jaxsft import model
    from jaxsft.config import ModelConfig
    from jaxsft.engine import Engine
    cfg = ModelConfig(vocab_size=len(tok), max_seq_len=CONTEXT, d_model=32, n_heads=2, n_layers=1, d_ff=64)
    _, params = model.init(cfg, 0)

    class Slow(engine_class or Engine):
        def decode(self):
            time.sleep(delay)
            return super().decode()

    return lambda slots: Slow(params, cfg, (-5,), slots=slots)
