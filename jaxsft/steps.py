"""The loss, the optimizer and the jitted train and eval steps: pure functions.

The loss is the masked token cross-entropy summed over answer tokens and
divided by max(answer tokens, 1): a batch with no answer token gives 0, not NaN.
Gradient accumulation sums micro-batch gradients and divides by the token count
of the whole batch, so k micro-batches equal one batch k times larger.

Steps always run on a mesh (`parallel.setup`; 1 x 1 on one device): the state
keeps its layout from step to step and each batch is split over the devices.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from . import lora, masks, model, parallel
from .batching import Batch, bucket_length, make_batch


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: object
    opt_state: object

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
        """Step 0: the parameters and a fresh optimizer state for them."""
        return cls(jnp.int32(0), params, tx.init(params))


def make_schedule(tc, total_steps: int):
    """Linear warmup from 0 to lr over warmup_steps, then cosine to 0 at total_steps:
    lr(s) = lr * s / w for s < w, else lr * 0.5 * (1 + cos(pi * (s - w) / (total - w)))."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(total_steps, tc.warmup_steps + 1), end_value=0.0)


def make_optimizer(tc, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(make_schedule(tc, total_steps), weight_decay=tc.weight_decay)
    if tc.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), adamw)
    return adamw


def forward(params, graphdef, batch: Batch, dropout_key=None):
    """Logits of a batch: (N, L, V) float32, or (A, V) at batch.answer_at.

    Packed rows (segments) see only their own example; rows flagged `shared` also
    see the prefix, which runs once per batch (`model.prefix_cache`)."""
    positions = mask = cache = index = None
    N, L = batch.inputs.shape
    if batch.segments is not None:
        mask, positions = masks.segment_causal(batch.segments), batch.positions  # (N, L, L)
    if batch.prefix is not None:  # the shared system prompt: computed once, its keys/values seen by flagged tokens
        cache, index = model.prefix_cache(graphdef, params, batch.prefix[:1], N, L, dropout_key)
        mask = masks.with_prefix(mask, batch.shared, index)  # (N, L, P + L)
        dropout_key = None if dropout_key is None else jax.random.fold_in(dropout_key, 1)
    logits, _ = model.apply(graphdef, params, batch.inputs, positions=positions, mask=mask, cache=cache,
                            index=index, dropout_key=dropout_key, select=batch.answer_at)
    return logits


def token_losses(params, graphdef, batch: Batch):
    """Per-token cross-entropy (N, L) float32 (no dropout), loss mask or not."""
    logits = forward(params, graphdef, batch.replace(answer_at=None))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)


def loss_sums(params, graphdef, batch: Batch, dropout_key=None, dtype=jnp.float32):
    """(summed masked cross-entropy, number of answer tokens) of a batch."""
    if dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    logits = forward(params, graphdef, batch, dropout_key)
    targets, m = batch.targets, batch.loss_mask
    if batch.answer_at is not None:
        targets, m = targets.reshape(-1)[batch.answer_at], m.reshape(-1)[batch.answer_at]  # (A,)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * m), jnp.sum(m)


def make_train_step(graphdef, tx, tc, mesh=None, state_shardings=None, frozen=None) -> Callable:
    """(state, batch, key) -> (state, metrics), jitted on `mesh` with the state donated.

    mesh: default one device. state_shardings (parallel.state_shardings): default
    every array whole on every device.

    frozen: LoRA's base parameters (on the mesh), passed to every step and never donated;
    state.params are then the adapters (lora.py), the model runs on both, and the
    gradient and the optimizer see the adapters alone.

    The dropout key of step s is fold_in(key, s): a run resumed at step s draws
    the same masks as an uninterrupted one. A non-finite loss or gradient norm
    leaves the state unchanged and reports ok=False.
    """
    dtype = jnp.bfloat16 if tc.dtype == "bfloat16" else jnp.float32
    k = tc.grad_accum_steps
    mesh = parallel.one_device_mesh() if mesh is None else mesh
    rows, whole = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    gather = mesh.shape["fsdp"] > 1  # weights are gathered where used, their gradients reduce-scattered back

    def model_params(p, fz):  # the adapters p on the frozen base fz (LoRA), or p itself
        if fz is not None:
            p = lora.combine(fz, p)
        return jax.lax.with_sharding_constraint(p, whole) if gather else p

    # the gradient with respect to p alone: the base is a constant, its weight gradients never computed
    grad_fn = jax.value_and_grad(lambda p, fz, *a: loss_sums(model_params(p, fz), *a), has_aux=True)
    micro_rows = NamedSharding(mesh, PartitionSpec(None, *rows.spec))  # each micro-batch split over all devices

    def step(state: TrainState, batch: Batch, key, frozen=None):
        key = jax.random.fold_in(key, state.step)
        if k == 1:
            (s, n), g = grad_fn(state.params, frozen, graphdef, batch, key, dtype)
        else:
            micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)
            micro = jax.lax.with_sharding_constraint(micro, micro_rows)

            def accumulate(carry, xs):
                i, mb = xs
                (s, n), g = grad_fn(state.params, frozen, graphdef, mb, jax.random.fold_in(key, i), dtype)
                return jax.tree.map(jnp.add, carry, (s, n, g)), None

            zeros = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, state.params))
            (s, n, g), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
        denom = jnp.maximum(n, 1.0)
        loss = s / denom
        grads = jax.tree.map(lambda x: x / denom, g)
        gnorm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        new = TrainState(state.step + 1, params, opt_state)
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        return new, {"loss": loss, "tokens": n, "grad_norm": gnorm, "ok": ok}

    state_shardings = whole if state_shardings is None else state_shardings
    if frozen is None:
        return jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, rows, whole),
                       out_shardings=(state_shardings, whole))
    frozen_shardings = jax.tree.map(lambda a: a.sharding, frozen)
    jitted = jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, rows, whole, frozen_shardings),
                     out_shardings=(state_shardings, whole))
    return lambda state, batch, key: jitted(state, batch, key, frozen)


def make_eval_step(graphdef, mesh=None) -> Callable:
    """(params, host batch) -> (summed loss, answer tokens), no dropout; the batch's
    rows are split over the mesh's devices (default one)."""
    step = jax.jit(lambda params, batch: loss_sums(params, graphdef, batch))
    rows = parallel.batch_sharding(parallel.one_device_mesh() if mesh is None else mesh)
    return lambda params, batch: step(params, parallel.host_batch_to_global(batch, rows))


def validation_loss(eval_step, params, examples: Sequence, batch_size: int, buckets, max_seq_len: int) -> float:
    """Token-weighted loss over all examples (0.0 for no answer tokens)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # few buckets, little padding
    total, count = 0.0, 0.0
    for start in range(0, len(order), batch_size):
        chosen = [examples[i] for i in order[start:start + batch_size]]
        length = bucket_length(max(len(x) for x, _, _ in chosen), buckets, max_seq_len)
        s, n = eval_step(params, make_batch(chosen, batch_size, length))
        total += float(s)
        count += float(n)
    return total / max(count, 1.0)
