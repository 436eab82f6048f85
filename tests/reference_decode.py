"""The reference decoders the engine and Generator are tested against (test oracles, not
used by jaxsft): `generate`, one compiled program (a prefill of the left-padded prompts,
then a `lax.while_loop` of one-token steps that ends when every row has written
<|endoftext|> or max_new_tokens is reached; greedy by default, temperature / top-k /
top-p sampling with an explicit key), and `naive_greedy`, which re-runs the whole
sequence for every token (no cache)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft import masks, model
from jaxsft.config import ModelConfig
from jaxsft.decode import Sampling


def pick(logits, key, s: Sampling):
    """logits (B, V) float32 -> next tokens (B,) int32."""
    if s.temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        sorted_l = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_l, axis=-1), axis=-1)
        # keep the smallest prefix whose probability reaches top_p (always >= 1 token)
        cutoff_idx = jnp.sum(cum < s.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_l, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclass(frozen=True)
class Spec:
    """What a compiled decoder is specialised on (static, hashable)."""
    graphdef: object
    cfg: ModelConfig
    max_new_tokens: int
    end_id: int
    pad_id: int = 0
    sampling: Sampling = Sampling()


def _prefill(params, prompts, prompt_lens, key, spec: Spec):
    """prompts (B, P) int32, left-padded: row b's prompt is prompts[b, P - prompt_lens[b]:].
    Returns the first answer tokens (B,) int32 and the KV cache (P + max_new_tokens slots)
    holding the prompts."""
    B, P = prompts.shape
    S = P + spec.max_new_tokens
    cfg = spec.cfg
    dtype = jax.tree.leaves(params)[0].dtype
    cache = [(jnp.zeros((B, cfg.kv_heads, S, cfg.head_dim), dtype),) * 2 for _ in range(cfg.n_layers)]
    positions = jnp.maximum(jnp.arange(P)[None, :] - (P - prompt_lens)[:, None], 0)  # (B, P)
    logits, cache = model.apply(spec.graphdef, params, prompts, positions=positions,
                                mask=masks.prefill(prompt_lens, P, S), cache=cache, index=0, last_only=True)
    return pick(logits[:, -1], jax.random.fold_in(key, 0), spec.sampling), cache


def _step(params, tok, cache, done, prompt_lens, i, key, spec: Spec):
    """Token i of the answer from token i - 1: tok, done (B,), i int32 scalar.
    Returns (next tokens (B,), cache, done); finished rows get pad_id."""
    S = cache[0][0].shape[2]
    P = S - spec.max_new_tokens
    pos = (prompt_lens + i - 1)[:, None]  # (B, 1)
    logits, cache = model.apply(spec.graphdef, params, tok[:, None], positions=pos,
                                mask=masks.decode_step(prompt_lens, P, S, P + i - 1), cache=cache, index=P + i - 1)
    nxt = jnp.where(done, spec.pad_id, pick(logits[:, -1], jax.random.fold_in(key, i), spec.sampling))
    return nxt, cache, done | (nxt == spec.end_id)


@functools.partial(jax.jit, static_argnames=("spec",))
def generate(params, prompts, prompt_lens, key, *, spec: Spec):
    """Decodes up to spec.max_new_tokens tokens after each prompt.

    prompts (B, P) int32, left-padded: row b's prompt is prompts[b, P - prompt_lens[b]:].
    Returns tokens (B, max_new_tokens) int32: each row's answer, then <|endoftext|>,
    then pad_id.
    """
    B, P = prompts.shape
    n = spec.max_new_tokens
    tok, cache = _prefill(params, prompts, prompt_lens, key, spec)
    out = jnp.full((B, n), spec.pad_id, jnp.int32).at[:, 0].set(tok)

    def cond(state):
        i, _, _, _, done = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, tok, cache, out, done = state
        nxt, cache, done = _step(params, tok, cache, done, prompt_lens, i, key, spec)
        return i + 1, nxt, cache, jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i)), done

    state = (jnp.int32(1), tok, cache, out, tok == spec.end_id)
    return jax.lax.while_loop(cond, body, state)[3]


@functools.partial(jax.jit, static_argnums=0)
def _logits_at(graphdef, params, tokens, t):
    """tokens (1, T) -> logits of position t (V,); compiled once per T, shared by calls."""
    return model.apply(graphdef, params, tokens)[0][0, t]


def naive_greedy(graphdef, params, prompt: Sequence[int], max_new_tokens: int, end_id: int,
                 length: int = 0) -> list[int]:
    """Reference decoder: re-runs the whole sequence for every new token (no cache).
    The sequence is right-padded to `length` (at least len(prompt) + max_new_tokens; the
    tests pass the model's max_seq_len), which a causal model does not see, so one program
    per model is compiled, not one per step or prompt length."""
    seq = list(prompt)
    buf = np.zeros((1, max(length, len(seq) + max_new_tokens)), np.int32)
    out = []
    for _ in range(max_new_tokens):
        buf[0, :len(seq)] = seq
        tok = int(jnp.argmax(_logits_at(graphdef, params, jnp.asarray(buf), len(seq) - 1)))
        out.append(tok)
        seq.append(tok)
        if tok == end_id:
            break
    return out
