"""The GPT: shapes, tied head, parameter count, no biases, init, RoPE, causality, dropout.

Every forward pass goes through one jitted `apply` with inputs of shape (2, 12)
so the file compiles few programs.
"""
import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jitted_vjp
from jaxsft import model, ops
from jaxsft.config import ModelConfig

CFG = ModelConfig(vocab_size=50, max_seq_len=64, d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.0)
B, T = 2, 12
POS = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

apply = jax.jit(model.apply, static_argnums=0)


def _tokens(seed=0, high=10):
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, (B, T)), jnp.int32)


def _leaves(params):
    """[(path string, array)] of a parameter tree."""
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]


def _replace(params, name, fn):
    """params with every leaf whose path contains `name` replaced by fn(leaf)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(x) if name in jax.tree_util.keystr(p) else x, params)


@pytest.fixture(scope="module")
def built():
    return model.init(CFG, seed=0)


@pytest.fixture(scope="module")
def fwd(built):
    """(params, tokens (B, T), positions (B, T)) -> logits (B, T, V)."""
    graphdef = built[0]
    return lambda params, tokens, positions=POS: apply(graphdef, params, tokens, positions=positions)[0]


def test_abstract_is_the_models_tree_and_each_callers_own(built):
    """model.abstract (traced once per config): the initialised model's graph and its tree of
    shapes and dtypes; a caller that replaces a leaf in its tree changes no other caller's."""
    graphdef, params = built
    g1, a1 = model.abstract(CFG)
    assert g1 == graphdef
    chex.assert_trees_all_equal_shapes_and_dtypes(a1, params)
    a1["norm"]["scale"] = None
    assert model.abstract(CFG)[1]["norm"]["scale"] == jax.ShapeDtypeStruct((CFG.d_model,), jnp.float32)


def test_output_shapes(built, fwd):
    graphdef, params = built
    logits = fwd(params, _tokens())
    chex.assert_shape(logits, (B, T, CFG.vocab_size))
    assert logits.dtype == jnp.float32
    # with a KV cache of 20 slots: per layer (k, v), each (B, H, S, K), written at [index, index + T)
    H, K = CFG.n_heads, CFG.head_dim
    cache = [(np.zeros((B, H, 20, K), np.float32),) * 2 for _ in range(CFG.n_layers)]
    mask = np.ones((B, T, 20), bool)
    logits, new = apply(graphdef, params, _tokens(), positions=POS, mask=mask, cache=cache, index=3)
    chex.assert_shape(logits, (B, T, CFG.vocab_size))
    assert len(new) == CFG.n_layers
    chex.assert_shape([c for kv in new for c in kv], (B, H, 20, K))
    k0 = np.asarray(new[0][0])
    assert not k0[:, :, :3].any() and not k0[:, :, 3 + T:].any() and k0[:, :, 3:3 + T].all(axis=-1).any()


def test_output_head_is_tied_to_embedding(built, fwd):
    """Rows of unused tokens set to unit vectors read the final hidden state out of
    the logits; the real logits must then be hidden @ embedding.T."""
    _, params = built
    tokens = _tokens(high=10)  # uses ids < 10 only
    D = CFG.d_model
    emb = np.asarray(params["embed"]["embedding"][...])  # the reference in numpy: no program per op
    probe = emb.copy()
    probe[10:10 + D] = np.eye(D)
    hidden = np.asarray(fwd(_replace(params, "embedding", lambda _: probe), tokens))[..., 10:10 + D]  # (B, T, D)
    logits = np.asarray(fwd(params, tokens))
    np.testing.assert_allclose(logits, np.einsum("btd,vd->btv", hidden, emb), rtol=1e-4, atol=1e-6)
    assert np.abs(hidden).mean() > 0.1  # the probe really read something
    # and changing an embedding row changes that token's logit by hidden . delta
    delta = np.linspace(-1, 1, D, dtype=np.float32)
    moved_emb = emb.copy()
    moved_emb[40] += delta
    moved = np.asarray(fwd(_replace(params, "embedding", lambda _: moved_emb), tokens))
    np.testing.assert_allclose(moved[..., 40] - logits[..., 40], hidden @ delta, rtol=1e-3, atol=1e-5)


def test_parameter_count(built):
    _, params = built
    V, d, L, F = CFG.vocab_size, CFG.d_model, CFG.n_layers, CFG.d_ff
    assert model.count_params(params) == V * d + L * (4 * d * d + 3 * d * F + 2 * d) + d
    # same figure without allocating
    assert model.count_params(model.abstract(CFG)[1]) == model.count_params(params)


def test_no_biases_and_init(built):
    _, params = built
    leaves = _leaves(params)
    assert not [p for p, _ in leaves if "bias" in p]
    for path, x in leaves:
        x = np.asarray(x)
        if x.ndim == 1:  # only RMSNorm scales are vectors, initialised to 1
            assert path.endswith("['scale'].value"), path
            np.testing.assert_array_equal(x, 1.0)
        else:
            assert x.ndim == 2, path
            assert abs(x.std() - 0.02) < 0.002, (path, x.std())
            assert abs(x.mean()) < 0.002, path
    assert sum(np.ndim(x) == 1 for _, x in leaves) == 2 * CFG.n_layers + 1


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 9, 3, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 9, 3, 16)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 30, (2, 9)), jnp.int32)

    @jax.jit
    def scores(pq, pk):
        return jnp.einsum("bthk,bshk->bhts", ops.rope(q, pq), ops.rope(k, pk))

    base = scores(pos, pos)
    for shift in (1, 7, 100):
        np.testing.assert_allclose(scores(pos + shift, pos + shift), base, rtol=1e-4, atol=1e-4)
    # shifting only the keys changes the scores: positions do matter
    assert float(jnp.abs(scores(pos, pos + 3) - base).max()) > 0.1
    # a rotation keeps lengths; position 0 is the identity
    rope = jax.jit(ops.rope)
    np.testing.assert_allclose(np.linalg.norm(rope(q, pos), axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(rope(q, jnp.zeros_like(pos)), q, atol=1e-6)


def test_rotary_table_gives_the_computed_angles_and_keeps_sin_cos_out_of_the_step(built):
    """The model looks its rotary angles up in a table made at trace time: the same values bit
    for bit as computing them, and no sine or cosine left in the compiled gradient (computed in
    the step, XLA recomputes them per element of every head's queries and keys)."""
    rng = np.random.default_rng(2)
    pos = jnp.asarray(rng.integers(0, CFG.max_seq_len, (3, 20)), jnp.int32)
    for K, base in ((16, 10000.0), (8, 500000.0)):
        computed = jax.jit(lambda p: ops.rotary(p, K, base))(pos)
        looked_up = jax.jit(lambda p: ops.rotary(p, K, base, table=CFG.max_seq_len))(pos)
        for a, b in zip(computed, looked_up):
            chex.assert_shape(b, (3, 20, 1, K // 2))
            np.testing.assert_array_equal(a, b)
    graphdef, params = built
    loss = lambda p: model.apply(graphdef, p, _tokens(), positions=POS)[0].sum()  # noqa: E731
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert " sine(" not in hlo and " cosine(" not in hlo
    # beyond the table (a context above ROTARY_TABLE_MAX) they are computed in the step
    big = dataclasses.replace(CFG, max_seq_len=ops.ROTARY_TABLE_MAX + 1)
    gd_big, p_big = model.init(big, 0)
    hlo = jax.jit(lambda p: model.apply(gd_big, p, _tokens(), positions=POS)[0].sum()).lower(p_big).compile().as_text()
    assert " sine(" in hlo
    logits = lambda gd: jax.jit(lambda p: model.apply(gd, p, _tokens(), positions=POS)[0])(p_big)  # noqa: E731
    np.testing.assert_array_equal(logits(gd_big), logits(graphdef))


def test_head_positions_run_the_last_layer_there_only(built, fwd):
    """select and last_only: the logits of the full model at those positions, with the last
    layer's output projection and SwiGLU run at those positions only (its keys and values,
    which every query reads, everywhere): the forward's matmul FLOPs drop by the head's and
    those layer parts' at every other position."""
    graphdef, params = built
    tokens = _tokens(3)
    full = fwd(params, tokens)
    select = jnp.asarray([5, 0, 23, 13, 11], jnp.int32)  # of the flattened (B * T) positions
    sel = apply(graphdef, params, tokens, positions=POS, select=select)[0]
    chex.assert_shape(sel, (5, CFG.vocab_size))
    np.testing.assert_allclose(sel, full.reshape(B * T, -1)[select], rtol=1e-5, atol=1e-5)
    last = jax.jit(lambda p: model.apply(graphdef, p, tokens, positions=POS, last_only=True)[0])(params)
    chex.assert_shape(last, (B, 1, CFG.vocab_size))
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)

    def flops(**kw):
        f = lambda p: model.apply(graphdef, p, tokens, positions=POS, **kw)[0]  # noqa: E731
        return jax.jit(f).lower(params).cost_analysis()["flops"]
    D, F, V, HK = CFG.d_model, CFG.d_ff, CFG.vocab_size, CFG.n_heads * CFG.head_dim
    per_position = 2 * (V * D + HK * D + 3 * D * F)  # the head, wo and SwiGLU's three products
    saved = flops() - flops(select=select)
    assert saved == pytest.approx(per_position * (B * T - 5), rel=0.05)
    saved = flops() - flops(last_only=True)
    assert saved == pytest.approx(per_position * B * (T - 1), rel=0.05)


def test_model_logits_invariant_to_position_shift(built, fwd):
    _, params = built
    tokens = _tokens()
    base = fwd(params, tokens)
    for shift in (3, 40):
        np.testing.assert_allclose(fwd(params, tokens, POS + shift), base, rtol=1e-4, atol=1e-5)
    # not a constant shift: logits change
    assert float(jnp.abs(fwd(params, tokens, POS[:, ::-1]) - base).max()) > 1e-3


def test_causal(built, fwd):
    _, params = built
    tokens = _tokens()
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 10)
    a, b = fwd(params, tokens), fwd(params, changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-6, atol=1e-7)
    diff = np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max(axis=-1)  # (B, T - 7)
    assert (diff > 1e-5).all()  # every later position sees the change


def test_dropout_eval_deterministic_train_random(built, fwd):
    _, params = built
    graphdef = model.abstract(dataclasses.replace(CFG, dropout=0.5))[0]
    tokens = _tokens()
    run = jax.jit(lambda p, t, key: model.apply(graphdef, p, t, positions=POS, dropout_key=key)[0])
    ev = jax.jit(lambda p, t: model.apply(graphdef, p, t, positions=POS)[0])
    e1 = ev(params, tokens)
    np.testing.assert_array_equal(e1, ev(params, tokens))
    # without a key the dropout model is the same function as the dropout-free one
    np.testing.assert_allclose(e1, fwd(params, tokens), rtol=1e-6, atol=1e-7)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    t1 = run(params, tokens, k1)
    np.testing.assert_array_equal(t1, run(params, tokens, k1))  # same key, same masks
    assert float(jnp.abs(t1 - e1).max()) > 1e-3
    assert float(jnp.abs(t1 - run(params, tokens, k2)).max()) > 1e-3


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keeps_1_minus_rate_scaled_by_its_inverse(rate):
    """ops.dropout keeps an element when 16 random bits fall below round((1 - rate) * 65536):
    the kept fraction is 1 - rate (to 1/65536) and kept values are scaled by 65536 / threshold,
    which is 1 / (1 - rate) up to that rounding, so the expected activation is unchanged."""
    n = 1 << 20
    x = jnp.linspace(1.0, 2.0, n, dtype=jnp.float32)  # never 0: a zero output means dropped
    y = np.asarray(jax.jit(ops.dropout, static_argnums=1)(x, rate, jax.random.PRNGKey(0)))
    kept = y != 0
    se = np.sqrt(rate * (1 - rate) / n)  # standard error of the kept fraction
    assert abs(kept.mean() - (1 - rate)) < 4 * se, (kept.mean(), se)
    threshold = round((1 - rate) * 65536)
    rounding = abs(65536 / threshold * (1 - rate) - 1)  # at most 0.5 / threshold
    assert rounding <= 0.5 / threshold
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=rounding + 1e-6, atol=0)


def test_dropout_masks_of_different_keys_and_shapes_are_independent():
    """The hash-based masks (ops.dropout): two keys' masks agree where independent ones
    would, (1 - rate)^2 + rate^2 of the elements, neighbours are uncorrelated, and a mask does
    not depend on the values it is applied to."""
    n, rate = 1 << 20, 0.5
    x = jnp.ones((4, 256, 1024), jnp.float32)
    drop = jax.jit(ops.dropout, static_argnums=1)
    a = np.asarray(drop(x, rate, jax.random.PRNGKey(1))).reshape(-1) != 0
    b = np.asarray(drop(x, rate, jax.random.PRNGKey(2))).reshape(-1) != 0
    se = np.sqrt(0.25 / n)
    assert abs((a == b).mean() - 0.5) < 4 * se
    assert abs((a[1:] == a[:-1]).mean() - 0.5) < 4 * se  # along a row
    assert abs((a[1024:] == a[:-1024]).mean() - 0.5) < 4 * se  # across rows
    c = np.asarray(drop(2 * x, rate, jax.random.PRNGKey(1))).reshape(-1) != 0
    np.testing.assert_array_equal(a, c)


def test_swiglu_gradient_equals_autodiff():
    """The hand-written SwiGLU backward (ops.swiglu) against autodiff of its formula."""
    rng = np.random.default_rng(3)  # numpy's draws: no program compiled per shape, as jax.random's are
    x, w1, w3, w2, g = (jnp.asarray(rng.standard_normal(sh, np.float32))
                        for sh in ((10, 8), (8, 12), (8, 12), (12, 8), (10, 8)))

    def plain(x, w1, w3, w2):
        return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2

    np.testing.assert_allclose(jax.jit(ops.swiglu)(x, w1, w3, w2), jax.jit(plain)(x, w1, w3, w2), rtol=1e-6)
    want, got = jitted_vjp(plain, (x, w1, w3, w2), g), jitted_vjp(ops.swiglu, (x, w1, w3, w2), g)
    assert len(got) == 4
    for a, b in zip(got, want):
        chex.assert_equal_shape([a, b])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _dot_operand_types(hlo: str) -> list:
    """The operand element types of every dot in a compiled module's HLO text."""
    types = dict(re.findall(r"%([\w.-]+) = ([a-z0-9]+)\[", hlo))
    return [(types.get(a), types.get(b)) for a, b in re.findall(r" dot\(%([\w.-]+), %([\w.-]+)\)", hlo)]


def test_bfloat16_products_keep_bfloat16_operands_and_autodiffs_gradient():
    """train.dtype=bfloat16 (ops.products_in): every product of a linear layer and of SwiGLU,
    forward and backward, multiplies bfloat16 operands (the fast CPU path; XLA upcasts a
    transposed one to float32), and the float32 gradients are autodiff's of the float32 formula
    within bfloat16 rounding. Outside it the products are plain float32."""
    rng = np.random.default_rng(5)  # numpy's draws: no program per shape
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    x, w, w1, w3, w2, g = normal(2, 24, 16), normal(16, 32) / 4, normal(16, 32) / 4, normal(16, 32) / 4, \
        normal(32, 16) / 4, normal(48, 16)
    args = (x, w, w1, w3, w2)

    def layer(x, w, w1, w3, w2):  # a linear layer, then SwiGLU on its first 16 outputs
        return ops.swiglu(ops.dense(x, w)[..., :16].reshape(-1, 16), w1, w3, w2)

    def plain(x, w, w1, w3, w2):
        h = (x @ w)[..., :16].reshape(-1, 16)
        return (jax.nn.silu(h @ w1) * (h @ w3)) @ w2

    def low(*a):
        with ops.products_in(jnp.bfloat16):
            return jax.vjp(layer, *a)[1](g)

    want = jitted_vjp(plain, args, g)
    fn = jax.jit(low)
    got = fn(*args)
    for a, b in zip(got, want):
        assert a.dtype == jnp.float32
        a, b = np.asarray(a), np.asarray(b)
        # measured at most 0.0108 of the largest entry (the 5 gradients: 0.0030..0.0108): a 2.3x margin
        np.testing.assert_allclose(a, b, rtol=0, atol=0.025 * np.abs(b).max())
        assert np.abs(a - b).max() > 0  # the products really were rounded
    operands = _dot_operand_types(fn.lower(*args).compile().as_text())
    assert len(operands) >= 10 and all(t == ("bf16", "bf16") for t in operands), operands
    np.testing.assert_array_equal(ops.dense(x, w), jnp.matmul(x, w))  # float32 outside: XLA's plain product


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head, and grouped-query
def test_attend_recomputed_gradient_equals_attends(kv_heads):
    """LoRA's attention (ops.attend_recomputed: probabilities recomputed in the backward pass)
    gives attend's values and gradients, under a causal mask with a hidden key."""
    rng = np.random.default_rng(4)  # numpy's draws and mask: no program per op
    q, g = rng.standard_normal((2, 2, 4, 6, 8), np.float32)
    k, v = rng.standard_normal((2, 2, kv_heads, 6, 8), np.float32)
    mask = np.tril(np.ones((1, 6, 6), bool))
    mask[:, 3:, 1] = False
    np.testing.assert_array_equal(jax.jit(ops.attend_recomputed)(q, k, v, mask), jax.jit(ops.attend)(q, k, v, mask))
    want = jitted_vjp(lambda q, k, v: ops.attend(q, k, v, mask), (q, k, v), g)
    got = jitted_vjp(lambda q, k, v: ops.attend_recomputed(q, k, v, mask), (q, k, v), g)
    for a, b in zip(got, want):
        chex.assert_equal_shape([a, b])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _unfused_logits(cfg, params, tokens):
    """The model written out in plain jnp, one product per projection (wq, wk, wv; w1, w3 apart):
    the reference any joined (D, (H+2G)K) or (D, 2F) product must match (bench/README.md: joining
    them at compute time was measured and did not pay on CPU)."""
    p = nnx.to_pure_dict(params)
    norm = lambda x, s: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * s  # noqa: E731
    Bt, Tt = tokens.shape
    H, G, K = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    pos = jnp.broadcast_to(jnp.arange(Tt), (Bt, Tt))
    heads = lambda y, n: y.reshape(Bt, Tt, n, K)  # noqa: E731
    x = p["embed"]["embedding"][tokens]
    for blk in p["blocks"].values():
        a, m = blk["attn"], blk["mlp"]
        h = norm(x, blk["norm1"]["scale"])
        q = ops.rope(heads(h @ a["wq"]["kernel"], H), pos).transpose(0, 2, 1, 3)
        k = ops.rope(heads(h @ a["wk"]["kernel"], G), pos).transpose(0, 2, 1, 3)
        v = heads(h @ a["wv"]["kernel"], G).transpose(0, 2, 1, 3)
        o = ops.attend(q, k, v, jnp.tril(jnp.ones((1, Tt, Tt), bool)))
        x = x + o.transpose(0, 2, 1, 3).reshape(Bt, Tt, H * K) @ a["wo"]["kernel"]
        h = norm(x, blk["norm2"]["scale"])
        x = x + (jax.nn.silu(h @ m["w1"]["kernel"]) * (h @ m["w3"]["kernel"])) @ m["w2"]["kernel"]
    return norm(x, p["norm"]["scale"]) @ p["embed"]["embedding"].T


@pytest.mark.parametrize("kv_heads", [0, 2])  # multi-head, and grouped-query (the q|k|v split differs)
def test_model_matches_per_projection_reference(kv_heads):
    """Logits and every parameter's gradient of the model (its custom_vjp SwiGLU included)
    equal those of the per-projection formula, within float tolerance."""
    cfg = dataclasses.replace(CFG, n_kv_heads=kv_heads)
    graphdef, params = model.init(cfg, seed=1)
    tokens = _tokens(seed=4, high=50)
    weights = np.random.default_rng(5).standard_normal((B, T, cfg.vocab_size), np.float32)

    def logits_and_gradient(logits_of):  # one program: the logits and the gradient of sum(logits * weights)
        def loss(p):
            logits = logits_of(p)
            return jnp.sum(logits * weights), logits
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads

    ours, got = logits_and_gradient(lambda p: model.apply(graphdef, p, tokens)[0])
    reference, want = logits_and_gradient(lambda p: _unfused_logits(cfg, p, tokens))
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(_leaves(got), _leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
