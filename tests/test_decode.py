"""The KV-cache decoder against the naive one, stopping, bucketing, sampling.

Random tiny models get their weight matrices scaled x20 so greedy choices are not
near-ties. Prompt lengths stay in 3..8 and answers at 6 tokens, so the naive
decoder compiles one forward pass per sequence length, shared by every test.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_decode
from jaxsft import engine, model
from jaxsft.config import ModelConfig
from jaxsft.decode import Generator, Sampling
from jaxsft.tokenizer import Tokenizer

N = 6  # new tokens
P = 10  # padded prompt length for direct `generate` calls
NEVER = -5  # an end id no model can emit
PAD = -1  # distinguishable from every real token


@pytest.fixture(scope="module")
def tok(qa):
    return Tokenizer.build([t for pair in qa for t in pair] + ["\n"])


@pytest.fixture(scope="module")
def cfg(tok):
    return ModelConfig(vocab_size=len(tok), max_seq_len=64, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                       dropout=0.0)


def _scaled(params, k=20.0):
    return jax.tree.map(lambda x: x * k if x.ndim == 2 else x, params)


@pytest.fixture(scope="module")
def models(cfg):
    """[(graphdef, params)] of three random models, weights scaled x20."""
    out = []
    for seed in range(3):
        graphdef, params = model.init(cfg, seed)
        out.append((graphdef, _scaled(params)))
    return out


def _prompts(vocab, lens, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(7, vocab, n).astype(np.int32) for n in lens]


def _left_pad(prompts, length=P):
    arr = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        arr[i, length - len(p):] = p
    return jnp.asarray(arr), jnp.asarray([len(p) for p in prompts], jnp.int32)


def _generate(graphdef, params, cfg, prompts, end_id, sampling=Sampling(), key=0):
    arr, lens = _left_pad(prompts)
    spec = reference_decode.Spec(graphdef, cfg, max_new_tokens=N, end_id=end_id, pad_id=PAD, sampling=sampling)
    out = reference_decode.generate(params, arr, lens, jax.random.PRNGKey(key), spec=spec)
    return np.asarray(out).tolist()


def _padded(tokens):
    return tokens + [PAD] * (N - len(tokens))


def test_cached_decoder_matches_naive(models, cfg):
    prompts = _prompts(cfg.vocab_size, (3, 8, 5))  # different lengths, left-padded together
    for graphdef, params in models:
        out = _generate(graphdef, params, cfg, prompts, NEVER)
        naive = [reference_decode.naive_greedy(graphdef, params, p, N, NEVER, cfg.max_seq_len) for p in prompts]
        assert out == naive
        assert len({tuple(r) for r in naive}) > 1  # the rows really differ


def test_stops_at_end_token(models, cfg):
    graphdef, params = models[0]
    prompts = _prompts(cfg.vocab_size, (3, 8, 5))
    free = _generate(graphdef, params, cfg, prompts, NEVER)
    # end id = a token the first row emits for the first time at step j >= 1
    j = next(j for j in range(1, N) if free[0][j] not in free[0][:j])
    end = free[0][j]
    out = _generate(graphdef, params, cfg, prompts, end)
    for row, f in zip(out, free):
        stop = f.index(end) + 1 if end in f else N  # each row stops on its own first end token
        assert row == _padded(f[:stop])
    assert out[0] == _padded(free[0][: j + 1]) and PAD in out[0]
    # the naive decoder agrees on where it stops
    assert reference_decode.naive_greedy(graphdef, params, prompts[0], N, end, cfg.max_seq_len) == free[0][: j + 1]


def test_top_k_1_equals_greedy(cfg):
    # an unscaled random model: near-uniform logits, so any real sampling would differ
    graphdef, params = model.init(cfg, 7)
    prompts = _prompts(cfg.vocab_size, (3, 8, 5))
    greedy = _generate(graphdef, params, cfg, prompts, NEVER)
    for key in (0, 1):
        assert _generate(graphdef, params, cfg, prompts, NEVER, Sampling(temperature=1.0, top_k=1), key) == greedy


def test_pick_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.3, 0.1]] * 2000))  # (2000, 4)
    key = jax.random.PRNGKey(0)
    pick = jax.jit(reference_decode.pick, static_argnums=2)
    np.testing.assert_array_equal(pick(logits, key, Sampling()), 1)  # greedy
    np.testing.assert_array_equal(pick(logits, key, Sampling(temperature=1.0, top_k=1)), 1)
    counts = np.bincount(np.asarray(pick(logits, key, Sampling(temperature=1.0))), minlength=4)
    assert (counts > 100).all()  # plain sampling draws every token
    assert abs(counts[1] / 2000 - 0.5) < 0.05
    counts = np.bincount(np.asarray(pick(logits, key, Sampling(temperature=1.0, top_k=2))), minlength=4)
    assert counts[0] == counts[3] == 0 and counts[1] > counts[2] > 400
    # top_p 0.7: the smallest prefix reaching 0.7 is {0.5, 0.3}
    counts = np.bincount(np.asarray(pick(logits, key, Sampling(temperature=1.0, top_p=0.7))), minlength=4)
    assert counts[0] == counts[3] == 0 and counts[1] > counts[2] > 400
    # a tiny top_p keeps only the most likely token
    np.testing.assert_array_equal(pick(logits, key, Sampling(temperature=1.0, top_p=0.01)), 1)


def test_generator_matches_naive_and_buckets_compile(models, cfg, tok, monkeypatch):
    """Prefill traces once per prompt bucket, whatever ran before: the engine's prefill is jitted
    afresh here (the same function, its traces counted by chex) for this test alone."""
    chex.clear_trace_counter()
    monkeypatch.setattr(engine, "_prefill", jax.jit(chex.assert_max_traces(engine._prefill.__wrapped__, n=2),
                                                    static_argnames=("graphdef",), donate_argnums=(1,)))
    graphdef, params = models[1]
    gen = Generator(params, cfg, tok, system_prompt="", max_new_tokens=N)
    prompts = _prompts(cfg.vocab_size, (5, 7), seed=1)
    got = gen.generate_ids(prompts)  # bucket 16: the first trace
    for p, ids in zip(prompts, got):
        naive = reference_decode.naive_greedy(graphdef, params, p, N, tok.end_id, cfg.max_seq_len)
        assert ids == [t for t in naive if t != tok.end_id]
    # other prompt lengths in the same bucket (16) and as many rows trace nothing new
    gen.generate_ids(_prompts(cfg.vocab_size, (4, 9), seed=2))
    assert engine._prefill._cache_size() == 1
    # a longer prompt goes to the next bucket (64): the second and last trace
    gen.generate_ids(_prompts(cfg.vocab_size, (40, 3), seed=3))
    assert engine._prefill._cache_size() == 2


def test_generator_answer_renders_chatml(models, cfg, tok):
    graphdef, params = models[2]
    gen = Generator(params, cfg, tok, system_prompt="", max_new_tokens=N)
    ids, truncated = gen.prompt_ids([("user", "你好")])
    assert not truncated
    assert ids.tolist() == [tok.bos_id, tok.user_id, *tok.encode("你好"), tok.end_id, *tok.encode("\n"),
                            tok.assistant_id]
    naive = reference_decode.naive_greedy(graphdef, params, ids, N, tok.end_id, cfg.max_seq_len)
    assert gen.answer([[("user", "你好")]]) == [tok.decode(naive)]
