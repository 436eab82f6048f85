"""Numerical kernels of the model: pure functions on arrays, no parameters or modules
(those are model.py's).

- the dropout mask: a counter-based hash of each element's index (`dropout`)
- mixed-precision products: `products_in` (autocast for train.dtype=bfloat16), `mm`,
  `transposed`, `dense` (a bias-free linear layer with a hand-written gradient under autocast)
- rotary position embedding: `rope_freqs` (default, linear or llama3), `rotary` (the angles),
  `rotate`, `rope`
- attention: `attend`, and `attend_recomputed`, whose gradient recomputes the probabilities;
  `attend_dpa` (jax.nn.dot_product_attention: cuDNN's fused attention on a GPU); the blockwise
  one, over training's compact mask, is blockwise.py's
- `after`, which keeps a backward pass's recomputation in the backward pass, and `recomputed`,
  any function whose backward pass runs its forward pass again (rematerialisation)
- SwiGLU with a hand-written gradient: `swiglu`

Shapes: B batch, T query length, S key length (T, or the KV-cache size),
H heads, G key/value heads (H with plain multi-head attention), R = H / G query heads per
key/value head, K head size, D d_model, F d_ff, N rows (B * T flattened);
`mm` names its own (M, K) @ (K, N).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os

import jax
import jax.numpy as jnp


def _fmix32(h):
    """murmur3's 32-bit finalizer: a bijection of uint32 whose every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout(x, rate, key):
    """x with each element kept with probability 1 - rate (to 1/65536) and scaled by its inverse.

    The mask is a counter-based hash of each element's index, seeded by two 32-bit words drawn
    from `key`: a handful of integer ops that XLA fuses into the consumer. jax.random.bits
    (threefry, a rolled loop on CPU) cost ~12 ms a step for the seed config's 13 masks, about a
    tenth of its forward pass (bench/README.md). Same key, same mask, on any device layout."""
    if key is None or rate == 0.0:
        return x
    threshold = round((1.0 - rate) * 65536)
    s, t = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):  # the flat row-major index, as a fusible sum of iotas
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride)
        stride *= x.shape[d]
    keep = (_fmix32(_fmix32(index ^ s) + t) >> 16) < threshold
    return jnp.where(keep, x * (65536 / threshold), 0).astype(x.dtype)


_PRODUCTS = contextvars.ContextVar("products", default=jnp.float32)


@contextlib.contextmanager
def products_in(dtype):
    """Traced inside it, the products of the linear layers, SwiGLU and the output head multiply
    `dtype` operands (the float32 activations and weights cast as they are read) with float32
    accumulation and float32 results, forward and backward: autocast, with parameters,
    activations, gradients and the optimizer in float32. `steps.loss_sums` uses it for
    train.dtype=bfloat16. Outside it (the default, and decoding) products are plain float32.
    It acts when a function is traced, and jit does not key its cache on it: enter it inside
    the function that is jitted, as loss_sums does."""
    token = _PRODUCTS.set(jnp.dtype(dtype))
    try:
        yield
    finally:
        _PRODUCTS.reset(token)


def products_dtype():
    """The products' operand dtype where this is traced: `products_in`'s, else float32."""
    return _PRODUCTS.get()


def mm(a, b):
    """a (M, K) @ b (K, N). float32: the plain product. bfloat16 operands: float32 accumulation
    and a float32 result, the product XLA on CPU hands to its matmul library (YNNPACK; AMX where
    the CPU has it) so long as both operands are row-major arrays (a transpose: `transposed`).
    With a bfloat16 result, or an operand XLA lays out transposed, it multiplies in float32
    instead, 5x slower on an AMX machine (bench/README.md)."""
    if a.dtype == jnp.float32:
        return a @ b
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def transposed(a):
    """a.T (2-D) for `mm`: materialised row-major through a flat copy, which XLA cannot turn back
    into a transposed layout of the same buffer."""
    return jax.lax.optimization_barrier(a.T.reshape(-1)).reshape(a.shape[::-1])


def dense(x, w, w_transposed: bool = False):
    """x (..., D) @ w (D, F) -> (..., F): a bias-free linear layer; x @ w.T for w (F, D) with
    w_transposed (the tied output head). Under `products_in` its products, and its gradient's,
    take low-precision operands (`_dense_cast`)."""
    low = _PRODUCTS.get()
    if low == jnp.float32:
        return x @ (w.T if w_transposed else w)
    return _dense_cast(low, w_transposed, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dense_cast(low, w_transposed, x, w):
    return _dense_cast_fwd(low, w_transposed, x, w)[0]


def _dense_cast_fwd(low, w_transposed, x, w):
    xl, wl = x.astype(low), w.astype(low)
    out = mm(xl, transposed(wl) if w_transposed else wl).astype(x.dtype)
    return out, (xl, wl, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))  # empty: x's, w's dtypes


def _dense_cast_bwd(low, w_transposed, res, g):
    """Autodiff's gradient, each product through `mm` on row-major operands (autodiff's own
    would multiply in float32), the weight's gradient computed in the weight's own layout; the
    gradients come back in x's and w's dtypes, unrounded."""
    xl, wl, xd, wd = res
    x2, g2 = xl.reshape(-1, xl.shape[-1]), g.reshape(-1, g.shape[-1]).astype(low)  # (N, D), (N, F)
    if w_transposed:  # w (F, D)
        dx, dw = mm(g2, wl), mm(transposed(g2), x2)
    else:  # w (D, F)
        dx, dw = mm(g2, transposed(wl)), mm(transposed(x2), g2)
    return dx.reshape(xl.shape).astype(xd.dtype), dw.astype(wd.dtype)


_dense_cast.defvjp(_dense_cast_fwd, _dense_cast_bwd)


ROTARY_TABLE_MAX = 8192  # positions; larger contexts compute their angles where they are used


def rope_freqs(head_dim: int, base: float, scaling: tuple = ()):
    """The rotary inverse frequencies (K/2,) float32: base^(-2i/K), then, as transformers'
    modeling_rope_utils scales them, with scaling ("linear", factor) all divided by factor, and with
    ("llama3", factor, low, high, original) (Llama 3.1): those whose wavelength 2 pi / f is above
    original / low divided by factor, those below original / high kept, and between them the mix
    (1 - s) f / factor + s f, s = (original / wavelength - low) / (high - low)."""
    half = head_dim // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (K/2,)
    if not scaling:
        return freqs
    if scaling[0] == "linear":
        return freqs / scaling[1]
    _, factor, low, high, original = scaling
    wavelen = 2 * math.pi / freqs
    s = (original / wavelen - low) / (high - low)
    mixed = (1 - s) * freqs / factor + s * freqs
    return jnp.where(wavelen < original / high, freqs, jnp.where(wavelen > original / low, freqs / factor, mixed))


def rotary(positions, head_dim: int, base: float = 10000.0, table: int = 0, scaling: tuple = ()):
    """The rotary angles' (sin, cos), each (B, T, 1, K/2) float32, for positions (B, T) int;
    the frequencies are `rope_freqs(head_dim, base, scaling)`.

    table (the model's max_seq_len; up to ROTARY_TABLE_MAX): sin and cos are looked up in a
    (table, K/2) table computed when the function is traced, the same values bit for bit.
    Computed in the step instead, XLA fuses them into every rope's consumer and recomputes them
    per element, for each head and layer and again in the backward pass (bench/README.md).
    Every real token's position is below max_seq_len (data, decoder and engine keep sequences
    within it); a padding token's larger one takes the last row."""
    if 0 < table <= ROTARY_TABLE_MAX:
        with jax.ensure_compile_time_eval():  # a constant of the program, not ops in it
            sin, cos = rotary(jnp.arange(table)[None], head_dim, base, scaling=scaling)
        take = lambda t: jnp.take(t[0, :, 0], positions, axis=0, mode="clip")[:, :, None, :]  # noqa: E731
        return take(sin), take(cos)
    freqs = rope_freqs(head_dim, base, scaling)  # (K/2,)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # (B, T, K/2)
    return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]


def rotate(x, sin, cos):
    """x (B, T, H, K) rotated by `rotary`'s angles -> (B, T, H, K).

    Pairs (x[i], x[i + K/2]) are rotated by angle position * base^(-2i/K), so a
    query-key dot product depends only on the difference of their positions.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


def rope(x, positions, base: float = 10000.0):
    """Rotary embedding. x (B, T, H, K), positions (B, T) int -> (B, T, H, K): `rotate` by
    `rotary(positions)`."""
    return rotate(x, *rotary(positions, x.shape[-1], base))


def attend(q, k, v, mask):
    """q (B, H, T, K), k v (B, G, S, K), mask (B|1, T, S) bool -> (B, H, T, K).
    Heads lead so the score and value products are batched matmuls over
    contiguous (T, K) / (S, K) blocks: no transposes of the KV cache. With G < H
    (grouped-query attention) query heads g*H/G .. (g+1)*H/G - 1 share key/value
    head g, as transformers' repeat_kv has it, without copying the cache."""
    B, H, T, K = q.shape
    G = k.shape[1]
    if G != H:
        q = q.reshape(B, G, H // G, T, K)
        scores = jnp.einsum("bgrtk,bgsk->bgrts", q, k).astype(jnp.float32) / math.sqrt(K)
        scores = jnp.where(mask[:, None, None], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bgrts,bgsk->bgrtk", probs, v).reshape(B, H, T, K)
    scores = jnp.einsum("bhtk,bhsk->bhts", q, k).astype(jnp.float32) / math.sqrt(K)
    scores = jnp.where(mask[:, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bhsk->bhtk", probs, v)


@jax.custom_vjp
def attend_recomputed(q, k, v, mask):
    """`attend`, whose gradient recomputes the (B, H, T, S) scores and probabilities from q k v
    after the cotangent exists (`after`): the forward pass keeps q k v, not two (T, S) matrices
    per head and layer. LoRA's step uses it (lora.attach): with the weight gradients gone those
    matrices are most of what its step holds (bench/README.md); full fine-tuning does not (the
    recomputation measured 11% slower there)."""
    return attend(q, k, v, mask)


def _attend_recomputed_fwd(q, k, v, mask):
    return attend(q, k, v, mask), (q, k, v, mask)


def _attend_recomputed_bwd(res, g):
    q, k, v, mask = res
    q, k, v = after(g, q, k, v)
    _, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
    return (*vjp(g), None)


attend_recomputed.defvjp(_attend_recomputed_fwd, _attend_recomputed_bwd)


def attend_dpa(q, k, v, mask, implementation: str = "cudnn"):
    """`attend` through jax.nn.dot_product_attention: q (B, H, T, K), k v (B, G, S, K), mask
    (B|1, T, S) bool -> (B, H, T, K). implementation "cudnn" (a GPU only): cuDNN's fused
    attention, which holds no score matrix but takes bfloat16 operands only, so q k v are
    rounded to bfloat16 (the output comes back in q's dtype); "xla": float32 as given (what
    tests check the layout, GQA and mask handling with on a CPU)."""
    dtype = q.dtype
    if implementation == "cudnn":
        q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    bthk = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  (B, T, heads, K): the function's layout
    out = jax.nn.dot_product_attention(bthk(q), bthk(k), bthk(v), mask=mask[:, None], implementation=implementation)
    return bthk(out).astype(dtype)


def recomputed(f, policy=None):
    """f (a function of arrays and pytrees of them), whose backward pass runs f's forward pass
    again (jax.checkpoint under `policy`: the values it saves are kept from the forward pass, the
    rest recomputed), from residuals passed through `after`: jax.checkpoint alone is undone by XLA
    on CPU, which merges the recomputation with the forward pass (see after). The forward pass
    then keeps f's inputs (and what the policy saves), not every value inside f."""
    @jax.custom_vjp
    def run(*args):
        return f(*args)

    def fwd(*args):
        return jax.vjp(jax.checkpoint(f, policy=policy), *args)  # (out, the pullback: a pytree of residuals)

    def bwd(pullback, g):
        first = next(x for x in jax.tree.leaves(g) if jnp.issubdtype(x.dtype, jnp.floating))
        gate = lambda r: after(first, r)[0] if jnp.issubdtype(r.dtype, jnp.floating) else r  # noqa: E731
        return jax.tree.map(gate, pullback)(g)

    run.defvjp(fwd, bwd)
    return run


def after(g, *xs):
    """xs, each plus 0 * g[0]: the same values, which XLA can compute only once the cotangent g
    exists (lora.py's backward passes and attend_recomputed; the model's own swiglu and attention
    do without it, which measured 12% faster at the default config). A backward pass recomputes
    from its residuals through these, so XLA on CPU neither merges the recomputation with the
    forward pass's (it drops optimization barriers before its CSE, which undoes jax.checkpoint)
    nor hoists it or a residual's transpose into the forward pass: either way the result would
    stay alive, for every layer, until the backward pass."""
    zero = 0 * g.reshape(-1)[0]
    return tuple(x + zero.astype(x.dtype) for x in xs)


def swiglu(x, w1, w3, w2):
    """x (N, D), w1 w3 (D, F), w2 (F, D) -> (silu(x w1) * (x w3)) w2, (N, D); under
    `products_in`, its products take low-precision operands (`_swiglu_cast`)."""
    low = _PRODUCTS.get()
    return _swiglu(x, w1, w3, w2) if low == jnp.float32 else _swiglu_cast(low, x, w1, w3, w2)


@jax.custom_vjp
def _swiglu(x, w1, w3, w2):
    """Its gradient is autodiff's, written out so that every weight gradient is a
    plain (D, N) @ (N, F) product of a materialised transpose: left to itself,
    XLA on CPU fuses the silu derivative into a strided transposed write, which
    profiled at a sixth of the train step."""
    return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2


def _swiglu_fwd(x, w1, w3, w2):
    """Keeps sigmoid(a) and silu(a) for the backward pass rather than recomputing them from a:
    one more (N, F) residual per layer, 3-5% off the seed step (bench/README.md)."""
    a, b = x @ w1, x @ w3
    sig = jax.nn.sigmoid(a)
    silu = a * sig  # jax.nn.silu(a), the same ops
    return (silu * b) @ w2, (x, sig, silu, b, w1, w3, w2)


def _swiglu_bwd(res, g):
    x, sig, silu, b, w1, w3, w2 = res
    dh = g @ w2.T  # (N, F)
    da = dh * b * (sig + silu * (1 - sig))  # silu'(a) = sig + silu * (1 - sig)
    db = dh * silu
    xT, hT = jax.lax.optimization_barrier((x.T, (silu * b).T))
    return da @ w1.T + db @ w3.T, xT @ da, xT @ db, hT @ g


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _swiglu_cast(low, x, w1, w3, w2):
    return _swiglu_cast_fwd(low, x, w1, w3, w2)[0]


def _swiglu_cast_fwd(low, x, w1, w3, w2):
    """`_swiglu` with every product's operands cast to `low` (mm: float32 accumulation and
    results); the elementwise work stays in x's dtype."""
    xl, w1l, w3l, w2l = (t.astype(low) for t in (x, w1, w3, w2))
    a, b = mm(xl, w1l), mm(xl, w3l)  # (N, F) float32
    out = mm((jax.nn.silu(a) * b).astype(low), w2l).astype(x.dtype)
    return out, (xl, a, b, w1l, w3l, w2l, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w1.dtype))  # dtypes


def _swiglu_cast_bwd(low, res, g):
    xl, a, b, w1l, w3l, w2l, xd, wd = res
    gl = g.astype(low)
    sig = jax.nn.sigmoid(a)
    silu = a * sig
    dh = mm(gl, transposed(w2l))  # (N, F)
    da = (dh * b * (sig + silu * (1 - sig))).astype(low)
    db = (dh * silu).astype(low)
    xT, hT = transposed(xl), transposed((silu * b).astype(low))
    dx = (mm(da, transposed(w1l)) + mm(db, transposed(w3l))).astype(xd.dtype)
    return dx, mm(xT, da).astype(wd.dtype), mm(xT, db).astype(wd.dtype), mm(hT, gl).astype(wd.dtype)


_swiglu_cast.defvjp(_swiglu_cast_fwd, _swiglu_cast_bwd)


# train.dtype: auto -- bfloat16 products where the hardware multiplies bfloat16 natively

def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def choose_dtype(backend: str, compute_capability: str | None, flags: frozenset) -> tuple[str, str]:
    """(dtype, why) for train.dtype=auto: bfloat16 where the products have native bfloat16
    units (a GPU from Ampere on, compute capability >= 8.0; a TPU; a CPU with AMX, whose
    bfloat16 tile products run several times faster than float32, or with AVX-512 BF16, AMD
    Zen 4's bfloat16 dot products, which ran the seed config's step 1.3-1.6x faster:
    bench/README.md), else float32: other CPUs convert bfloat16 operands and multiply them
    slower. The default recipe holds in both arithmetics on the five seeds measured
    (configs/default.yaml, bench/seeds.py; issue 37)."""
    if backend == "tpu":
        return "bfloat16", "a TPU"
    if backend in ("gpu", "cuda", "rocm"):
        major = int(str(compute_capability or "0").split(".")[0] or 0)
        if backend == "rocm" or major >= 8:
            return "bfloat16", f"a GPU with bfloat16 units (compute capability {compute_capability})"
        return "float32", f"a GPU without bfloat16 units (compute capability {compute_capability})"
    if "amx_bf16" in flags:
        return "bfloat16", "this CPU has AMX bfloat16 products (amx_bf16)"
    if "avx512_bf16" in flags:
        return "bfloat16", "this CPU has AVX-512 bfloat16 products (avx512_bf16)"
    return "float32", "this CPU has no native bfloat16 products (neither amx_bf16 nor avx512_bf16 in /proc/cpuinfo)"


def resolve_dtype(name: str) -> tuple[str, str]:
    """train.dtype as the run uses it: float32 and bfloat16 as given, auto chosen for this
    machine's first device (choose_dtype), or as $JAXSFT_AUTO_DTYPE says (the tests pin it to
    float32, so that their figures do not depend on the CPU); (dtype, why)."""
    if name != "auto":
        return name, "as configured"
    forced = os.environ.get("JAXSFT_AUTO_DTYPE")
    if forced in ("float32", "bfloat16"):
        return forced, "JAXSFT_AUTO_DTYPE"
    dev = jax.devices()[0]
    return choose_dtype(jax.default_backend(), getattr(dev, "compute_capability", None), cpu_flags())
