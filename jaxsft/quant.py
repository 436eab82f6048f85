"""A frozen kernel stored in fewer bits (QLoRA's base, lora.base_dtype), and widened back.

A kernel W (in, out) is stored as

    bfloat16   W rounded to bfloat16                                  2 bytes per weight
    int8       q int8 (in, out), scale float32 (out,)                 1 byte (+ 4 per column)
               W ~ q * scale, scale = max|W[:, j]| / 127: symmetric, per output channel
    int4       p uint8 (in / 2, out), scale float32 (in / g, out)     half a byte (+ 4 per g weights)
               W ~ q * scale[group], q in -7..7 (symmetric), scale = max|W in the group| / 7 over
               groups of g = GROUP consecutive rows (input channels) of each column; two q per
               byte: rows i and i + in/2 as the low and high nibble of p[i] (q + 8)

Each weight is off by at most half its scale (round to nearest; tests/test_lora.py). int4 is packed
here because jnp.int4 takes a whole byte per element on CPU in this JAX (0.10: its nbytes and the
process's resident set both say so). The scales stay float32. Groups of 64 rows, not 128: on a
(896, 4864) kernel (Qwen2.5-0.5B's w1) of heavy-tailed random weights (Student's t, 3 degrees of
freedom) the products' relative error is 0.18 against 0.22, for 0.56 against 0.53 bytes a weight
(docs/user-guide.md). A d_in that 64 does not divide takes its largest divisor below 64.

The stored form is a tuple: (W,) for a float kernel, (q, scale) otherwise; `dequantize` tells int8
from int4 by q's dtype. Nothing here knows a model: lora.py stores the frozen projections this way
and widens each inside its own custom_vjp, where the product reads it (qwix's interception of
dot_general cannot see into those).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

GROUP = 64  # int4: rows (input channels) sharing one scale


def group_size(d_in: int, group: int = GROUP) -> int:
    """The int4 group of a kernel with d_in rows: `group`, or d_in's largest divisor below it."""
    return next(g for g in range(min(group, d_in), 0, -1) if d_in % g == 0)


def stored_shapes(base_dtype: str, d_in: int, d_out: int) -> tuple:
    """((shape, dtype), ...) of a (d_in, d_out) kernel's stored form."""
    if base_dtype in ("float32", "bfloat16"):
        return (((d_in, d_out), jnp.dtype(base_dtype)),)
    if base_dtype == "int8":
        return ((d_in, d_out), jnp.int8), ((d_out,), jnp.float32)
    if d_in % 2:
        raise ValueError(f"int4 packs two rows a byte: a kernel with {d_in} rows")
    return ((d_in // 2, d_out), jnp.uint8), ((d_in // group_size(d_in), d_out), jnp.float32)


@jax.jit
def quantize_int8(w):
    """w (in, out) float -> (q int8 (in, out), scale float32 (out,))."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=0) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8), scale


@functools.partial(jax.jit, static_argnums=1)
def quantize_int4(w, group: int = GROUP):
    """w (in, out) float -> (packed uint8 (in / 2, out), scale float32 (in / g, out)); g: group_size."""
    w = w.astype(jnp.float32)
    d_in, d_out = w.shape
    g = group_size(d_in, group)
    groups = w.reshape(d_in // g, g, d_out)
    scale = jnp.max(jnp.abs(groups), axis=1) / 7.0  # (in / g, out)
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(groups / safe[:, None]), -7, 7).astype(jnp.int8).reshape(d_in, d_out)
    return pack_int4(q), scale


def pack_int4(q):
    """q int8 (in, out) in -8..7 -> uint8 (in / 2, out): rows i and i + in/2 as the low and high nibble."""
    half = q.shape[0] // 2
    u = (q.astype(jnp.int32) + 8).astype(jnp.uint8)
    return u[:half] | (u[half:] << 4)


def unpack_int4(p):
    """pack_int4's inverse: uint8 (in / 2, out) -> int8 (in, out)."""
    lo, hi = p & 15, p >> 4
    return jnp.concatenate([lo, hi], axis=0).astype(jnp.int8) - 8


def quantize(w, base_dtype: str) -> tuple:
    """A float kernel (in, out) in its stored form (see the module's docstring)."""
    if base_dtype in ("float32", "bfloat16"):
        return (jnp.asarray(w, base_dtype),)
    return quantize_int8(w) if base_dtype == "int8" else quantize_int4(w)


def dequantize(stored: tuple, dtype=jnp.float32):
    """A stored kernel as a dtype (in, out) array: float kernels cast, q * scale otherwise."""
    if len(stored) == 1:
        return stored[0].astype(dtype)
    q, scale = stored
    if q.dtype == jnp.int8:
        return (q.astype(jnp.float32) * scale).astype(dtype)
    q = unpack_int4(q)
    d_in, d_out = q.shape
    g = d_in // scale.shape[0]
    w = q.reshape(d_in // g, g, d_out).astype(jnp.float32) * scale[:, None]
    return w.reshape(d_in, d_out).astype(dtype)
