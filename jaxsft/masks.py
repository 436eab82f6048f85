"""Attention masks as named pure functions: which keys each query may see.

A mask is bool (B|1, T, S): query t of row b sees key s where it is True.
T queries, S keys (T, or the KV-cache size when decoding).

Training's mask (causal, packed segments, the shared prefix) also has a compact form,
`Segments`: the (B, T) arrays it is made of, from which blockwise attention (blockwise.py)
builds each tile's (B|1, C, C) part as it goes instead of the whole (B, T, S).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct


def causal(T: int):
    """(1, T, T): query t sees keys 0..t."""
    return jnp.tril(jnp.ones((1, T, T), bool))


def segment_causal(segments):
    """segments (B, T) int -> (B, T, T): causal, and only within the query's own
    segment, so examples packed into one row never see each other."""
    T = segments.shape[1]
    return (segments[:, :, None] == segments[:, None, :]) & causal(T)


def with_prefix(mask, shared, P: int):
    """mask (B, T, T), shared (B, T) -> (B, T, P + T): keys [0, P) are a prefix
    computed once (the shared system prompt); a query sees all of it where shared > 0."""
    B, T, _ = mask.shape
    return jnp.concatenate([jnp.broadcast_to(shared[:, :, None] > 0, (B, T, P)), mask], axis=-1)


def prefill(prompt_lens, P: int, S: int):
    """Left-padded prompts (B, P) into a cache of S slots -> (B, P, S): causal over the
    prompt, never a pad (row b's prompt fills slots [P - prompt_lens[b], P))."""
    key_idx = jnp.arange(S)
    key_valid = key_idx[None, :] >= (P - prompt_lens)[:, None]  # (B, S)
    return (key_idx[None, None, :] <= jnp.arange(P)[None, :, None]) & key_valid[:, None, :]


def decode_step(prompt_lens, P: int, S: int, index):
    """The one new token at cache slot `index` (P + i - 1) -> (B, 1, S): every filled
    slot up to and including its own, never a pad."""
    key_idx = jnp.arange(S)
    key_valid = key_idx[None, :] >= (P - prompt_lens)[:, None]  # (B, S)
    return ((key_idx <= index)[None, :] & key_valid)[:, None, :]


def slot_step(positions, S: int):
    """Continuous batching: each slot's one new token at its own cache position
    positions (B,) -> (B, 1, S): keys 0..positions[b] of its own row. Keys past it
    (an earlier occupant's, or the pad of a prefill) are never seen."""
    return (jnp.arange(S)[None, :] <= positions[:, None])[:, None, :]


@struct.dataclass
class Segments:
    """`segment_causal` (or `causal`) and `with_prefix` before they are expanded. The keys are
    the P prefix keys, then the row's own T: S = P + T.

    segments  (B, T) int32, or None: one sequence a row (plain causal); each segment is one run
              of tokens (pack_batch's 1, 2, ..., then 0 for the padding), as blockwise's skipping needs
    shared    (B, T) int32, or None (no prefix): > 0 where the query sees the P prefix keys
    length    T (static)
    prefix    P (static; 0: no prefix)
    """
    segments: Optional[jax.Array] = None
    shared: Optional[jax.Array] = None
    length: int = struct.field(pytree_node=False, default=0)
    prefix: int = struct.field(pytree_node=False, default=0)

    @property
    def keys(self) -> int:
        return self.prefix + self.length

    def dense(self):
        """The mask itself: (B|1, T, P + T) bool."""
        m = causal(self.length) if self.segments is None else segment_causal(self.segments)
        if not self.prefix:
            return m
        return with_prefix(jnp.broadcast_to(m, (self.shared.shape[0],) + m.shape[1:]), self.shared, self.prefix)
