"""The output head's cross-entropy in chunks of positions (train.head_chunk, issue 36).

At A loss positions the head's logits are (A, V) float32, and with a large vocabulary they and
their gradient are most of a train step's memory (Qwen2.5-0.5B's V = 151,936 at 1,024 answer
positions: 2 x 0.62 GB). `token_nll` computes the same per-token cross-entropy C positions at a
time: each chunk's (C, V) logits are formed, reduced to logsumexp and the target's logit, and
dropped; the backward pass forms them again, chunk by chunk, from the hidden states, the head's
weight and the saved logsumexp, and sums the weight's gradient over the chunks. At no time are
more than one chunk's logits alive (tests/test_head.py checks XLA's plan).

    x (A, D) final hidden states    w (D, V), or (V, D) transposed: the tied embedding
    nll[a] = logsumexp_v (x w)[a, v] - (x w)[a, targets[a]]                      (A,) float32

Under ops.products_in (train.dtype bfloat16) its products take bfloat16 operands with float32
accumulation and float32 logits, as ops.dense does for the whole head. Where the weight is not
differentiated (LoRA's frozen embedding) its gradient is not computed at all.

`chunked(n)` sets the chunk for what is traced inside it (steps.make_train_step and make_eval_step
enter it); `chunk_for` says whether a head of A positions and V columns is chunked: only when A
exceeds the chunk and the logits are large (MIN_LOGITS); below that the whole head costs little
memory and runs as one product (bench/README.md).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from . import ops

# (A, V) logits of fewer elements than this (64 MiB of float32) run whole: chunking them would
# save little memory, and small chunks of a small vocabulary run below the matmul's best rate
MIN_LOGITS = 1 << 24

_CHUNK = contextvars.ContextVar("head_chunk", default=0)


@contextlib.contextmanager
def chunked(n: int):
    """Traced inside it, steps.token_nll computes the head's cross-entropy n positions at a
    time where `chunk_for` says so (0: never). Like ops.products_in, enter it inside the
    jitted function."""
    token = _CHUNK.set(int(n))
    try:
        yield
    finally:
        _CHUNK.reset(token)


def chunk_for(positions: int, vocab: int) -> int:
    """The chunk for a head of `positions` rows and `vocab` columns where this is traced: the
    `chunked` setting, or 0 (the head whole) when there is no more than one chunk of them or
    their logits are below MIN_LOGITS elements."""
    c = _CHUNK.get()
    return c if 0 < c < positions and positions * vocab >= MIN_LOGITS else 0


def token_nll(x, w, targets, chunk: int, w_transposed: bool = False):
    """x (A, D), w (D, V) (or (V, D) with w_transposed), targets (A,) int -> the cross-entropy of
    each position (A,) float32, computed `chunk` positions at a time (the module's docstring).
    A need not be a multiple of chunk."""
    return _nll(ops.products_dtype(), w_transposed, chunk, x, w, targets)


def _in_chunks(a, chunk: int):
    """a (A, ...) -> (ceil(A / chunk), chunk, ...), zero-padded at the end."""
    n = -(-a.shape[0] // chunk)
    a = jnp.pad(a, [(0, n * chunk - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((n, chunk) + a.shape[1:])


def _tr(low):
    """The transpose for `low` operands: float32 a.T (XLA picks the layouts), lower precision
    materialised row-major for ops.mm (ops.transposed)."""
    return (lambda a: a.T) if low == jnp.float32 else ops.transposed


# The weight is read in its own layout, never transposed: XLA gives an array a loop reads the
# default (row-major) layout, so w.T inside the loops would be a copy of the whole weight (0.5 GB
# at Qwen2.5-0.5B's vocabulary), made once per pass. A tied head's logits are computed as
# (V, C) = w (V, D) @ x_c.T, an untied one's as (C, V) = x_c @ w (D, V); the vocabulary's axis is
# VAXIS[w_transposed], and only chunk-sized arrays are transposed.
VAXIS = {True: 0, False: 1}


def _logits(xc, w, w_transposed, tr):
    """One chunk's logits, float32: (V, C) for a tied head, (C, V) for an untied one."""
    return (ops.mm(w, tr(xc)) if w_transposed else ops.mm(xc, w)).astype(jnp.float32)


def _across(a, w_transposed):
    """a (C,) as a row or column that broadcasts across a chunk's logits."""
    return a[None, :] if w_transposed else a[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _nll(low, w_transposed, chunk, x, w, targets):
    return _forward(low, w_transposed, chunk, x, w, targets)[0]


def _forward(low, w_transposed, chunk, x, w, targets):
    """(nll (A,), logsumexp (A,)) over chunks of positions, as optax's
    softmax_cross_entropy_with_integer_labels computes each position's."""
    tr, wl, v = _tr(low), w.astype(low), VAXIS[w_transposed]

    def one(args):
        xc, tc = args
        logits = _logits(xc, wl, w_transposed, tr)
        top = jnp.max(logits, axis=v)
        shifted = logits - jax.lax.stop_gradient(_across(top, w_transposed))
        norm = jnp.log(jnp.sum(jnp.exp(shifted), axis=v))
        label = jnp.take_along_axis(shifted, _across(tc, w_transposed), axis=v).reshape(-1)
        return norm - label, norm + top

    A = x.shape[0]
    nll, lse = jax.lax.map(one, (_in_chunks(x.astype(low), chunk), _in_chunks(targets, chunk)))
    return nll.reshape(-1)[:A], lse.reshape(-1)[:A]


def _nll_fwd(low, w_transposed, chunk, x, w, targets):
    xv, wv, tv = x.value, w.value, targets.value
    nll, lse = _forward(low, w_transposed, chunk, xv, wv, tv)
    # the weight's gradient only where it is differentiated; an empty array's length says which
    want_w = jnp.zeros((int(w.perturbed),), jnp.float32)
    return nll, (xv, wv, tv, lse, want_w)


def _nll_bwd(low, w_transposed, chunk, res, g):
    x, w, targets, lse, want_w = res
    want_w = want_w.shape[0] == 1
    if isinstance(g, SymbolicZero):
        return jnp.zeros_like(x), (jnp.zeros_like(w) if want_w else None), None
    tr, xl, wl, v = _tr(low), x, w, VAXIS[w_transposed]
    if low != jnp.float32:  # the casts wait for g (ops.after): XLA does not share them with the
        xl, wl = ops.after(g, x.astype(low), w.astype(low))  # forward pass's, which would keep them alive

    def one(dw, args):
        xc, tc, lc, gc = args
        across = functools.partial(_across, w_transposed=w_transposed)
        logits = _logits(xc, wl, w_transposed, tr)
        p = jnp.exp(logits - across(lc))  # the softmax
        d = ((p - (jax.lax.broadcasted_iota(jnp.int32, p.shape, v) == across(tc))) * across(gc)).astype(low)
        if w_transposed:  # d (V, C), w (V, D)
            dx = ops.mm(tr(d), wl)  # (C, D)
            dw_c = ops.mm(d, xc) if want_w else None  # (V, D)
        else:  # d (C, V), w (D, V)
            dx = ops.mm(wl, tr(d))  # (D, C): transposed after the loop (a product's result stays row-major)
            dw_c = ops.mm(tr(xc), d) if want_w else None  # (D, V)
        return (dw + dw_c if want_w else dw), dx

    A, D = x.shape
    dw0 = jnp.zeros(w.shape if want_w else (0,), jnp.float32)
    chunks = tuple(_in_chunks(a, chunk) for a in (xl, targets, lse, g.astype(jnp.float32)))
    dw, dx = jax.lax.scan(one, dw0, chunks)  # dx (n, C, D), untied (n, D, C)
    dx = (dx if w_transposed else jnp.swapaxes(dx, 1, 2)).reshape(-1, D)[:A].astype(x.dtype)
    return dx, (dw.astype(w.dtype) if want_w else None), None


_nll.defvjp(_nll_fwd, _nll_bwd, symbolic_zeros=True)
