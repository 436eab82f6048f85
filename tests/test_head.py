"""head.py: the output head's cross-entropy in chunks of positions (train.head_chunk) against the
head whole, and what it saves in XLA's plan.

Tolerances were measured first (2-core AMD EPYC, under the tests' XLA flags), as the largest
difference in any leaf relative to that leaf's largest magnitude: float32, chunked losses and
gradients are at most 6.7e-7 from the whole head's (the products' and softmax's sums blocked and
ordered otherwise), checked at RTOL = 2e-6; bfloat16 products, up to 1.3e-5 (the
softmax's gradient, float32 values a few ulp apart, rounded to bfloat16 for the products),
checked at RTOL_BF16 = 5e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsft import batching, dpo, head, lora, model, ops, steps
from jaxsft.config import LoraConfig, ModelConfig, TrainConfig, UserError, load_config

RTOL, RTOL_BF16 = 2e-6, 5e-5


def _close(a, b, rtol=RTOL):
    """Every leaf of a within rtol of b, relative to each leaf's largest magnitude."""
    def one(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * max(np.abs(y).max(), 1e-30))
    jax.tree.map(one, a, b)


def _whole(x, w, t, m, w_transposed):
    """The head whole, as model.GPT and steps.loss_sums compute it without chunks."""
    logits = ops.dense(x, w, w_transposed).astype(jnp.float32)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, t) * m)


def _chunked(x, w, t, m, w_transposed, chunk=32):
    return jnp.sum(head.token_nll(x, w, t, chunk, w_transposed) * m)


@pytest.mark.parametrize("w_transposed", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_loss_and_gradients_equal_the_whole_head(w_transposed, dtype):
    """A = 100 positions (not a multiple of the chunk, 32), 20 of them masked, V = 300: the summed
    loss and its gradients with respect to the hidden states and the head's weight."""
    A, D, V = 100, 16, 300
    kx, kw, kt = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (A, D))
    w = 0.3 * jax.random.normal(kw, (V, D) if w_transposed else (D, V))
    t = jax.random.randint(kt, (A,), 0, V)
    m = (jnp.arange(A) % 5 != 0).astype(jnp.float32)

    def grad(f):
        def run(x, w):
            with ops.products_in(jnp.dtype(dtype)):
                return f(x, w, t, m, w_transposed)
        return jax.jit(jax.value_and_grad(run, argnums=(0, 1)))(x, w)

    (s1, g1), (s2, g2) = grad(_whole), grad(_chunked)
    rtol = RTOL if dtype == "float32" else RTOL_BF16
    _close((s2, g2), (s1, g1), rtol)
    # a masked position's nll is finite and its gradient nothing
    assert float(jnp.abs(g2[0][0]).max()) == 0.0 and np.isfinite(float(s2))


def _examples(vocab, n=5, length=24, seed=0):
    """n random rows of `length` tokens, each with its loss on the last third."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.integers(1, vocab, length - i).astype(np.int32)
        mask = np.zeros(len(x), np.float32)
        mask[-len(x) // 3:] = 1
        out.append((x, np.roll(x, -1), mask))
    return out


def _loss_grad(graphdef, params, batch, chunk, dtype=jnp.float32, combine=None, frozen=None):
    """(summed loss, tokens), gradient of steps.loss_sums with the head in chunks of `chunk` (0: whole)."""
    def loss(p):
        with head.chunked(chunk):
            return steps.loss_sums(p if combine is None else combine(frozen, p), graphdef, batch, dtype=dtype)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_train_loss_in_chunks_equals_the_whole_head(tie, monkeypatch):
    """steps.loss_sums on a tiny model, answer_at padded with a loss-free position (61 answer
    tokens in 64 slots, chunks of 16): the loss and every parameter's gradient; without answer_at
    (the head over every position of the batch) too. head.MIN_LOGITS is lowered so that the tiny
    head is chunked; at the default it is not."""
    mc = ModelConfig(vocab_size=97, max_seq_len=32, d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.0,
                     tie_embeddings=tie)
    graphdef, params = model.init(mc, seed=0)
    batch = batching.pack_batch(_examples(97), 32, answer_slots=64)
    assert batch.answer_at is not None and int(batch.loss_mask.sum()) < 64
    whole = _loss_grad(graphdef, params, batch, 0)
    with head.chunked(16):
        assert head.chunk_for(64, 97) == 0  # small: whole
    monkeypatch.setattr(head, "MIN_LOGITS", 0)
    with head.chunked(16):
        assert head.chunk_for(64, 97) == 16 and head.chunk_for(16, 97) == 0
    _close(_loss_grad(graphdef, params, batch, 16), whole)
    everywhere = batch.replace(answer_at=None)
    _close(_loss_grad(graphdef, params, everywhere, 16), _loss_grad(graphdef, params, everywhere, 0))
    # bfloat16 products
    _close(_loss_grad(graphdef, params, batch, 16, jnp.bfloat16), _loss_grad(graphdef, params, batch, 0, jnp.bfloat16),
           RTOL_BF16)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_lora_new_rows_train_through_the_chunked_head(tie, monkeypatch):
    """Under LoRA the embedding (and an untied head) is frozen but for the rows of tokens the base
    lacks (embed.new_rows, lm_head.new_cols): their gradients through the chunked head equal the
    whole head's and are not zero; without new rows the frozen head's gradient is not asked for."""
    monkeypatch.setattr(head, "MIN_LOGITS", 0)
    mc = ModelConfig(vocab_size=97, max_seq_len=32, d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.0,
                     tie_embeddings=tie)
    _, params = model.init(mc, seed=0)
    lc = LoraConfig(rank=4, alpha=8.0)
    batch = batching.pack_batch(_examples(97, seed=1), 32, answer_slots=64)
    for n_old in (90, None):
        graphdef, base, adapters = lora.init(mc, lc, 0, params, n_old)
        adapters = jax.tree.map(lambda a: a + 0.01, adapters)  # lora_b nonzero: every path matters
        whole = _loss_grad(graphdef, adapters, batch, 0, combine=lora.combine, frozen=base)
        chunked = _loss_grad(graphdef, adapters, batch, 16, combine=lora.combine, frozen=base)
        _close(chunked, whole)
        flat = dict(nnx_flat(chunked[1]))
        if n_old is not None:
            assert np.abs(np.asarray(flat[lora.NEW_ROWS])).max() > 0
            if not tie:
                assert np.abs(np.asarray(flat[lora.NEW_COLS])).max() > 0


def nnx_flat(state):
    from flax import nnx
    return [(path, v.get_value()) for path, v in nnx.to_flat_state(state)]


def test_dpo_logps_in_chunks_equal_the_whole_head(monkeypatch):
    """dpo.answer_logps reads per-token log-probabilities through steps.token_nll: chunked, the
    six per-pair sums and their gradients are the whole head's."""
    monkeypatch.setattr(head, "MIN_LOGITS", 0)
    mc = ModelConfig(vocab_size=97, max_seq_len=32, d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.0)
    graphdef, params = model.init(mc, seed=0)
    ex = _examples(97, n=4, seed=2)
    plan = batching.BatchPlan([(ex[0], ex[1]), (ex[2], ex[3])], 2, 0, (32,), 32, pairs=True,
                              reference=np.zeros((2, 2), np.float32))
    batch = plan.batch_of(np.arange(2))

    def run(chunk):
        def f(p):
            with head.chunked(chunk):
                out = dpo.answer_logps(p, graphdef, batch, 2)
            return out[0].sum() - 0.5 * out[1].sum(), out
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    _close(run(8), run(0))


@pytest.mark.slow  # XLA's memory plan of large compiled programs, never run (seconds of compiling each)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunking_cuts_the_train_steps_planned_temporaries(tie, dtype):
    """At V = 32768 and 512 answer positions (d_model 64) the whole head's (A, V) float32 logits
    are 64 MiB; with train.head_chunk 128 XLA plans at least that much less temporary memory for
    the train step (memory_analysis: 135-146 MiB whole, 47-63 MiB chunked), and less in all than
    the whole logits: they are never all alive, forward or backward. Fails with the chunking
    taken out (both plans the same)."""
    V, A, L = 32768, 512, 128
    mc = ModelConfig(vocab_size=V, max_seq_len=L, d_model=64, n_heads=2, n_layers=1, d_ff=128, dropout=0.0,
                     tie_embeddings=tie)
    graphdef, params = model.init(mc, seed=0)
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(8):
        x = rng.integers(1, V, L).astype(np.int32)
        mask = np.zeros(L, np.float32)
        mask[-A // 8:] = 1
        examples.append((x, np.roll(x, -1), mask))
    batch = batching.make_batch(examples, 8, L)
    batch = batch.replace(answer_at=np.flatnonzero(batch.loss_mask.reshape(-1)).astype(np.int32))
    assert batch.answer_at.shape == (A,)

    def temp(chunk):
        tc = TrainConfig(batch_size=8, warmup_steps=0, head_chunk=chunk, dtype=dtype)
        tx = steps.make_optimizer(tc, 10)
        step = steps.make_train_step(graphdef, tx, tc)
        state = steps.TrainState.create(params, tx)
        compiled = step.lower(state, batch, jax.random.PRNGKey(0)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, chunked = temp(0), temp(128)
    assert whole - chunked >= A * V * 4 and chunked < A * V * 4, (whole, chunked)


def test_head_chunk_must_not_be_negative():
    with pytest.raises(UserError, match="--set train.head_chunk: must not be negative, got -1"):
        load_config(None, ["train.head_chunk=-1"])


def test_a_frozen_heads_gradient_is_not_computed():
    """Differentiated with respect to the hidden states only (LoRA's frozen embedding), the chunked
    head's backward pass skips the weight's gradient: XLA counts 2 C V D fewer FLOPs than with the
    weight's gradient too (its cost analysis counts a loop's body once: one chunk of C = 64
    positions). head.py asks for it only where the weight is perturbed (custom_vjp's symbolic
    zeros); XLA on CPU also drops a loop-carried gradient nobody reads, so this pins the outcome,
    not the mechanism."""
    A, D, V, C = 256, 32, 4096, 64
    x, w = jnp.ones((A, D)), jnp.ones((V, D))
    t, m = jnp.zeros((A,), jnp.int32), jnp.ones((A,))

    def flops(argnums):
        f = jax.jit(jax.grad(lambda x, w: _chunked(x, w, t, m, True, C), argnums=argnums))
        cost = f.lower(x, w).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops((0, 1)) - flops(0) >= 2 * C * V * D


@pytest.mark.parametrize("w_transposed", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_chunked_head_never_copies_its_weight(w_transposed, dtype):
    """Differentiated with respect to the hidden states (LoRA's frozen head), the chunked head's
    temporaries are one chunk's (C, V) float32 logits (8 MiB) and, with bfloat16 products, the
    weight's bfloat16 cast (16 MiB): less than the float32 weight itself (V = 32768, D = 256:
    32 MiB). Fails if a loop reads w.T, which XLA copies whole into the loop's row-major layout
    (the first version of head.py planned 40 and 44.5 MiB here)."""
    A, D, V, C = 512, 256, 32768, 64
    x = jax.ShapeDtypeStruct((A, D), jnp.float32)
    w = jax.ShapeDtypeStruct((V, D) if w_transposed else (D, V), jnp.float32)
    t, m = jnp.zeros((A,), jnp.int32), jnp.ones((A,))

    def loss(x, w):
        with ops.products_in(jnp.dtype(dtype)):
            return _chunked(x, w, t, m, w_transposed, C)

    ma = jax.jit(jax.grad(loss)).lower(x, w).compile().memory_analysis()
    assert ma.temp_size_in_bytes < V * D * 4, ma.temp_size_in_bytes


def test_chunked_head_trains_like_the_whole_head_with_accumulation_and_dropout(monkeypatch):
    """Three train steps (make_train_step, which enters head.chunked(train.head_chunk)) with
    2 micro-batches, dropout 0.1 and the head over every position (no answer_at), without remat
    and with train.remat block: the losses within RTOL and the parameters within 3e-5 of the whole
    head's without remat (measured: 5.9e-6, AdamW at lr 1e-2 magnifying the gradients' rounding).
    One reference for both: remat's own agreement is test_attention's."""
    monkeypatch.setattr(head, "MIN_LOGITS", 0)
    mc = ModelConfig(vocab_size=97, max_seq_len=32, d_model=32, n_heads=2, n_layers=1, d_ff=64, dropout=0.1)
    batch = batching.make_batch(_examples(97, n=8), 8, 24)

    def run(chunk, remat):
        graphdef, params = model.init(mc, seed=0)
        tc = TrainConfig(batch_size=8, warmup_steps=0, lr=1e-2, grad_accum_steps=2, remat=remat, head_chunk=chunk)
        tx = steps.make_optimizer(tc, 10)
        state, step, losses = steps.TrainState.create(params, tx), steps.make_train_step(graphdef, tx, tc), []
        for _ in range(3):
            state, m = step(state, batch, jax.random.PRNGKey(0))
            losses.append(float(m["loss"]))
        return losses, jax.tree.map(np.asarray, state.params)

    l0, p0 = run(0, "none")
    for remat in ("none", "block"):
        l1, p1 = run(16, remat)
        np.testing.assert_allclose(l1, l0, rtol=RTOL, err_msg=remat)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=3e-5, err_msg=remat), p1, p0)
