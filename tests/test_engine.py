"""The continuous-batching engine: a row's tokens are the same alone or among others,
equal the naive decoder's, slots are freed as rows end, and nothing recompiles.

Random tiny models with weight matrices scaled x20 (as in test_decode) so greedy
choices are not near-ties; prompts of 3..8 tokens and 6-token answers, so the
naive decoder's programs are shared with test_decode.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_decode
from faults import Flaky
from jaxsft import engine, masks, model, parallel
from jaxsft.config import ModelConfig
from jaxsft.engine import Engine, Request

N = 6  # answer tokens
NEVER = (-5,)  # stop ids no model emits


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig(vocab_size=40, max_seq_len=64, d_model=32, n_heads=2, n_layers=2, d_ff=64, dropout=0.0)


@pytest.fixture(scope="module")
def scaled(cfg):
    graphdef, params = model.init(cfg, 1)
    return graphdef, jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x, params)


def _prompts(vocab, lens, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(7, vocab, n).astype(np.int32) for n in lens]


def _answers(eng, prompts, stop=NEVER, **kw):
    eng.stop_ids = stop
    reqs = [Request(p, N, **kw) for p in prompts]
    eng.run(reqs)
    return [r.tokens for r in reqs], reqs


def test_slot_step_mask():
    m = masks.slot_step(jnp.asarray([0, 2]), 4)
    chex.assert_shape(m, (2, 1, 4))  # (B, 1, S)
    chex.assert_type(m, bool)
    assert m[:, 0].tolist() == [[True, False, False, False], [True, True, True, False]]


def test_rows_alone_equal_rows_among_others_and_the_naive_decoder(scaled, cfg):
    graphdef, params = scaled
    prompts = _prompts(cfg.vocab_size, (3, 8, 5, 4, 7, 6, 3))
    eng = Engine(params, cfg, NEVER, slots=4)
    alone = [_answers(eng, [p])[0][0] for p in prompts]
    # 7 rows over 4 slots: three wait, then join as slots free; rows of different lengths side by side
    together, _ = _answers(eng, prompts)
    assert together == alone
    naive = [reference_decode.naive_greedy(graphdef, params, p, N, NEVER, cfg.max_seq_len) for p in prompts]
    assert together == naive
    assert len({tuple(a) for a in alone}) > 1  # the rows really differ
    # the cache: a (keys, values) pair per layer, each (slots, kv heads, S, head dim) in the parameters' dtype
    assert len(eng.cache) == cfg.n_layers and all(len(kv) == 2 for kv in eng.cache)
    chex.assert_shape(jax.tree.leaves(eng.cache), (4, cfg.kv_heads, cfg.max_seq_len, cfg.head_dim))
    chex.assert_type(jax.tree.leaves(eng.cache), jnp.float32)
    # the slots' state: one entry a slot (the random key's two words)
    chex.assert_shape([eng.tok, eng.pos, eng.i, eng.temperature, eng.top_k, eng.top_p], (4,))
    chex.assert_shape(eng.keys, (4, 2))
    chex.assert_type([eng.tok, eng.pos, eng.i, eng.top_k], np.int32)
    chex.assert_type(eng.keys, np.uint32)
    # the same rows in another order, among others mid-answer: still the same tokens
    eng.stop_ids = NEVER
    first = [eng.submit(Request(p, N)) for p in prompts[:2]]
    eng.step()
    eng.step()
    late = [eng.submit(Request(p, N)) for p in prompts[2:][::-1]]
    while not all(r.done for r in first + late):
        eng.step()
    assert [r.tokens for r in first] + [r.tokens for r in late][::-1] == alone


def test_prompts_after_a_shared_prefix_give_the_same_answers_and_cache(scaled, cfg):
    """Engine(prefix=...): prompts that start with the prefix are prefilled after it (the prefix
    once per call, the rest in a shorter bucket); others whole. Answers equal the plain engine's
    and the naive decoder's, and the slots' keys and values equal a whole-prompt prefill's."""
    graphdef, params = scaled
    prefix = _prompts(cfg.vocab_size, (9,), seed=5)[0]
    rests = _prompts(cfg.vocab_size, (3, 8, 5, 1, 7), seed=6)
    prompts = [np.concatenate([prefix, r]) for r in rests] + _prompts(cfg.vocab_size, (4, 12), seed=7)
    prompts.append(prefix[:6].copy())  # shorter than the prefix: whole
    plain = Engine(params, cfg, NEVER, slots=4)
    after = Engine(params, cfg, NEVER, slots=4, prefix=prefix)
    assert after._after(prompts[0]) == 9 and after._after(prompts[-2]) == 0 and after._after(prompts[-1]) == 0
    want, _ = _answers(plain, prompts)
    got, _ = _answers(after, prompts)
    assert got == want == [reference_decode.naive_greedy(graphdef, params, p, N, NEVER, cfg.max_seq_len) for p in prompts]
    assert after.stats["prefill_after_prefix"] == 5 and plain.stats["prefill_after_prefix"] == 0
    # the cache a prefixed prompt leaves in its slot: the whole prompt's keys and values
    for eng in (plain, after):
        eng.stop_ids = NEVER
        eng.run([Request(prompts[1], 1)])  # one token: prefilled, never decoded, into slot 0
    for (pk, pv), (ak, av) in zip(plain.cache, after.cache):
        n = len(prompts[1])
        np.testing.assert_allclose(ak[0, :, :n], pk[0, :, :n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(av[0, :, :n], pv[0, :, :n], rtol=1e-5, atol=1e-5)


def test_a_shorter_cache_gives_the_same_answers_and_bounds_requests(scaled, cfg):
    """Engine(context=C): a cache of C positions a slot (Generator sizes it to the batch), the
    same greedy answers as the full one; a request that would not fit is refused."""
    graphdef, params = scaled
    prompts = _prompts(cfg.vocab_size, (3, 8, 5, 12))
    short = Engine(params, cfg, NEVER, slots=2, context=24)
    assert short.S == 24 and short.buckets[-1] == 24 and all(b <= 24 for b in short.buckets)
    got, _ = _answers(short, prompts)
    assert got == _answers(Engine(params, cfg, NEVER, slots=2), prompts)[0]
    chex.assert_shape(jax.tree.leaves(short.cache), (2, cfg.kv_heads, 24, cfg.head_dim))  # C positions a slot
    with pytest.raises(ValueError, match="context of 24"):
        short.check(Request(prompts[3], 13))
    assert Engine(params, cfg, NEVER, context=10 ** 6).S == cfg.max_seq_len


def test_rows_end_on_their_own_and_free_their_slots(scaled, cfg):
    _, params = scaled
    prompts = _prompts(cfg.vocab_size, (3, 8, 5))
    eng = Engine(params, cfg, NEVER, slots=2)
    free, _ = _answers(eng, prompts)
    # stop ids that rows 0 and 1 write at steps >= 1: each row stops at the first of either it
    # writes, the others go on
    stops = tuple(f[next(j for j in range(1, N) if f[j] not in f[:j])] for f in free[:2])
    out, reqs = _answers(eng, prompts, stop=stops)
    assert sum(r.finish_reason == "stop" for r in reqs) >= 2
    for row, f, r in zip(out, free, reqs):
        stop = next((j for j, t in enumerate(f) if t in stops), N)
        assert row == f[:stop]
        assert r.finish_reason == ("stop" if stop < N else "length")
    assert eng.active == 0 and not eng.busy
    # max_tokens and cancel
    eng.stop_ids = NEVER
    short = eng.submit(Request(prompts[0], 2))
    gone = eng.submit(Request(prompts[1], N))
    eng.step()
    eng.cancel(gone)
    while eng.busy:
        eng.step()
    assert short.tokens == free[0][:2] and short.finish_reason == "length"
    assert gone.finish_reason == "cancelled" and len(gone.tokens) < N


def test_a_cancelled_stream_frees_its_slot(scaled, cfg):
    _, params = scaled
    eng = Engine(params, cfg, NEVER, slots=1)
    stream = eng.stream(Request(_prompts(cfg.vocab_size, (4,))[0], N))
    next(stream)
    stream.close()
    assert eng.active == 0 and not eng.busy


def test_sampling_is_per_row_and_seeded(scaled, cfg):
    _, params = scaled
    graphdef, raw = model.init(cfg, 2)  # unscaled: near-uniform logits, so sampling really varies
    prompts = _prompts(cfg.vocab_size, (3, 8, 5, 4))
    eng = Engine(raw, cfg, NEVER, slots=4)
    greedy, _ = _answers(eng, prompts)
    hot = dict(temperature=1.0)
    alone = [_answers(eng, [p], seed=7 + i, **hot)[0][0] for i, p in enumerate(prompts)]
    reqs = [Request(p, N, seed=7 + i, **hot) for i, p in enumerate(prompts)]
    reqs.insert(2, Request(prompts[0], N))  # a greedy row among sampled ones
    eng.run(reqs)
    assert [r.tokens for r in reqs[:2] + reqs[3:]] == alone
    assert reqs[2].tokens == greedy[0]
    assert alone != greedy
    # top_k 1 is greedy whatever the key
    assert _answers(eng, prompts, temperature=1.0, top_k=1, seed=3)[0] == greedy


def test_logprobs_equal_the_full_forward_passes(cfg):
    """Request(logprobs=True): each answer token's log-probability and its top 20 are those of
    log_softmax(model.apply(prompt + answer)) at the position before it (the model's own
    distribution, before temperature), to 1e-4 (float32; the cached and the full forward pass
    add up in other orders); rows that did not ask get None and the same tokens as before."""
    graphdef, raw = model.init(cfg, 2)  # unscaled: log-probabilities near -log(V), none ~0
    prompts = _prompts(cfg.vocab_size, (3, 8, 5, 4))
    eng = Engine(raw, cfg, NEVER, slots=4)
    plain, _ = _answers(eng, prompts, temperature=1.5, seed=4)
    got = {}
    reqs = [Request(p, N, temperature=1.5 * (j % 2), seed=4, logprobs=j != 2,
                    on_token=lambda r, t, lp: got.setdefault(r.id, []).append(lp)) for j, p in enumerate(prompts)]
    eng.run(reqs)
    assert reqs[1].tokens == plain[1] and reqs[3].tokens == plain[3]  # sampled rows: the same draws
    assert all(lp is None for lp in got[reqs[2].id]) and len(got[reqs[2].id]) == N
    K = engine.TOP_LOGPROBS
    log_softmax = jax.jit(lambda seq: jax.nn.log_softmax(model.apply(graphdef, raw, seq)[0][0], axis=-1))
    for j, r in enumerate(reqs):
        if j == 2:
            continue
        lps = got[r.id]
        assert len(lps) == N == len(r.tokens)
        seq = np.concatenate([r.prompt, r.tokens])[None]
        want = np.asarray(log_softmax(seq))  # (T, V)
        for i, (t, lp) in enumerate(zip(r.tokens, lps)):
            row = want[len(r.prompt) - 1 + i]
            np.testing.assert_allclose(lp.logprob, row[t], atol=1e-4)
            chex.assert_shape([lp.top_ids, lp.top_logprobs], (K,))
            np.testing.assert_array_equal(lp.top_ids, np.argsort(-row)[:K])
            np.testing.assert_allclose(lp.top_logprobs, row[lp.top_ids], atol=1e-4)
            assert np.all(np.diff(lp.top_logprobs) <= 0)  # most likely first
            if r.temperature == 0:  # greedy: the chosen token is the most likely one
                assert lp.top_ids[0] == t and lp.logprob == lp.top_logprobs[0]
    assert reqs[1].tokens != [int(lp.top_ids[0]) for lp in got[reqs[1].id]]  # sampling really drew others
    assert eng.want.sum() == 0  # free slots ask for nothing


@pytest.mark.parametrize("placed", [False, True], ids=["device", "one-device-mesh"])
def test_no_recompilation_after_warm_up(scaled, cfg, placed):
    """placed: the parameters on a one-device mesh, as the trainer's evaluation hook has them
    (the cache must be placed as the programs' outputs are, or the first call's program is
    compiled again for the second)."""
    _, params = scaled
    if placed:
        params = jax.device_put(params, parallel.replicated(parallel.one_device_mesh()))
    eng = Engine(params, cfg, NEVER, slots=4)
    eng.warm_up()
    n = engine.compiled_programs()
    # every prompt bucket, every prefill row count, sampling and greedy, slots refilled
    lens = (3, 15, 17, 33, 40, 50, 5, 9, 2, 12, 11, 8, 7, 6, 4, 3, 30, 31, 20)
    reqs = [Request(p, 8, temperature=float(i % 2), top_p=0.9, logprobs=i % 3 == 0)
            for i, p in enumerate(_prompts(cfg.vocab_size, lens))]
    eng.run(reqs)
    assert all(len(r.tokens) == 8 for r in reqs)
    assert engine.compiled_programs() == n
    assert 0 < eng.occupancy() <= 1
    # a cache allocated afresh (as after a failed step lost it) is placed as the programs' outputs are
    eng.cache = None
    eng.run([Request(p, 2) for p in _prompts(cfg.vocab_size, (3, 20))])
    assert engine.compiled_programs() == n


def test_requests_beyond_the_context_are_refused(scaled, cfg):
    _, params = scaled
    eng = Engine(params, cfg, NEVER, slots=1)
    with pytest.raises(ValueError, match="context of 64"):
        eng.submit(Request(np.ones(60, np.int32), 5))
    with pytest.raises(ValueError, match="empty"):
        eng.submit(Request(np.zeros(0, np.int32), 5))


# -- failures: a step that raises ends exactly the requests it held, and the engine goes on

class Boom(BaseException):
    """What a buggy callback might raise: no Exception, so no `except Exception` stops it."""


def _fault(monkeypatch, name):
    flaky = Flaky(getattr(engine, name))
    monkeypatch.setattr(engine, name, flaky)
    return flaky


def _cache_alive(eng):
    return not any(a.is_deleted() for a in jax.tree.leaves(eng.cache))


def test_a_failed_prefill_ends_the_requests_it_held_and_the_others_go_on(scaled, cfg, monkeypatch):
    _, params = scaled
    pa, pc, px, pe = _prompts(cfg.vocab_size, (5, 4, 6, 3))
    pd = _prompts(cfg.vocab_size, (20,), seed=1)[0]  # a longer bucket: its own prefill call, after c's and x's
    eng = Engine(params, cfg, NEVER, slots=4)
    want = {k: _answers(eng, [p])[0][0] for k, p in dict(a=pa, e=pe).items()}
    prefill = _fault(monkeypatch, "_prefill")
    a = eng.submit(Request(pa, N))
    eng.step()
    c, x, d, e = (eng.submit(Request(p, N)) for p in (pc, px, pd, pe))  # 3 free slots: e waits
    prefill.arm()
    with pytest.raises(engine.StepFailed, match="prefill failed: RuntimeError: injected failure 1$"):
        eng.step()
    # c and x were in the failed call, d taken off the queue for the next one: each ended, none lost
    assert [r.finish_reason for r in (c, x, d)] == ["error"] * 3
    assert all(r.error == "prefill failed: RuntimeError: injected failure 1" for r in (c, x, d))
    # the cache was never handed over: a keeps its row, e stays queued
    assert _cache_alive(eng) and eng.req.count(a) == 1 and eng.active == 1 and list(eng.waiting) == [e]
    while eng.busy:
        eng.step()
    assert (a.finish_reason, a.tokens, e.tokens) == ("length", want["a"], want["e"])


def test_a_prefill_that_lost_the_cache_ends_every_running_request_and_allocates_another(scaled, cfg, monkeypatch):
    graphdef, params = scaled
    pa, pc = _prompts(cfg.vocab_size, (5, 4))
    eng = Engine(params, cfg, NEVER, slots=2)
    want, _ = _answers(eng, [pa])
    prefill = _fault(monkeypatch, "_prefill")
    a = eng.submit(Request(pa, N))
    eng.step()
    c = eng.submit(Request(pc, N))
    lost = [kv[0] for kv in eng.cache]
    prefill.arm(consume=True)  # the program ran (JAX deleted the donated cache), then failed
    with pytest.raises(engine.StepFailed, match="the KV cache was lost and allocated again"):
        eng.step()
    assert all(k.is_deleted() for k in lost)  # a real loss: JAX took the donated cache
    assert c.finish_reason == a.finish_reason == "error" and eng.active == 0
    assert c.error.startswith("prefill failed") and a.error.startswith("the KV cache was lost when a prefill failed")
    assert _cache_alive(eng)
    n = engine.compiled_programs()
    assert _answers(eng, [pa])[0] == want  # the fresh cache serves, with the programs compiled already
    assert engine.compiled_programs() == n


def test_a_failed_decode_ends_the_running_requests_and_the_queued_ones_are_answered(scaled, cfg, monkeypatch):
    _, params = scaled
    pa, pb, pe = _prompts(cfg.vocab_size, (5, 4, 3))
    eng = Engine(params, cfg, NEVER, slots=2)
    want = _answers(eng, [pe])[0][0]
    decode = _fault(monkeypatch, "_decode")
    a, b, e = (eng.submit(Request(p, N)) for p in (pa, pb, pe))
    eng.step()
    decode.arm(consume=True)
    with pytest.raises(engine.StepFailed, match="decode failed: RuntimeError: injected failure 1 "):
        eng.step()
    assert a.finish_reason == b.finish_reason == "error" and len(a.tokens) == 2
    assert a.error == b.error == "decode failed: RuntimeError: injected failure 1"
    assert _cache_alive(eng) and list(eng.waiting) == [e]
    while eng.busy:
        eng.step()
    assert (e.finish_reason, e.tokens) == ("length", want)


def test_a_lost_cache_that_cannot_be_allocated_again_breaks_the_engine(scaled, cfg, monkeypatch):
    _, params = scaled
    eng = Engine(params, cfg, NEVER, slots=2)
    a = eng.submit(Request(_prompts(cfg.vocab_size, (5,))[0], N))
    eng.step()
    _fault(monkeypatch, "_decode").arm(consume=True)

    def no_memory(self):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    monkeypatch.setattr(Engine, "_allocate", no_memory)
    with pytest.raises(engine.EngineBroken, match="allocating another failed: RuntimeError: RESOURCE_EXHAUSTED"):
        eng.step()
    assert a.finish_reason == "error" and a.error.startswith("decode failed")


def test_a_callback_that_raises_ends_every_request_its_prefill_held(scaled, cfg):
    """A BaseException from on_token (a bug) goes through, but only after the requests the
    prefill held have ended: those of its call and those taken for the next call."""
    _, params = scaled
    pc, px = _prompts(cfg.vocab_size, (4, 6))
    pd = _prompts(cfg.vocab_size, (20,), seed=1)[0]
    eng = Engine(params, cfg, NEVER, slots=4)
    ended = []

    def boom(r, t, lp):
        raise Boom("a bug in a callback")

    c = eng.submit(Request(pc, N, on_token=boom, on_finish=ended.append))
    x, d = (eng.submit(Request(p, N, on_finish=ended.append)) for p in (px, pd))
    with pytest.raises(Boom):
        eng.step()
    assert ended == [c, x, d] and all(r.error == "prefill failed: Boom: a bug in a callback" for r in ended)
    assert eng.active == 0 and not eng.busy


def test_cancelled_waiting_requests_leave_the_queue(scaled, cfg):
    _, params = scaled
    eng = Engine(params, cfg, NEVER, slots=1)
    pa, pw = _prompts(cfg.vocab_size, (5, 4))
    a = eng.submit(Request(pa, N))
    eng.step()
    w = eng.submit(Request(pw, N))
    assert not eng.has_room(1) and eng.status().waiting == 1
    eng.cancel(w)  # its client went away: it no longer takes a place in the queue
    assert eng.has_room(1) and eng.status().waiting == 0
    eng.step()  # ... and it ends at the next step, though no slot is free
    assert w.finish_reason == "cancelled" and not a.done and not eng.waiting
