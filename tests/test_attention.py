"""Memory (issue 36): blockwise attention against the full score matrix, and rematerialised
blocks against none, on a tiny GQA model with packed rows, the shared prefix and dropout.

- blockwise.attend equals ops.attend on the dense mask (values, gradients: 1e-5), for packed
  segments (also out of order), the prefix, GQA and tiles that are skipped
- the whole loss and gradient with model.attention blockwise equal full's (1e-5)
- train.remat block and dots give bitwise the losses and gradients of none (full fine-tuning
  and LoRA), and the step's temporaries shrink (a remat that XLA undid would not)
- blockwise's step holds less than full's; the auto rule; attend_dpa's layout (the cuDNN path,
  through XLA's implementation on a CPU)
"""
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft import batching, blockwise, lora, masks, model, ops, steps
from jaxsft.config import LoraConfig, ModelConfig, TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 40
CFG = ModelConfig(vocab_size=V, max_seq_len=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=64,
                  dropout=0.1)


def _segments(rng, B, T, parts=3):
    """(B, T) int32: `parts` examples of random lengths per row, then padding (0)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = [0, *sorted(rng.choice(np.arange(1, T), parts, replace=False))]
        for n in range(parts):
            seg[b, cuts[n]:cuts[n + 1]] = n + 1
    return seg


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("B, H, G, T, P, C, layout", [
    (2, 6, 2, 37, 5, 8, "packed"),  # GQA, the prefix, T not a multiple of C
    (2, 4, 1, 64, 19, 16, "packed"),  # one key/value head; the prefix spans two blocks
    (2, 4, 4, 37, 0, 8, "causal"),  # no segments, no prefix
    (2, 4, 2, 60, 0, 8, "out of order"),  # a segment split in two runs: nothing may be skipped wrongly
    (1, 4, 2, 50, 3, 64, "packed"),  # one tile
])
def test_blockwise_equals_full_attention(B, H, G, T, P, C, layout):
    rng = np.random.default_rng(T + P)
    K = 8
    q = jnp.asarray(rng.normal(size=(B, H, T, K)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, G, P + T, K)), jnp.float32) for _ in range(2))
    seg = None if layout == "causal" else _segments(rng, B, T)
    if layout == "out of order":
        seg[0] = np.where(np.arange(T) < T // 3, 2, np.where(np.arange(T) < 2 * T // 3, 1, 2))
    shared = jnp.asarray(rng.random((B, T)) < 0.5, jnp.int32) if P else None
    mask = masks.Segments(None if seg is None else jnp.asarray(seg), shared, T, P)
    full = lambda q, k, v: ops.attend(q, k, v, mask.dense())  # noqa: E731
    tiled = lambda q, k, v: blockwise.attend(q, k, v, mask, block=C)  # noqa: E731
    out, vjp = jax.jit(lambda *a: jax.vjp(full, *a))(q, k, v)
    out2, vjp2 = jax.jit(lambda *a: jax.vjp(tiled, *a))(q, k, v)
    _close(out2, out)
    g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
    _close(jax.jit(vjp2)(g), jax.jit(vjp)(g))


def test_segments_dense_is_the_masks_it_stands_for():
    seg, shared = jnp.array([[1, 1, 2, 2, 0]]), jnp.array([[1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(masks.Segments(seg, shared, 5, 2).dense(),
                                  masks.with_prefix(masks.segment_causal(seg), shared, 2))
    np.testing.assert_array_equal(masks.Segments(length=5).dense(), masks.causal(5))


@pytest.fixture(scope="module")
def batch():
    """A packed batch of 3 rows of 48 tokens: 6 examples, 3 of them after the shared prefix (7 tokens)."""
    rng = np.random.default_rng(0)
    prefix = rng.integers(1, V, 7).astype(np.int32)
    examples = []
    for i in range(6):
        x = rng.integers(1, V, int(rng.integers(8, 30))).astype(np.int32)
        if i % 2 == 0:
            x = np.concatenate([prefix, x])
        m = np.zeros(len(x), np.float32)
        m[len(x) // 2:] = 1
        examples.append((x, np.roll(x, -1), m))
    b = batching.pack_batch(examples, 48, prefix=prefix)
    assert b.prefix is not None and b.shared.any() and b.segments.max() >= 2
    return b.replace(answer_at=np.flatnonzero(b.loss_mask.reshape(-1)).astype(np.int32))


def initial_values(cfg, lora_rank=0) -> list:
    """The starting point of _loss_and_grads as a list of numpy arrays: the model's parameters
    (lora_rank 0), or the frozen base's then the adapters' (B starts at 0 in lora.init: noise is
    added, so that every adapter's gradient is non-zero)."""
    _, params = model.init(cfg, 0)
    if not lora_rank:
        return [np.asarray(x) for x in jax.tree.leaves(params)]
    _, frozen, adapters = lora.init(cfg, LoraConfig(rank=lora_rank), 0, params)
    rng = np.random.default_rng(1)  # numpy's draws: no program compiled per shape
    return [np.asarray(x) for x in jax.tree.leaves(frozen)] + [
        np.asarray(x) + np.float32(0.01) * rng.standard_normal(x.shape, np.float32) for x in jax.tree.leaves(adapters)]


def _loss_and_grads(cfg, remat, batch, lora_rank=0, values=None):
    """(summed loss, gradient) of steps.loss_sums with dropout, jitted as the train step is, from
    `values` (initial_values' list; computed here when None)."""
    values = initial_values(cfg, lora_rank) if values is None else values
    if lora_rank:
        graphdef, base, adapters = lora.graph(cfg, LoraConfig(rank=lora_rank))
        n = len(jax.tree.leaves(base))
        frozen = jax.tree.unflatten(jax.tree.structure(base), values[:n])
        params, combine = jax.tree.unflatten(jax.tree.structure(adapters), values[n:]), lora.combine
    else:
        graphdef, abstract = model.abstract(cfg)
        frozen, combine = None, lambda fz, p: p  # noqa: E731
        params = jax.tree.unflatten(jax.tree.structure(abstract), values)

    def f(p, fz, b, key):
        with model.rematerialised(remat):
            return jax.value_and_grad(lambda p: steps.loss_sums(combine(fz, p), graphdef, b, key)[0])(p)
    return jax.jit(f)(params, frozen, batch, jax.random.PRNGKey(3))


def test_blockwise_model_equals_full_model(batch, monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 16)  # 3 tiles a row: some skipped
    # one block: the comparison is of the attention's values and gradients (two programs of two
    # blocks compiled in about twice the time)
    full = _loss_and_grads(dataclasses.replace(CFG, attention="full", n_layers=1), "none", batch)
    tiled = _loss_and_grads(dataclasses.replace(CFG, attention="blockwise", n_layers=1), "none", batch)
    _close(tiled, full)


# (attention, LoRA rank, remat policies checked against none)
# (blockwise under full fine-tuning is not a case of its own: the attention's backward pass is the
# same under LoRA, and full fine-tuning's kernel gradients are checked under full attention)
REMAT_CASES = (("full", 0, ("block", "dots")), ("blockwise", 4, ("block",)))


def remat_cases() -> list:
    """[(attention, LoRA rank, policies, initial_values)] of REMAT_CASES, on one block: remat acts
    per block, and its program compiles in about half the time of two (with the tests' older
    emitters it finds mismatches in one block as in two: measured). The values are computed by
    the caller's process: eager initialisation compiles a program per op and shape, which under
    the fusion emitters costs seconds."""
    return [(attention, rank, policies, initial_values(dataclasses.replace(CFG, attention=attention, n_layers=1), rank))
            for attention, rank, policies in REMAT_CASES]


def remat_mismatches(batch, cases) -> list:
    """[(attention, LoRA rank, policy, what differs)] of remat_cases(): the loss and every gradient
    leaf against remat none, compared bit for bit."""
    out = []
    for attention, rank, policies, values in cases:
        cfg = dataclasses.replace(CFG, attention=attention, n_layers=1)
        loss, grads = _loss_and_grads(cfg, "none", batch, rank, values)
        for policy in policies:
            loss2, grads2 = _loss_and_grads(cfg, policy, batch, rank, values)
            leaves = [("loss", loss, loss2)] + [(jax.tree_util.keystr(p), a, b) for (p, a), b in zip(
                jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads2))]
            out += [(attention, rank, policy, name) for name, a, b in leaves
                    if np.asarray(a).tobytes() != np.asarray(b).tobytes()]
    return out


@pytest.mark.slow  # a program of its own (XLA's flags are the process's)
def test_remat_is_bitwise_no_remat(batch):
    """With XLA's fusion emitters, as bin/train runs: under the tests' older loop emitters
    together with optimisation level 0 (conftest's XLA_FLAGS) some gradient sums come out in
    another order with remat on (measured: up to 3e-7 relative), so the check runs in a process
    with level 0 only (bitwise there too, and compiling faster than XLA's default)."""
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_parallel_codegen_split_count=1")  # the new fusion emitters
    code = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_attention as t, pickle; "
            "print(json.dumps(t.remat_mismatches(*pickle.loads(sys.stdin.buffer.read()))))")
    proc = subprocess.run([sys.executable, "-c", code, REPO, os.path.dirname(__file__)],
                          input=pickle.dumps((batch, remat_cases())), capture_output=True,
                          env=dict(env, JAX_PLATFORMS="cpu"), timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert json.loads(proc.stdout.decode().splitlines()[-1]) == []


def _step_temp_bytes(attention, remat, T=256, B=2):
    """XLA's temporary buffers of the compiled train step (compiled, never run): 4 layers, one
    packed batch of B rows of T tokens."""
    cfg = dataclasses.replace(CFG, attention=attention, max_seq_len=T, n_layers=4, dropout=0.0)
    tc = TrainConfig(batch_size=B, remat=remat)
    rng = np.random.default_rng(0)
    examples = [(x, np.roll(x, -1), np.ones(T // 4, np.float32))
                for x in rng.integers(1, V, (4 * B, T // 4)).astype(np.int32)]
    b = batching.pack_batch(examples, T)
    graphdef, params = model.init(cfg, 0)
    tx = steps.make_optimizer(tc, 10)
    step = steps.make_train_step(graphdef, tx, tc)
    return step.lower(steps.TrainState.create(params, tx), b, jax.random.PRNGKey(0)).compile() \
        .memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # XLA's memory plan of large compiled programs, never run (seconds of compiling each)
def test_remat_and_blockwise_hold_less(monkeypatch):
    """What each is for: a remat undone by XLA (the recomputation merged with the forward pass)
    or a blockwise attention that kept its tiles would pass the tests of values above."""
    monkeypatch.setattr(blockwise, "BLOCK", 64)
    full, remat, tiled = (_step_temp_bytes("full", "none"), _step_temp_bytes("full", "block"),
                          _step_temp_bytes("blockwise", "none"))
    assert remat < 0.5 * full, (remat, full)
    assert tiled < 0.7 * full, (tiled, full)


def test_auto_attention_rule():
    assert model.attention_kind("auto", 1023, "cpu", jnp.float32) == "full"
    assert model.attention_kind("auto", 1024, "cpu", jnp.float32) == "blockwise"
    assert model.attention_kind("auto", 1024, "gpu", jnp.float32) == "blockwise"  # cuDNN takes no float32
    assert model.attention_kind("auto", 64, "gpu", jnp.bfloat16) == "cudnn"
    assert model.attention_kind("full", 4096, "cpu", jnp.float32) == "full"


def test_dot_product_attention_layout_gqa_and_mask():
    """attend_dpa's transposes, head grouping and mask, through jax's XLA implementation (the
    cuDNN one needs a GPU and bfloat16)."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 6, 11, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 2, 14, 8)), jnp.float32) for _ in range(2))
    mask = masks.Segments(jnp.asarray(_segments(rng, 2, 11)), jnp.ones((2, 11), jnp.int32), 11, 3).dense()
    _close(jax.jit(lambda *a: ops.attend_dpa(*a, "xla"))(q, k, v, mask), jax.jit(ops.attend)(q, k, v, mask))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a GPU")
def test_cudnn_attention_close_to_full():
    """model.attention cudnn: bfloat16 operands, so within bfloat16's rounding of attend's float32."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 6, 64, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 2, 72, 64)), jnp.float32) for _ in range(2))
    mask = masks.Segments(jnp.asarray(_segments(rng, 2, 64)), jnp.ones((2, 64), jnp.int32), 64, 8).dense()
    _close(jax.jit(lambda *a: ops.attend_dpa(*a, "cudnn"))(q, k, v, mask), ops.attend(q, k, v, mask), tol=3e-2)
