"""Attention without the (B, H, T, S) score matrix, for training's mask (masks.Segments):
tiles of C queries x C keys with a running softmax, the flash-attention recurrence (Dao et al.
2022), forward and backward. What it holds at a time is one tile's (B, H, C, C) scores; its
gradient keeps q, k, v, the output and each query's log-sum-exp, and recomputes each tile's
probabilities. Within 1e-5 of `ops.attend` on the dense mask, gradients included
(tests/test_attention.py).

Keys are the P prefix keys, then the T row keys, each part zero-padded to whole blocks of C, so
a key block is all prefix or all row. A tile none of whose queries can see a key of it is
skipped: row keys above the diagonal (causality), and row keys before the earliest start of
the segments of the tile's queries (packing: a query sees its own example only). At 2,048
tokens in blocks of 512 that leaves 10 of 16 tiles for one sequence a row, fewer for packed
rows of shorter examples (bench/README.md).

Shapes: B batch, H heads, G key/value heads, R = H / G, T queries (a row's length), P prefix
keys, K head size, C the tile size; n query tiles (T padded to n * C), m prefix blocks.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from . import ops
from .masks import Segments

BLOCK = 512  # queries and keys per tile (bench/README.md: 256 and 1024 measured)


def attend(q, k, v, mask: Segments, block: int = 0):
    """q (B, H, T, K), k v (B, G, P + T, K) -> (B, H, T, K): `ops.attend(q, k, v, mask.dense())`
    tile by tile. A query that sees no key gets 0 (ops.attend's would average every key; no
    training mask has one: every query sees itself)."""
    return _attend(block or BLOCK, q, k, v, mask)


@struct.dataclass
class _Tiles:
    """The mask in tiles of C: per query (B|1, n * C) int32, past T padded.

    seg     its segment (-1 past T; 0 everywhere without segments)
    shared  > 0 where it sees the prefix (None without one)
    start   the first index of its segment (T past T): keys before it are never seen
    """
    seg: jax.Array
    shared: Optional[jax.Array]
    start: jax.Array
    T: int = struct.field(pytree_node=False)
    P: int = struct.field(pytree_node=False)
    C: int = struct.field(pytree_node=False)

    @property
    def n(self) -> int:
        return self.seg.shape[1] // self.C

    @property
    def m(self) -> int:
        return -(-self.P // self.C)

    def row_tile(self, i, j):
        """(B|1, C, C) bool: query tile i against row-key block j."""
        C = self.C
        t, u = i * C + jnp.arange(C), j * C + jnp.arange(C)
        causal = (t[:, None] >= u[None, :]) & (t < self.T)[:, None] & (u < self.T)[None, :]
        qs = jax.lax.dynamic_slice_in_dim(self.seg, i * C, C, axis=1)
        ks = jax.lax.dynamic_slice_in_dim(self.seg, j * C, C, axis=1)
        return causal[None] & (qs[:, :, None] == ks[:, None, :])

    def prefix_tile(self, i, j):
        """(B|1, C, C) bool: query tile i against prefix block j."""
        C = self.C
        s = j * C + jnp.arange(C)
        shared = jax.lax.dynamic_slice_in_dim(self.shared, i * C, C, axis=1)
        return (shared[:, :, None] > 0) & (s < self.P)[None, None, :]

    def first_row_block(self, i):
        """The first row-key block a query of tile i may see (its last is i: causality)."""
        return jnp.min(jax.lax.dynamic_slice_in_dim(self.start, i * self.C, self.C, axis=1)) // self.C

    def last_query_tile(self, j):
        """The last query tile that may see row-key block j (its first is j): the last query
        whose segment starts at or before the block's last key."""
        t = jnp.arange(self.seg.shape[1])
        return jnp.max(jnp.where(self.start <= (j + 1) * self.C - 1, t, 0)) // self.C


def _tiles(mask: Segments, C: int) -> _Tiles:
    T, P = mask.length, mask.prefix
    pad = -(-T // C) * C - T
    t = jnp.arange(T, dtype=jnp.int32)
    if mask.segments is None:
        seg, start = jnp.zeros((1, T), jnp.int32), jnp.zeros((1, T), jnp.int32)
    else:  # each segment's first index, wherever its tokens lie (ids are in [0, T])
        seg = mask.segments.astype(jnp.int32)
        first = jax.vmap(lambda s: jax.ops.segment_min(t, jnp.clip(s, 0, T), num_segments=T + 1))(seg)
        start = jnp.take_along_axis(first, jnp.clip(seg, 0, T), axis=1)
    shared = None if not P else jnp.pad(mask.shared.astype(jnp.int32), ((0, 0), (0, pad)))
    return _Tiles(jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1), shared,
                  jnp.pad(start, ((0, 0), (0, pad)), constant_values=T), T, P, C)


def _keys(x, P: int, C: int):
    """k or v (B, G, P + T, K) -> (B, G, (m + n) * C, K): the prefix's keys, then the row's, each
    zero-padded to whole blocks."""
    up = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, -(-a.shape[2] // C) * C - a.shape[2]), (0, 0)))  # noqa: E731
    return jnp.concatenate([up(x[:, :, :P]), up(x[:, :, P:])], axis=2) if P else up(x)


def _unkeys(x, P: int, T: int, C: int):
    """_keys' inverse: (B, G, (m + n) * C, K) -> (B, G, P + T, K)."""
    m = -(-P // C) * C
    return jnp.concatenate([x[:, :, :P], x[:, :, m:m + T]], axis=2) if P else x[:, :, :T]


def _block(x, j, C):
    return jax.lax.dynamic_slice_in_dim(x, j * C, C, axis=-2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(C, q, k, v, mask):
    return _attend_fwd(C, q, k, v, mask)[0]


def _attend_fwd(C, q, k, v, mask):
    B, H, T, K = q.shape
    G = k.shape[1]
    C = min(C, T)
    tl = _tiles(mask, C)
    qg = jnp.pad(q.reshape(B, G, H // G, T, K), ((0, 0),) * 3 + ((0, tl.n * C - T), (0, 0)))
    kp, vp = _keys(k, tl.P, C), _keys(v, tl.P, C)
    scale = 1 / math.sqrt(K)

    def query_tile(i):  # -> its output (B, G, R, C, K) and log-sum-exp (B, G, R, C)
        qi = _block(qg, i, C)

        def visit(tile, offset):
            def body(j, carry):  # m: the running max score, l: the running sum of exp(score - m)
                m, l, acc = carry
                seen = tile(i, j)[:, None, None]  # (B|1, 1, 1, C, C)
                kj, vj = _block(kp, offset + j, C), _block(vp, offset + j, C)
                s = jnp.where(seen, jnp.einsum("bgrtk,bgck->bgrtc", qi, kj).astype(jnp.float32) * scale, -1e30)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(seen, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)  # what the sums so far are rescaled by
                acc = alpha[..., None] * acc + jnp.einsum("bgrtc,bgck->bgrtk", p.astype(vj.dtype), vj)
                return m_new, alpha * l + p.sum(-1), acc
            return body

        carry = (jnp.full(qi.shape[:-1], -1e30, jnp.float32), jnp.zeros(qi.shape[:-1], jnp.float32),
                 jnp.zeros(qi.shape, jnp.float32))
        if tl.P:
            carry = jax.lax.fori_loop(0, tl.m, visit(tl.prefix_tile, 0), carry)
        m, l, acc = jax.lax.fori_loop(tl.first_row_block(i), i + 1, visit(tl.row_tile, tl.m), carry)
        some = l > 0
        out = jnp.where(some[..., None], acc / jnp.where(some, l, 1.0)[..., None], 0.0)
        return out, jnp.where(some, m + jnp.log(jnp.where(some, l, 1.0)), jnp.inf)  # p = exp(s - lse)

    out, lse = jax.lax.map(query_tile, jnp.arange(tl.n))  # (n, B, G, R, C, K), (n, B, G, R, C)
    out = jnp.moveaxis(out, 0, 3).reshape(qg.shape).astype(q.dtype)  # (B, G, R, n * C, K)
    lse = jnp.moveaxis(lse, 0, 3).reshape(qg.shape[:-1])
    return out[:, :, :, :T].reshape(B, H, T, K), (q, k, v, mask, out, lse)


def _attend_bwd(C, res, g):
    """Per key block, its tiles' probabilities again from q, k and the log-sum-exp; dk, dv of
    the block summed over its query tiles, dq over every block."""
    q, k, v, mask, out, lse = res
    q, k, v = ops.after(g, q, k, v)  # recomputed from: after the cotangent, never in the forward pass
    B, H, T, K = q.shape
    G = k.shape[1]
    C = min(C, T)
    tl = _tiles(mask, C)
    padq = lambda a: jnp.pad(a, ((0, 0),) * 3 + ((0, tl.n * C - T),) + ((0, 0),) * (a.ndim - 4))  # noqa: E731
    qg = padq(q.reshape(B, G, H // G, T, K))
    gg = jnp.pad(g.reshape(B, G, H // G, T, K).astype(jnp.float32), ((0, 0),) * 3 + ((0, tl.n * C - T), (0, 0)))
    d = jnp.sum(gg * out.astype(jnp.float32), axis=-1)  # (B, G, R, n * C): sum_s p dp/ds = do . o
    kp, vp = _keys(k, tl.P, C), _keys(v, tl.P, C)
    scale = 1 / math.sqrt(K)

    def key_block(tile, offset, lo, hi):
        def run(dq, j):
            kj, vj = _block(kp, offset + j, C).astype(jnp.float32), _block(vp, offset + j, C).astype(jnp.float32)

            def body(i, carry):
                dk, dv, dq = carry
                qi, gi = _block(qg, i, C), _block(gg, i, C)
                seen = tile(i, j)[:, None, None]
                s = jnp.einsum("bgrtk,bgck->bgrtc", qi, kj).astype(jnp.float32) * scale
                p = jnp.where(seen, jnp.exp(s - _block(lse[..., None], i, C)), 0.0)  # (B, G, R, C, C)
                dv = dv + jnp.einsum("bgrtc,bgrtk->bgck", p, gi)
                dp = jnp.einsum("bgrtk,bgck->bgrtc", gi, vj)
                ds = p * (dp - _block(d[..., None], i, C)) * scale  # d score, through the scale
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, _block(dq, i, C) + jnp.einsum("bgrtc,bgck->bgrtk", ds, kj), i * C, axis=3)
                return dk + jnp.einsum("bgrtc,bgrtk->bgck", ds, qi.astype(jnp.float32)), dv, dq

            zero = jnp.zeros(kj.shape, jnp.float32)
            dk, dv, dq = jax.lax.fori_loop(lo(j), hi(j), body, (zero, zero, dq))
            return dq, (dk, dv)
        return run

    dq = jnp.zeros(qg.shape, jnp.float32)
    parts = []
    if tl.P:  # every query tile may see a prefix block
        dq, pre = jax.lax.scan(key_block(tl.prefix_tile, 0, lambda j: 0, lambda j: tl.n), dq, jnp.arange(tl.m))
        parts.append(pre)
    dq, row = jax.lax.scan(key_block(tl.row_tile, tl.m, lambda j: j, lambda j: tl.last_query_tile(j) + 1), dq,
                           jnp.arange(tl.n))
    parts.append(row)
    whole = lambda xs: jnp.concatenate([jnp.moveaxis(x, 0, 2).reshape(B, G, -1, K) for x in xs], axis=2)  # noqa: E731
    dk, dv = (_unkeys(whole([p[n] for p in parts]), tl.P, T, C) for n in (0, 1))
    dq = dq[:, :, :, :T].reshape(B, H, T, K)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)
