"""The seed's GPT in Flax NNX, which is the Llama architecture: tied token
embedding / output head, pre-norm RMSNorm (eps 1e-5), rotary position embedding,
SwiGLU feed-forward, no biases, dropout, N(0, 0.02) init. Llama's options (an
untied head, grouped-query attention, rope_theta, norm eps, head size) are
ModelConfig keys; transformers' LlamaForCausalLM computes the same function
(tests/test_hf.py compares logits), and hf.py converts the weights.

The families (config.FAMILIES) are this model plus named features, each off by default:
attention biases (`attn_bias`: Qwen2's on wq wk wv; Qwen3's attention_bias on wo too), RMSNorm
over each head's queries and keys before the rotary embedding (`qk_norm`: Qwen3), and scaled
rotary frequencies (`rope_type` linear or llama3: ops.rope_freqs). Mistral is Llama's function.
transformers' Mistral, Qwen2 and Qwen3 classes compute the same (tests/test_families.py).

This module holds the nnx.Modules (Linear, RMSNorm, Attention, SwiGLU, Block, GPT)
and the functions over a whole model (init, abstract, apply, prefix_cache,
count_params, flops_per_token); the numerical kernels they call (dropout, the
mixed-precision products, rotary embedding, attention, SwiGLU and their custom
gradients) are ops.py's.

Memory (issue 36): `attention_kind` picks how attention is computed (ModelConfig.attention:
the full score matrix, blockwise, or cuDNN's), and under `rematerialised` (train.remat) each
block's backward pass recomputes its forward pass (ops.recomputed) instead of keeping what
is inside it.

Modules are built once and split (`init`) into a static graphdef and a pytree of
parameters; `apply` merges them inside a jitted function, so training and
decoding are pure functions of (params, inputs). Dropout takes an explicit key.

Shapes: B batch, T query length, S key length (T, or the KV-cache size),
H heads, G key/value heads (H with plain multi-head attention), K head size,
D d_model, F d_ff, V vocabulary.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from . import blockwise, masks, ops
from .config import ModelConfig

_init = nnx.initializers.normal(stddev=0.02)

AUTO_BLOCKWISE_KEYS = 1024  # attention auto: blockwise from this many keys on (bench/README.md)
REMAT = {"none": None, "block": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
_REMAT = contextvars.ContextVar("remat", default="none")


@contextlib.contextmanager
def rematerialised(policy: str):
    """Traced inside it, each transformer block's backward pass runs the block's forward pass again
    (ops.recomputed) under REMAT[policy]: "block" keeps only the block's input, "dots" its matrix
    products' outputs as well, "none" everything (the default). Losses and gradients stay those of
    "none" (tests/test_attention.py). Like ops.products_in, enter it inside the jitted function
    (steps.make_train_step does)."""
    token = _REMAT.set(policy)
    try:
        yield
    finally:
        _REMAT.reset(token)


def attention_kind(setting: str, keys: int, backend: str, products) -> str:
    """ModelConfig.attention for a training-shaped call (a `masks.Segments` mask) of `keys` keys:
    auto is cudnn on a GPU whose products are bfloat16 (train.dtype; cuDNN takes no float32),
    else blockwise from AUTO_BLOCKWISE_KEYS keys on, else full. Decoding (a dense mask: its
    scores are (B, H, 1, S)) always runs full."""
    if setting != "auto":
        return setting
    if backend == "gpu" and products == jnp.bfloat16:
        return "cudnn"
    return "blockwise" if keys >= AUTO_BLOCKWISE_KEYS else "full"


class Linear(nnx.Module):
    """A linear layer, x @ kernel through `ops.dense`, plus a bias where the family has one (Qwen2's
    q/k/v projections; the bias starts at 0 and draws no random numbers). Bias-free, its parameters
    and their initialisation are nnx.Linear's (use_bias=False): the same tree, the same values per seed."""
    def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs, bias: bool = False):
        self.kernel = nnx.Param(_init(rngs.params(), (d_in, d_out), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if bias else None

    def __call__(self, x):  # (..., d_in) -> (..., d_out)
        return with_bias(ops.dense(x, self.kernel[...].astype(x.dtype)), self.bias)


def with_bias(y, bias):
    """y (..., out) + bias (out,), or y where the layer has none (None)."""
    return y if bias is None else y + bias[...].astype(y.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):  # (..., D)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def _write(cache, x, index):
    """x (B, H, T, K) into cache (B, H, S, K) at [index, index + T): index a scalar, or
    (B,) int32, one start per row (continuous batching: each slot at its own length)."""
    x = x.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, x, (0, 0, index, 0))
    return jax.vmap(lambda c, y, i: jax.lax.dynamic_update_slice(c, y, (0, i, 0)))(cache, x, index)


class Attention(nnx.Module):
    """Grouped-query attention with rotary embedding; the families' differences are ModelConfig's
    attn_bias (biases on wq wk wv, and wo with "all") and qk_norm (q_norm, k_norm: RMSNorm over each
    head's K values of the queries and keys, before the rotary embedding)."""
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, G, K
        qkv = cfg.attn_bias != "none"
        self.wq, self.wk, self.wv = (Linear(d, H * K, rngs, qkv), Linear(d, G * K, rngs, qkv),
                                     Linear(d, G * K, rngs, qkv))
        self.wo = Linear(H * K, d, rngs, cfg.attn_bias == "all")
        self.q_norm, self.k_norm = (RMSNorm(K, cfg.norm_eps), RMSNorm(K, cfg.norm_eps)) if cfg.qk_norm else (None, None)
        self.recompute = False  # ops.attend_recomputed in the backward pass (LoRA's step sets it)

    def __call__(self, x, angles, mask, cache=None, index=None, keep=None, how="full"):
        """x (B, T, D); angles: `ops.rotary` of the positions (B, T); cache (k, v) each (B, G, S, K)
        written at [index, index+T) (index: scalar or (B,)). keep: a function that takes the
        positions wanted out of (B, T, H*K) before the output projection (GPT's last layer).
        how: full or cudnn with a dense mask (B|1, T, S), blockwise with a masks.Segments."""
        B, T, D = x.shape
        H, G, K = self.n_heads, self.n_kv_heads, self.head_dim
        heads = lambda y, n: y.reshape(B, T, n, K).transpose(0, 2, 1, 3)  # noqa: E731  (B, n, T, K)
        q, k = self.wq(x).reshape(B, T, H, K), self.wk(x).reshape(B, T, G, K)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = heads(ops.rotate(q, *angles), H), heads(ops.rotate(k, *angles), G)
        v = heads(self.wv(x), G)
        if cache is not None:
            k, v = _write(cache[0], k, index), _write(cache[1], v, index)
            cache = (k, v)
        if how == "blockwise":  # its backward pass recomputes the probabilities anyway
            out = blockwise.attend(q, k, v, mask)
        elif how == "cudnn":
            out = ops.attend_dpa(q, k, v, mask, "cudnn")
        else:
            out = (ops.attend_recomputed if self.recompute else ops.attend)(q, k, v, mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, H * K)
        if keep is not None:
            out = keep(out)
        return self.wo(out), cache


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.w1 = Linear(cfg.d_model, cfg.d_ff, rngs)
        self.w3 = Linear(cfg.d_model, cfg.d_ff, rngs)
        self.w2 = Linear(cfg.d_ff, cfg.d_model, rngs)

    def __call__(self, x):  # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        w1, w3, w2 = (w.kernel[...].astype(x.dtype) for w in (self.w1, self.w3, self.w2))
        return ops.swiglu(x.reshape(B * T, D), w1, w3, w2).reshape(B, T, D)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x, angles, mask, cache, index, select, keys, *, last_only=False, rate=0.0, how="full"):
        """x (B, T, D) -> (x after the block, its new cache). keys: the two dropout keys (or None);
        select (N,) / last_only: GPT's last layer, which goes on at those positions only -> (1, N, D)
        / (B, 1, D). Arrays are arguments, settings keywords: ops.recomputed takes the arrays."""
        B, T, _ = x.shape
        keep = None
        if select is not None:
            keep = lambda y: jnp.take(y.reshape(B * T, y.shape[-1]), select, axis=0)[None]  # noqa: E731 (1, N, .)
        elif last_only:
            keep = lambda y: y[:, -1:]  # noqa: E731
        h, cache = self.attn(self.norm1(x), angles, mask, cache, index, keep, how)
        if keep is not None:  # past its keys and values (which every position's query reads)
            x = keep(x)
        x = x + ops.dropout(h, rate, keys[0])
        return x + ops.dropout(self.mlp(self.norm2(x)), rate, keys[1]), cache


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_init, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:  # a tied model's parameter tree has no such entry
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, rngs)

    def __call__(self, tokens, positions=None, mask=None, cache=None, index=None,
                 dropout_key: Optional[jax.Array] = None, last_only: bool = False,
                 select: Optional[jax.Array] = None, head: bool = True):
        """tokens (B, T) int32 -> logits (B, T, V) float32 ((B, 1, V) with last_only,
        (N, V) with select), new cache; head False: the final normed hidden states instead
        ((B, T, D), (N, D) with select), for a loss that applies the head itself (`head_weight`).

        positions (B, T): defaults to 0..T-1. mask (B|1, T, S) bool: which keys
        each query sees (attention is then always full), or a masks.Segments (S = its P + T:
        attention as cfg.attention chooses, `attention_kind`); defaults to causal. cache:
        per-layer (k, v), each
        (B, H, S, K), written at positions [index, index + T) of the cache
        (index an int32 scalar, or (B,): each row's own start).
        dropout_key: None for evaluation, a PRNG key for training.
        last_only: the output head on the last position only (a decoder's prefill).
        select (N,) int32: the output head only at these positions of the flattened
        (B * T) sequence -> logits (N, V): a loss that falls on a few positions
        skips the head's matmul and softmax everywhere else.
        With last_only or select, the last layer runs its output projection and SwiGLU
        at those positions only (its keys and values everywhere): 8% of the seed
        config's training FLOPs (bench/README.md).
        """
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if mask is None:
            mask = masks.Segments(length=T)
        how = "full"
        if isinstance(mask, masks.Segments):
            how = attention_kind(self.cfg.attention, mask.keys, jax.default_backend(), ops.products_dtype())
            mask = mask if how == "blockwise" else mask.dense()  # built once for every layer
        rate = self.cfg.dropout
        keys = [None] * (2 * len(self.blocks) + 1)
        if dropout_key is not None and rate > 0:
            keys = list(jax.random.split(dropout_key, len(keys)))
        emb = self.embed.embedding[...]
        x = ops.dropout(jnp.take(emb, tokens, axis=0), rate, keys[0])  # (B, T, D)
        angles = ops.rotary(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.max_seq_len,
                            self.cfg.rope_scaling)
        policy = _REMAT.get()
        new_cache = []
        for i, blk in enumerate(self.blocks):
            # the last layer takes the positions the head reads (select, last_only) past its keys and
            # values: nothing at the other positions reaches the output
            last = i == len(self.blocks) - 1
            settings = dict(last_only=last and last_only, rate=rate, how=how)
            args = (x, angles, mask, None if cache is None else cache[i], index, select if last else None,
                    (keys[2 * i + 1], keys[2 * i + 2]))
            if policy == "none":
                x, c = blk(*args, **settings)
            else:  # the block as a function of its parameters and inputs, recomputed in the backward pass
                gd, state = nnx.split(blk)
                x, c = ops.recomputed(lambda st, *a: nnx.merge(gd, st)(*a, **settings), REMAT[policy])(state, *args)
            new_cache.append(c)
        if select is not None:
            x = x[0]  # (N, D)
        x = self.norm(x)
        if not head:
            return x, (new_cache if cache is not None else None)
        if self.cfg.tie_embeddings:
            logits = ops.dense(x, emb, w_transposed=True).astype(jnp.float32)
        else:
            logits = ops.dense(x, self.lm_head.kernel[...]).astype(jnp.float32)
        return logits, (new_cache if cache is not None else None)


def init(cfg: ModelConfig, seed: int = 0):
    """Builds the model; returns (graphdef, params). params is an nnx.State pytree."""
    assert cfg.vocab_size > 0, "vocab_size must be set from the tokenizer"
    model = GPT(cfg, nnx.Rngs(seed))
    return nnx.split(model, nnx.Param)


def abstract(cfg: ModelConfig):
    """(graphdef, params as ShapeDtypeStructs) without allocating anything. Traced once per config
    (`_abstract`): every Engine, Generator and checkpoint restore asks, and the trace of the
    model's construction takes 20 ms at 2 tiny layers, 170 ms at 12."""
    graphdef, params = _abstract(cfg)
    return graphdef, jax.tree.map(lambda x: x, params)  # the caller's own tree of the shared leaves


@functools.lru_cache(maxsize=16)
def _abstract(cfg: ModelConfig):
    model = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def apply(graphdef, params, tokens, **kw):
    """Pure forward pass: see GPT.__call__."""
    return nnx.merge(graphdef, params)(tokens, **kw)


def head_weight(graphdef, params):
    """The output head's weight and its layout: (the embedding (V, D), True) for a tied head,
    (lm_head's kernel (D, V), False) for an untied one."""
    m = nnx.merge(graphdef, params)
    if m.cfg.tie_embeddings:
        return m.embed.embedding[...], True
    return m.lm_head.kernel[...], False


def prefix_cache(graphdef, params, prefix, batch: int, length: int, dropout_key=None):
    """Runs a prefix shared by every row once: prefix (1, P) -> (per-layer (k, v),
    each (batch, G, P + length, K) with the prefix's keys/values at [0, P) of every
    row, and P). Rows then run with index=P as a decoder's next step would, each
    query choosing by its mask whether it sees the prefix; gradients flow back into
    the prefix's computation, so the loss is that of every row carrying its own copy."""
    m = nnx.merge(graphdef, params)
    P, H, K = prefix.shape[1], m.cfg.kv_heads, m.cfg.head_dim
    dtype = m.embed.embedding[...].dtype
    empty = [(jnp.zeros((1, H, P, K), dtype),) * 2 for _ in m.blocks]
    with rematerialised("none"):  # one row of P tokens: little to save, and bitwise only without (measured)
        _, kv = m(prefix, cache=empty, index=0, dropout_key=dropout_key)
    grow = lambda a: jnp.concatenate([jnp.broadcast_to(a, (batch,) + a.shape[1:]),  # noqa: E731
                                      jnp.zeros((batch, H, length, K), a.dtype)], axis=2)
    return [(grow(k), grow(v)) for k, v in kv], P


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def flops_per_token(cfg: ModelConfig, seq_len: int, head: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): the matmuls
    (6 * matmul parameters, the output head included unless head=False) plus
    attention scores."""
    D, HK, GK = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    n_matmul = cfg.n_layers * (2 * D * HK + 2 * D * GK + 3 * D * cfg.d_ff) + head * cfg.vocab_size * D
    attn = cfg.n_layers * 2 * 2 * seq_len * HK / 2  # causal: half of QK^T and PV
    return 6 * n_matmul + 3 * attn
