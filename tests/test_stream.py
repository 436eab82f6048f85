"""Streaming decoding (same tokens as the one-program decoder) and what bin/chat prints."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import QA, REPO, one_line_error, run_main
from jaxsft import model
from jaxsft.config import ModelConfig
from jaxsft.decode import Generator, Sampling
from jaxsft.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def random_model():
    """An untrained tiny model: (tokenizer, config, graphdef, params)."""
    tok = Tokenizer.build(["abcdefghij你好世界\n"])
    cfg = ModelConfig(vocab_size=len(tok), max_seq_len=64, d_model=32, n_heads=4, n_layers=1, d_ff=64)
    graphdef, params = model.init(cfg, 0)
    return tok, cfg, graphdef, params


@pytest.mark.parametrize("seed", [0, 1])
def test_stream_ids_equals_generate_ids(random_model, seed):
    """Greedy and sampled: what bin/chat streams is what the batch decoder would answer."""
    tok, cfg, graphdef, params = random_model
    gen = Generator(params, cfg, tok, "", max_new_tokens=20)
    ids, _ = gen.prompt_ids([("user", "你好")])
    for sampling in (Sampling(), Sampling(temperature=1.0)):
        assert list(gen.stream_ids(ids, sampling, seed)) == gen.generate_ids([ids], sampling, seed)[0]


def test_stream_ids_yields_each_token_before_decoding_the_next(random_model, monkeypatch):
    from jaxsft import engine
    tok, cfg, graphdef, params = random_model
    gen = Generator(params, cfg, tok, "", max_new_tokens=20)
    ids, _ = gen.prompt_ids([("user", "abc")])
    want = gen.generate_ids([ids], Sampling(temperature=1.0), 0)[0]
    assert len(want) >= 2
    steps = []
    real_step = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda *a, **kw: steps.append(1) or real_step(*a, **kw))
    stream = gen.stream_ids(ids, Sampling(temperature=1.0), 0)
    assert next(stream) == want[0] and len(steps) == 0  # the first token comes from the prefill alone
    assert next(stream) == want[1] and len(steps) == 1
    stream.close()


def chat(*args, stdin="", encoding="ascii"):
    """bin/chat with a non-UTF-8 locale encoding: it must still read and write UTF-8."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONIOENCODING=encoding)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bin", "chat"), *map(str, args)], cwd=REPO, env=env,
                          input=stdin.encode("utf-8"), capture_output=True, timeout=120)
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


@pytest.mark.slow
def test_chat_interactive_streams_answers_and_knows_commands(trained_run):
    stdin = f"{QA[0][0]}\n/clear\n{QA[2][0]}\n/system 你是一个有帮助的AI助手。\n{QA[1][0]}\n/quit\n{QA[3][0]}\n"
    rc, out, err = chat("--checkpoint", trained_run["run_dir"], stdin=stdin)
    assert rc == 0, err
    answers = [l.replace("你> ", "") for l in out.splitlines() if l.replace("你> ", "")]  # prompts go to stdout
    assert answers == [QA[0][1], QA[2][1], QA[1][1]]  # nothing after /quit
    assert "(conversation cleared)" in err and "system prompt set to '你是一个有帮助的AI助手。'" in err


@pytest.mark.slow
def test_chat_compare_base_and_sft(trained_run, capsys, monkeypatch):
    """The base model gets <bos> + the raw text (no template); the SFT model answers in ChatML.
    (main() in this process: bin/chat's own, under an ASCII locale, is the test above.)"""
    from jaxsft import runs
    run = trained_run["run_dir"]
    q = QA[0][0]
    rc, out, err = run_main("chat", ["--checkpoint", run, "--compare", run, "--max-new-tokens", 10, q], capsys,
                            monkeypatch)
    assert rc == 0, err
    params, cfg, tok = runs.restore(run)
    base = Generator(params, cfg, tok, "", max_new_tokens=10)
    continuation = tok.decode(base.generate_ids([np.asarray([tok.bos_id] + tok.encode(q), np.int32)])[0])
    assert out.splitlines() == [
        f"instruction: {q}", "",
        f"[base {run}] continues the raw text:", q + continuation, "",
        f"[SFT {run}] answers in the chat template:", QA[0][1][:10],
    ]


def test_chat_compare_needs_a_question(tmp_path, capsys, monkeypatch):
    code, _, err = run_main("chat", ["--checkpoint", tmp_path, "--compare", tmp_path], capsys, monkeypatch)
    one_line_error(code, err, "--compare needs a question")
