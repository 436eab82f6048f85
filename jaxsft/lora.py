"""LoRA: low-rank adapters on a frozen base (config section `lora`; rank 0 is off).

Each targeted projection (attention wq wk wv wo, SwiGLU w1 w3 w2) computes

    y = x @ W + (alpha / r) * (x @ A) @ B        W (in, out) frozen, A (in, r), B (r, out) trained

A starts as PEFT's kaiming-uniform, U(-1/sqrt(in), 1/sqrt(in)); B starts at 0, so a fresh
adapter computes exactly the base's function. The model code is not changed: `attach`
swaps each targeted model.Linear for a `LoraLinear` holding the same kernel (the parameter
path stays blocks.N.attn.wq.kernel) and, when an MLP projection is targeted, the
SwiGLU module for `LoraSwiGLU`, which computes the layer with the adapter terms in a
custom_vjp of its own (`swiglu_lora`; ops.swiglu reads its kernels inside its
custom_vjp, so nothing can see into it). Splitting that model gives (graphdef, base,
adapters); `combine` joins them for model.apply, and the gradient is taken with respect
to the adapters only, so the backward pass computes no weight gradient for the base
(x^T dy, a third of full fine-tuning's matmul work) and the optimizer holds state for the
adapters alone. The embedding rows of characters the base lacks (appended to its
vocabulary by model.init_from) are no part of the base: they train with the adapters
(`embed.new_rows`, and an untied head's `lm_head.new_cols`). A family's projection biases and
q/k norms (Qwen2, Qwen3: model.py) are base parameters like the kernels: frozen, never adapted.

`merge` folds the adapters into the kernels (W + (alpha/r) A B): evaluation, bin/chat,
bin/eval and any exporter see a plain model. `transform` gives the split the trainer runs
(parts.Parts: graphdef, the adapters that train, the frozen base, combine and merge); rank 0
is the identity transform (every parameter trains). A LoRA run's best/ and latest/ hold the
adapters (and their optimizer state) only; runs.py restores such a run on its base
(lora_base.json names the base and holds a fingerprint of its arrays).

QLoRA (lora.base_dtype bfloat16, int8 or int4): every projection kernel of the base is held as
quant.py stores it (`quantize_base`; the untargeted ones in `FrozenLinear`), and linear_lora and
swiglu_lora widen it inside their custom_vjp, in the forward pass and again, after the cotangent
exists (ops.after), in the backward pass: XLA keeps only the stored form between them, and the
widened kernels of one or two layers exist at a time. merge gives the dequantised base plus the
adapters, what training saw (`as_trained`: the float base so widened).

`peft_state_dict`, `adapter_config` and `save_peft` give the adapters as PEFT saves them
(adapter_model.safetensors, adapter_config.json; new rows as trainable tokens) for
transformers' Llama names (bin/export --adapter).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import model, ops, quant
from .config import HF_NAMES, Config, LoraConfig, ModelConfig, UserError, target_names
from .parts import Parts, full

_MODULE = {"wq": "attn", "wk": "attn", "wv": "attn", "wo": "attn", "w1": "mlp", "w3": "mlp", "w2": "mlp"}
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


def enabled(cfg: Config) -> bool:
    return cfg.lora.rank > 0


def scale(lc: LoraConfig) -> float:
    return lc.alpha / lc.rank


# the adapted modules


def _store(module: nnx.Module, kernel: nnx.Param, base_dtype: str) -> None:
    """Gives `module` the frozen kernel as lora.base_dtype stores it (quant.py): the Param itself for
    float32; else `kernel` (bfloat16, int8 or packed int4) and, quantised, `kernel_scale`."""
    if base_dtype == "float32":
        module.kernel = kernel
        return
    stored = quant.stored_shapes(base_dtype, *kernel.shape)
    module.kernel = nnx.Param(jnp.zeros(*stored[0]))  # the values: quantize_base's
    if len(stored) > 1:
        module.kernel_scale = nnx.Param(jnp.zeros(*stored[1]))


def stored(module: nnx.Module) -> tuple:
    """A projection's frozen kernel as stored: (W,) or (q, scale) (quant.dequantize widens it)."""
    scale = getattr(module, "kernel_scale", None)
    return (module.kernel[...],) if scale is None else (module.kernel[...], scale[...])


class LoraLinear(nnx.Module):
    """x @ kernel + scale * (x @ lora_a) @ lora_b (+ bias); the kernel and a bias (Qwen2's q/k/v
    projections) are the base's, unchanged and frozen (the kernel stored as lora.base_dtype says)."""

    def __init__(self, kernel: nnx.Param, rank: int, scale: float, bias: nnx.Param | None = None,
                 base_dtype: str = "float32"):
        d_in, d_out = kernel.shape
        _store(self, kernel, base_dtype)
        self.bias = bias
        self.lora_a = nnx.LoRAParam(jnp.zeros((d_in, rank), jnp.float32))  # set by init_adapters
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out), jnp.float32))
        self.scale = scale

    def __call__(self, x):  # (..., in) -> (..., out)
        a, b = (v[...].astype(x.dtype) for v in (self.lora_a, self.lora_b))
        y = linear_lora(self.scale, x.reshape(-1, x.shape[-1]), stored(self), a, b)
        return model.with_bias(y.reshape(x.shape[:-1] + (b.shape[1],)), self.bias)


class FrozenLinear(nnx.Module):
    """An untargeted projection of a base stored in fewer bits (lora.base_dtype): x @ W (+ bias),
    W widened inside linear_lora as the adapted ones are (rank-0 adapters)."""

    def __init__(self, kernel: nnx.Param, bias: nnx.Param | None, base_dtype: str):
        self.shape = tuple(kernel.shape)  # (in, out), as the plain kernel's
        _store(self, kernel, base_dtype)
        self.bias = bias

    def __call__(self, x):  # (..., in) -> (..., out)
        d_in, d_out = self.shape
        a, b = jnp.zeros((d_in, 0), x.dtype), jnp.zeros((0, d_out), x.dtype)
        y = linear_lora(0.0, x.reshape(-1, d_in), stored(self), a, b)
        return model.with_bias(y.reshape(x.shape[:-1] + (d_out,)), self.bias)


def _plain(w: tuple, dtype) -> bool:
    """Whether a stored kernel is used as it is (a float32 base): else it is widened where used."""
    return len(w) == 1 and w[0].dtype == dtype


def _widen_after(g, w: tuple, dtype):
    """A stored kernel widened for the backward pass: recomputed from what is stored once the
    cotangent g exists (ops.after), so that XLA neither keeps the forward pass's widened kernel
    alive until the backward pass nor widens every layer's kernel at once."""
    return w[0] if _plain(w, dtype) else quant.dequantize(ops.after(g, *w), dtype)


def _kernel_grad(w: tuple, dtype, grad):
    """The cotangent of a stored kernel: grad() for a float32 one (dropped under LoRA, which never
    asks for it), none for a kernel stored in fewer bits (frozen: never differentiated)."""
    return (grad(),) if _plain(w, dtype) else (None,) * len(w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def linear_lora(s, x, w, a, b):
    """x (N, in) -> x w + s (x a) b, (N, out); s: the adapter's scale (a float); w: the kernel as
    stored ((W,), or quant.py's (q, scale)), widened here, in the forward and again in the backward
    pass, so that only what is stored stays alive between them. The gradient is written out as
    swiglu_lora's is (its products over N take materialised transposes; left to autodiff, the
    attention adapters cost a LoRA step 10% more), and the kernel's is computed only if asked for."""
    return _linear_lora_fwd(s, x, w, a, b)[0]


def _linear_lora_fwd(s, x, w, a, b):
    xa = x @ a  # (N, r)
    return x @ quant.dequantize(w, x.dtype) + (xa * s) @ b, (x, xa, w, a, b)


def _linear_lora_bwd(s, res, g):
    x, xa, w, a, b = res
    x, xa = ops.after(g, x, xa)  # their transposes wait for g (ops.after)
    wf = _widen_after(g, w, x.dtype)
    gb = (g @ b.T) * s  # (N, r)
    gbT, xaT = jax.lax.optimization_barrier((gb.T, xa.T))  # (r, N): the adapters' products take the small
    xT = jax.lax.optimization_barrier(x.T)  # transposes; x's is for the kernel's gradient (dropped under LoRA)
    return g @ wf.T + gb @ a.T, _kernel_grad(w, x.dtype, lambda: xT @ g), (gbT @ x).T, (xaT * s) @ g


linear_lora.defvjp(_linear_lora_fwd, _linear_lora_bwd)


class LoraSwiGLU(nnx.Module):
    """model.SwiGLU with adapters on w1, w3, w2 (each LoraLinear or plain model.Linear): the same
    function, with the adapter terms beside the base products (`swiglu_lora`)."""

    def __init__(self, mlp: model.SwiGLU):
        self.w1, self.w3, self.w2 = mlp.w1, mlp.w3, mlp.w2

    def __call__(self, x):  # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        ws, ads, s = [], [], 1.0
        for w in (self.w1, self.w3, self.w2):
            ws.append(stored(w))
            if isinstance(w, LoraLinear):
                ads += [w.lora_a[...].astype(x.dtype), w.lora_b[...].astype(x.dtype)]
                s = w.scale
            else:  # no adapter: rank 0
                d_in, d_out = w.shape if isinstance(w, FrozenLinear) else w.kernel.shape
                ads += [jnp.zeros((d_in, 0), x.dtype), jnp.zeros((0, d_out), x.dtype)]
        return swiglu_lora(s, x.reshape(B * T, D), *ws, *ads).reshape(B, T, D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def swiglu_lora(s, x, w1, w3, w2, a1, b1, a3, b3, a2, b2):
    """x (N, D) -> (silu(x w1') * (x w3')) w2', (N, D), where w' = w + s a b (never formed);
    s: the adapters' scale (a float); an untargeted kernel comes with rank-0 a and b. Each w is
    the kernel as stored ((W,), or quant.py's (q, scale)), widened where it is used, in the
    forward and again in the backward pass (linear_lora).

    Like ops.swiglu, its gradient is written out: every product that sums over the N rows
    (the adapters' and the kernels' gradients) takes a materialised transpose, which XLA on
    CPU otherwise fuses into a strided write (left to autodiff, this layer made a LoRA step
    slower than a full fine-tuning one). The kernels' gradients are computed only if asked
    for: under LoRA they are not, and XLA drops them."""
    return _swiglu_lora_fwd(s, x, w1, w3, w2, a1, b1, a3, b3, a2, b2)[0]


def _swiglu_lora_fwd(s, x, w1, w3, w2, a1, b1, a3, b3, a2, b2):
    xa1, xa3 = x @ a1, x @ a3  # (N, r)
    k1, k3 = quant.dequantize(w1, x.dtype), quant.dequantize(w3, x.dtype)
    a, b = x @ k1 + (xa1 * s) @ b1, x @ k3 + (xa3 * s) @ b3  # (N, F)
    h = jax.nn.silu(a) * b
    ha2 = h @ a2
    out = h @ quant.dequantize(w2, x.dtype) + (ha2 * s) @ b2
    return out, (x, a, b, xa1, xa3, ha2, w1, w3, w2, a1, b1, a3, b3, a2, b2)


def _swiglu_lora_bwd(s, res, g):
    x, a, b, xa1, xa3, ha2, w1, w3, w2, a1, b1, a3, b3, a2, b2 = res
    x, a, xa1, xa3, ha2 = ops.after(g, x, a, xa1, xa3, ha2)  # recomputed from, transposed: after g
    dt = x.dtype
    k1, k3, k2 = (_widen_after(g, w, dt) for w in (w1, w3, w2))
    sig = jax.nn.sigmoid(a)
    silu = a * sig
    h = silu * b
    gb2 = (g @ b2.T) * s  # (N, r)
    dh = g @ k2.T + gb2 @ a2.T  # (N, F)
    da = dh * b * (sig + silu * (1 - sig))  # silu'(a) = sig + silu * (1 - sig)
    db = dh * silu
    da1, db3 = (da @ b1.T) * s, (db @ b3.T) * s  # (N, r)
    dx = da @ k1.T + db @ k3.T + da1 @ a1.T + db3 @ a3.T
    # The adapters' gradients take (r, N) transposes: (F, N) or (D, N) ones, which only the kernels'
    # gradients need (dropped under LoRA), profiled at a sixth of a 110M LoRA step (strided writes).
    small = jax.lax.optimization_barrier((xa1.T, xa3.T, ha2.T, da1.T, db3.T, gb2.T))
    xa1T, xa3T, ha2T, da1T, db3T, gb2T = small
    xT, hT = jax.lax.optimization_barrier((x.T, h.T))
    return (dx, _kernel_grad(w1, dt, lambda: xT @ da), _kernel_grad(w3, dt, lambda: xT @ db),
            _kernel_grad(w2, dt, lambda: hT @ g), (da1T @ x).T, (xa1T * s) @ da, (db3T @ x).T, (xa3T * s) @ db,
            (gb2T @ h).T, (ha2T * s) @ g)


swiglu_lora.defvjp(_swiglu_lora_fwd, _swiglu_lora_bwd)


def attach(gpt: model.GPT, lc: LoraConfig) -> model.GPT:
    """Swaps the targeted projections of `gpt` for LoraLinear modules (in place); returns it. With
    lora.base_dtype other than float32 every projection's kernel is stored so (the untargeted
    ones as FrozenLinear), its values set by quantize_base."""
    targets, bd = target_names(lc.targets), lc.base_dtype
    for blk in gpt.blocks:
        blk.attn.recompute = True  # the attention probabilities recomputed, not held (ops.attend_recomputed)
        if any(_MODULE[t] == "mlp" for t in targets) or bd != "float32":
            blk.mlp = LoraSwiGLU(blk.mlp)
        for t in _MODULE:  # with the base in fewer bits (lora.base_dtype), the untargeted projections too
            parent, old = getattr(blk, _MODULE[t]), getattr(getattr(blk, _MODULE[t]), t)
            if t in targets:
                setattr(parent, t, LoraLinear(old.kernel, lc.rank, scale(lc), old.bias, bd))
            elif bd != "float32":
                setattr(parent, t, FrozenLinear(old.kernel, old.bias, bd))
    return gpt


def graph(mc: ModelConfig, lc: LoraConfig):
    """(graphdef, base, adapters) of the adapted model as ShapeDtypeStructs (allocates nothing)."""
    gpt = nnx.eval_shape(lambda: attach(model.GPT(mc, nnx.Rngs(0)), lc))
    graphdef, adapters, base = nnx.split(gpt, nnx.LoRAParam, nnx.Param)
    return graphdef, base, adapters


def init_adapters(abstract_adapters, seed: int):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform with a = sqrt(5)), B = 0; adapter
    i of the flattened tree draws from fold_in(key(seed), i)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x10A)
    flat = nnx.to_flat_state(abstract_adapters)
    out = []
    for i, (path, var) in enumerate(flat):
        shape = var.get_value().shape
        if path[-1] == "lora_a":
            bound = 1.0 / np.sqrt(shape[0])
            value = jax.random.uniform(jax.random.fold_in(key, i), shape, jnp.float32, -bound, bound)
        else:
            value = jnp.zeros(shape, jnp.float32)
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


def init(mc: ModelConfig, lc: LoraConfig, seed: int, base, n_old: int | None = None):
    """(graphdef of the adapted model, base, fresh adapters). base: the full model's parameters
    (runs.init_params_from's, an nnx.State); it becomes the frozen half as it is. n_old: the
    base's own vocabulary size; the embedding rows n_old.. (characters the base lacks, appended
    to its vocabulary, freshly initialised) are no part of the base: they train with the
    adapters, as the adapters' entry embed.new_rows. lora.base_dtype: the projections' kernels are
    stored so (quantize_base)."""
    graphdef, abstract_base, abstract_adapters = graph(mc, lc)
    base = quantize_base(base, lc)
    leaves = zip(jax.tree.leaves(abstract_base), jax.tree.leaves(base))
    if jax.tree.structure(abstract_base) != jax.tree.structure(base) or any(
            (a.shape, a.dtype) != (b.shape, b.dtype) for a, b in leaves):
        raise AssertionError("the base's parameter tree does not fit the model")
    adapters = init_adapters(abstract_adapters, seed)
    if n_old is not None and n_old < mc.vocab_size:
        flat = dict(nnx.to_flat_state(base))
        new = {NEW_ROWS: nnx.LoRAParam(jnp.asarray(flat[NEW[NEW_ROWS]].get_value()[n_old:], jnp.float32))}
        if NEW[NEW_COLS] in flat:  # an untied output head: its columns for the new tokens train too
            new[NEW_COLS] = nnx.LoRAParam(jnp.asarray(flat[NEW[NEW_COLS]].get_value()[:, n_old:], jnp.float32))
        adapters = _with(adapters, new)
    return graphdef, base, adapters


def is_projection(path: tuple) -> bool:
    """Whether a parameter path is a block's projection kernel (blocks.N.attn.wq.kernel, ...)."""
    return len(path) == 5 and path[0] == "blocks" and path[3] in _MODULE and path[4] == "kernel"


def quantize_base(base, lc: LoraConfig):
    """The plain model's parameters with every projection kernel stored as lora.base_dtype says
    (quant.quantize: bfloat16, or int8 / packed int4 with a `kernel_scale` beside the kernel);
    the embedding, the norms, an untied head and the biases stay as they are. float32: base itself.
    Deterministic: a run resumed, exported or evaluated later quantises its base to the same bits."""
    if lc.base_dtype == "float32":
        return base
    out = []
    for path, var in nnx.to_flat_state(base):
        if not is_projection(path):
            out.append((path, var))
            continue
        st = quant.quantize(var.get_value(), lc.base_dtype)
        out.append((path, var.replace(st[0])))
        if len(st) > 1:
            out.append((path[:-1] + ("kernel_scale",), nnx.Param(st[1])))
    return nnx.from_flat_state(sorted(out, key=lambda kv: tuple(map(str, kv[0]))))


def abstract_adapters(mc: ModelConfig, lc: LoraConfig, n_old: int | None = None):
    """The adapters' tree as ShapeDtypeStructs (a restore target), new embedding rows included."""
    adapters = graph(mc, lc)[2]
    if n_old is not None and n_old < mc.vocab_size:
        n_new = mc.vocab_size - n_old
        new = {NEW_ROWS: nnx.LoRAParam(jax.ShapeDtypeStruct((n_new, mc.d_model), jnp.float32))}
        if not mc.tie_embeddings:
            new[NEW_COLS] = nnx.LoRAParam(jax.ShapeDtypeStruct((mc.d_model, n_new), jnp.float32))
        adapters = _with(adapters, new)
    return adapters


# the trained parts of the embedding (its last rows) and of an untied head (its last columns), and
# the base arrays they replace the end of
NEW_ROWS, NEW_COLS = ("embed", "new_rows"), ("lm_head", "new_cols")
NEW = {NEW_ROWS: ("embed", "embedding"), NEW_COLS: ("lm_head", "kernel")}


def _with(state, entries: dict):
    """state with the flat entries {path: Variable} added (or replaced)."""
    flat = dict(nnx.to_flat_state(state))
    flat.update(entries)
    return nnx.from_flat_state(sorted(flat.items(), key=lambda kv: tuple(map(str, kv[0]))))


def _split_rows(base, adapters):
    """(base with its embedding's last rows (and an untied head's last columns) replaced by the
    adapters' new ones, the adapters without them): those train, the rest is the base's."""
    flat = dict(nnx.to_flat_state(adapters))
    if NEW_ROWS not in flat:
        return base, adapters
    flat_base, replaced = dict(nnx.to_flat_state(base)), {}
    for key, axis in ((NEW_ROWS, 0), (NEW_COLS, 1)):
        if key in flat:
            new, old = flat.pop(key).get_value(), flat_base[NEW[key]]
            keep = jax.lax.slice_in_dim(old.get_value(), 0, old.get_value().shape[axis] - new.shape[axis], axis=axis)
            replaced[NEW[key]] = old.replace(jnp.concatenate([keep, new.astype(keep.dtype)], axis=axis))
    return _with(base, replaced), nnx.from_flat_state(list(flat.items()))


def combine(base, adapters):
    """The adapted model's parameters (for model.apply with `init`'s graphdef)."""
    base, adapters = _split_rows(base, adapters)
    return nnx.merge_state(base, adapters)


def merge(base, adapters, lc: LoraConfig):
    """The plain model's parameters, float32: each targeted kernel W + (alpha/r) * A @ B, every
    other array the base's own (widened, were it held in a lower precision). A base stored in
    fewer bits (lora.base_dtype) gives its kernels dequantised: the merged model is what training
    saw, the dequantised base plus the adapters. Works on arrays or inside jit."""
    s = scale(lc)
    base, adapters = _split_rows(base, adapters)
    ad = {path: var for path, var in nnx.to_flat_state(adapters)}
    flat = dict(nnx.to_flat_state(base))
    out = []
    for path, var in flat.items():
        if path[-1] == "kernel_scale":  # folded into its kernel
            continue
        if path[-1] == "kernel" and path[:-1] + ("kernel_scale",) in flat:
            var = var.replace(quant.dequantize((var.get_value(), flat[path[:-1] + ("kernel_scale",)].get_value())))
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in ad:
            a, b = ad[path[:-1] + ("lora_a",)].get_value(), ad[path[:-1] + ("lora_b",)].get_value()
            w = var.get_value()
            delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * s
            var = var.replace(w.astype(jnp.float32) + delta)
        elif var.get_value().dtype != jnp.float32:
            var = var.replace(var.get_value().astype(jnp.float32))
        out.append((path, var))
    return nnx.from_flat_state(out)


def as_trained(base, lc: LoraConfig):
    """A float base as training on it saw it: with lora.base_dtype other than float32, every
    projection kernel quantised and widened back to float32 (what an adapter export writes as its
    base, and a DPO run's reference); base itself for float32."""
    if lc.base_dtype == "float32":
        return base
    return merge(quantize_base(base, lc), nnx.State({}), lc)


def count(adapters) -> int:
    return sum(x.size for x in jax.tree.leaves(adapters))


# PEFT's format


def peft_name(path: tuple, prefix: str = "base_model.model.model") -> str:
    """('blocks', 3, 'attn', 'wq', 'lora_a') -> base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"""
    _, layer, module, proj, which = path
    return f"{prefix}.layers.{layer}.{_HF_MODULE[module]}.{HF_NAMES[proj]}.lora_{which[-1].upper()}.weight"


PEFT_NEW = {NEW_ROWS: "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
            NEW_COLS: "base_model.model.lm_head.token_adapter.trainable_tokens_delta"}


def peft_state_dict(adapters) -> dict:
    """{PEFT tensor name: float32 array in torch's layout}: lora_A.weight (r, in) = A.T,
    lora_B.weight (out, r) = B.T; the new embedding rows as PEFT's trainable tokens (their
    values, (n_new, D); PEFT ties them to the output head as our model does)."""
    out = {}
    for path, var in nnx.to_flat_state(adapters):
        a = np.asarray(var.get_value(), np.float32)
        if path == NEW_ROWS:
            out[PEFT_NEW[path]] = np.ascontiguousarray(a)
        elif path == NEW_COLS:  # torch's head is (V, D): the new tokens' rows
            out[PEFT_NEW[path]] = np.ascontiguousarray(a.T)
        else:
            out[peft_name(path)] = np.ascontiguousarray(a.T)
    return out


def new_token_ids(adapters, vocab_size: int):
    """PEFT's trainable_token_indices: the ids whose embedding rows train with the adapters (the
    last ones of the vocabulary), by module ({embed_tokens, lm_head: ids} with an untied head);
    None without any."""
    flat = dict(nnx.to_flat_state(adapters))
    if NEW_ROWS not in flat:
        return None
    ids = list(range(vocab_size - flat[NEW_ROWS].get_value().shape[0], vocab_size))
    return {"embed_tokens": ids, "lm_head": ids} if NEW_COLS in flat else ids


def adapter_config(lc: LoraConfig, base_model: str = "", new_tokens=None) -> dict:
    """adapter_config.json for PEFT's LoraConfig (a LORA adapter on a causal LM; new_tokens:
    PEFT's trainable_token_indices, new_token_ids)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "trainable_token_indices": new_tokens,
            "r": lc.rank, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout, "bias": "none",
            "target_modules": sorted(HF_NAMES[t] for t in target_names(lc.targets)),
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def save_peft(out_dir: str, adapters, lc: LoraConfig, vocab_size: int, base_model: str = "") -> list[str]:
    """Writes adapter_config.json and adapter_model.safetensors (PEFT's files) into out_dir
    (created; it must not hold an adapter already); returns the file names. vocab_size: the
    model's (the new embedding rows are its last ones)."""
    from safetensors.numpy import save_file
    from .files import write_json
    if os.path.exists(os.path.join(out_dir, "adapter_config.json")):
        raise UserError(f"{out_dir}: already holds an adapter")
    os.makedirs(out_dir, exist_ok=True)
    save_file(peft_state_dict(adapters), os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    write_json(os.path.join(out_dir, "adapter_config.json"),
               adapter_config(lc, base_model, new_token_ids(adapters, vocab_size)), indent=2)
    return ["adapter_config.json", "adapter_model.safetensors"]


def transform(cfg: Config, graphdef, params, n_old: int | None = None) -> Parts:
    """The model of cfg (graphdef, params: its parameters at step 0) split for training. lora.rank 0
    (off): every parameter trains. rank > 0: the adapted model on the frozen base `params`, the fresh
    adapters and the new characters' embedding rows (n_old: the base's vocabulary size) train, and
    evaluation sees the adapters merged into the base."""
    if not enabled(cfg):
        return full(graphdef, params)
    lc = cfg.lora
    adapted, base, adapters = init(cfg.model, lc, cfg.train.seed, params, n_old)
    note = (describe(lc, adapters, model.count_params(base))
            + f"; the base ({cfg.model.init_from}) stays frozen")
    return Parts(adapted, adapters, base, graphdef, combine, functools.partial(merge, lc=lc), (note,))


def describe(lc: LoraConfig, adapters, n_base: int) -> str:
    n_adapter, rows = count(adapters), dict(nnx.to_flat_state(adapters)).get(NEW_ROWS)
    new = f" (with the {rows.get_value().shape[0]} new characters' embedding rows)" if rows is not None else ""
    return (f"LoRA rank {lc.rank}, alpha {lc.alpha:g} on {', '.join(target_names(lc.targets))}{new}: "
            f"{n_adapter / 1e6:.3f}M trainable parameters, {n_adapter / max(n_base, 1):.2%} of the frozen base's "
            f"{n_base / 1e6:.2f}M")

