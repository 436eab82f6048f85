"""The loss, the optimizer and the jitted train and eval steps: pure functions.

The loss is the masked token cross-entropy summed over answer tokens and
divided by max(answer tokens, 1): a batch with no answer token gives 0, not NaN.
Gradient accumulation sums micro-batch gradients and divides by the token count
of the whole batch, so k micro-batches equal one batch k times larger.

Steps always run on a mesh (`parallel.setup`; 1 x 1 on one device): the state
keeps its layout from step to step and each batch is split over the devices.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from . import head, masks, model, ops, parallel
from .batching import Batch, bucket_length, make_batch
from .parts import keep_trainable


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


class AdamW(NamedTuple):
    """optax's clip_by_global_norm + adamw (`init`, `update`: an optax GradientTransformation,
    the reference) and `apply`, the same update fused, which the train step uses:
    (grads, scale, grad_norm, ok, opt_state, params) -> (params, opt_state).

    grads are scaled by `scale` (1 / answer tokens) as they are read, so the mean gradient
    is never stored; grad_norm is the mean gradient's norm; where ok is false (a non-finite
    loss or norm) the parameters and the state come back unchanged. On CPU optax's chain and
    the guard after it cost ~1,000 small memory-bound ops over four parameter-sized trees;
    this is three elementwise passes per parameter (the moments, then the parameter) and no
    copies. The state is optax's own: checkpoints of earlier versions restore unchanged."""
    init: Callable
    update: Callable
    apply: Callable


def make_optimizer(tc, total_steps: int) -> AdamW:
    schedule = make_schedule(tc, total_steps)
    adamw = optax.adamw(schedule, weight_decay=tc.weight_decay)
    chain = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), adamw) if tc.max_grad_norm > 0 else adamw
    return AdamW(chain.init, chain.update, functools.partial(
        _adamw_apply, schedule=schedule, weight_decay=tc.weight_decay, max_norm=tc.max_grad_norm))


def _adamw_apply(grads, scale, grad_norm, ok, opt_state, params, *, schedule, weight_decay, max_norm,
                 b1=0.9, b2=0.999, eps=1e-8):
    """AdamW's update as optax computes it (defaults b1, b2, eps of optax.adamw), fused."""
    is_state = lambda s: isinstance(s, (optax.ScaleByAdamState, optax.ScaleByScheduleState))  # noqa: E731
    adam = next(s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if isinstance(s, optax.ScaleByAdamState))
    lr = schedule(adam.count)  # the schedule's count and Adam's move together
    if max_norm > 0:  # clip_by_global_norm: g * max_norm / |g| where |g| >= max_norm
        scale = scale * jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)
    count = optax.safe_increment(adam.count)
    t = count.astype(jnp.float32)
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t

    # the moments first, materialised (the barrier): fused into the parameters' pass as well, each
    # would read the old moments after their in-place update, and XLA copies every moment to allow it
    mu = jax.tree.map(lambda m, g: jnp.where(ok, b1 * m + (1 - b1) * (g * scale), m), adam.mu, grads)
    nu = jax.tree.map(lambda v, g: jnp.where(ok, b2 * v + (1 - b2) * jnp.square(g * scale), v), adam.nu, grads)
    mu, nu = jax.lax.optimization_barrier((mu, nu))
    # where ok is false the moments came back unchanged and the parameters do too
    params = jax.tree.map(lambda p, m, v: jnp.where(
        ok, p - lr * ((m / bc1) / (jnp.sqrt(v / bc2) + eps) + weight_decay * p), p).astype(p.dtype), params, mu, nu)
    count = jnp.where(ok, count, adam.count)

    def swap(s):
        if isinstance(s, optax.ScaleByAdamState):
            return s._replace(count=count, mu=mu, nu=nu)
        return s._replace(count=count) if isinstance(s, optax.ScaleByScheduleState) else s

    return params, jax.tree.map(swap, opt_state, is_leaf=is_state)


def forward(params, graphdef, batch: Batch, dropout_key=None, head=True):
    """Logits of a batch: (N, L, V) float32, or (A, V) at batch.answer_at; head False: the
    final hidden states instead, (N, L, D) or (A, D).

    Packed rows (segments) see only their own example; rows flagged `shared` also
    see the prefix, which runs once per batch (`model.prefix_cache`)."""
    positions = cache = index = None
    N, L = batch.inputs.shape
    mask = masks.Segments(batch.segments, length=L)  # compact: the model expands it, or attends blockwise
    if batch.segments is not None:
        positions = batch.positions
    if batch.prefix is not None:  # the shared system prompt: computed once, its keys/values seen by flagged tokens
        cache, index = model.prefix_cache(graphdef, params, batch.prefix[:1], N, L, dropout_key)
        mask = masks.Segments(batch.segments, batch.shared, L, index)  # keys: P prefix, then L
        dropout_key = None if dropout_key is None else jax.random.fold_in(dropout_key, 1)
    logits, _ = model.apply(graphdef, params, batch.inputs, positions=positions, mask=mask, cache=cache,
                            index=index, dropout_key=dropout_key, select=batch.answer_at, head=head)
    return logits


def token_nll(params, graphdef, batch: Batch, dropout_key=None):
    """The cross-entropy of each position the loss reads: (A,) float32 at batch.answer_at, else
    (N, L). A large head (head.chunk_for, under head.chunked: train.head_chunk) is computed a
    chunk of positions at a time (head.token_nll), never all its logits at once; else whole."""
    targets = batch.targets if batch.answer_at is None else batch.targets.reshape(-1)[batch.answer_at]
    w, w_transposed = model.head_weight(graphdef, params)
    chunk = head.chunk_for(targets.size, w.shape[0] if w_transposed else w.shape[1])
    if not chunk:
        return optax.softmax_cross_entropy_with_integer_labels(forward(params, graphdef, batch, dropout_key), targets)
    x = forward(params, graphdef, batch, dropout_key, head=False)
    nll = head.token_nll(x.reshape(-1, x.shape[-1]), w, targets.reshape(-1), chunk, w_transposed)
    return nll.reshape(targets.shape)


def token_losses(params, graphdef, batch: Batch):
    """Per-token cross-entropy (N, L) float32 (no dropout), loss mask or not."""
    logits = forward(params, graphdef, batch.replace(answer_at=None))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)


def loss_sums(params, graphdef, batch: Batch, dropout_key=None, dtype=jnp.float32):
    """(summed masked cross-entropy, number of answer tokens) of a batch. dtype bfloat16: the
    model's products multiply bfloat16 operands with float32 accumulation (`ops.products_in`);
    everything else stays float32."""
    with ops.products_in(dtype):
        nll = token_nll(params, graphdef, batch, dropout_key)
    m = batch.loss_mask if batch.answer_at is None else batch.loss_mask.reshape(-1)[batch.answer_at]  # (A,)
    return jnp.sum(nll * m), jnp.sum(m)


def sft_objective(params, graphdef, batch: Batch, dropout_key=None, dtype=jnp.float32):
    """SFT as an objective (make_train_step's `objective`): (summed loss, answer tokens, {}), the
    empty dict holding the further per-step metrics an objective may sum (dpo.loss_sums)."""
    s, n = loss_sums(params, graphdef, batch, dropout_key, dtype)
    return s, n, {}


class TrainStep:
    """(state, batch, key) -> (state, metrics): the jitted step (`jitted`, which takes the frozen
    parameters as a fourth argument, never donated) with the frozen parameters bound.

    A state not on the step's shardings yet (TrainState.create's arrays) is placed there first,
    a copy: the step returns placed arrays, and would otherwise compile a second time for them."""

    def __init__(self, jitted, frozen, state_shardings):
        self.jitted, self.frozen, self.state_shardings = jitted, frozen, state_shardings
        # the step counter's sharding: a state whose counter has it is placed (one comparison a call)
        whole = isinstance(state_shardings, jax.sharding.Sharding)
        self.counter_sharding = state_shardings if whole else state_shardings.step

    def __call__(self, state, batch, key):
        return self.jitted(self.placed(state), batch, key, self.frozen)

    def lower(self, state, batch, key):  # bench/ reads the HLO
        return self.jitted.lower(self.placed(state), batch, key, self.frozen)

    def placed(self, state: "TrainState") -> "TrainState":
        if getattr(state.step, "sharding", None) == self.counter_sharding:
            return state
        shardings = self.state_shardings
        if isinstance(shardings, jax.sharding.Sharding):  # one for every array
            shardings = jax.tree.map(lambda _: shardings, state)
        if jax.process_count() > 1:
            return parallel.shard_tree(state, shardings)
        return jax.device_put(state, shardings, may_alias=False)  # a copy: the step donates it


def make_train_step(graphdef, tx, tc, mesh=None, state_shardings=None, frozen=None,
                    combine=keep_trainable, objective=sft_objective) -> TrainStep:
    """(state, batch, key) -> (state, metrics), jitted on `mesh` with the state donated.

    objective: (params, graphdef, batch, dropout_key, dtype) -> (summed loss, count, {name:
    summed metric}); the step minimises the loss divided by the batch's count (answer tokens,
    or dpo's pairs) and reports loss, count ("tokens") and each metric divided by the count.

    mesh: default one device. state_shardings (parallel.state_shardings): default
    every array whole on every device.

    frozen, combine: a split model (parts.Parts) runs graphdef on combine(frozen, state.params);
    the gradient and the optimizer see state.params alone (lora.py: the adapters; frozen, the
    base on the mesh, is passed to every step and never donated). Default: no frozen arrays, and
    state.params are the model's.

    The dropout key of step s is fold_in(key, s): a run resumed at step s draws
    the same masks as an uninterrupted one. A non-finite loss or gradient norm
    leaves the state unchanged and reports ok=False.
    """
    dtype = jnp.bfloat16 if ops.resolve_dtype(tc.dtype)[0] == "bfloat16" else jnp.float32
    mesh = parallel.one_device_mesh() if mesh is None else mesh
    rows, whole = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    gather = mesh.shape["fsdp"] > 1  # weights are gathered where used, their gradients reduce-scattered back

    def model_params(p, fz):  # the trained p on the frozen fz (LoRA's adapters on the base), or p itself
        p = combine(fz, p)
        return jax.lax.with_sharding_constraint(p, whole) if gather else p

    # the gradient with respect to p alone: the frozen part is a constant, its weight gradients never computed
    def loss(p, fz, *a):
        s, n, extras = objective(model_params(p, fz), *a)
        return s, (n, extras)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    micro_rows = NamedSharding(mesh, PartitionSpec(None, *rows.spec))  # each micro-batch split over all devices
    gradients = _gradients(grad_fn, graphdef, tc.grad_accum_steps, micro_rows, dtype)

    def step(state: TrainState, batch: Batch, key, frozen):
        key = jax.random.fold_in(key, state.step)
        # train.remat: the blocks recomputed in the backward pass; train.head_chunk: the head in chunks
        with model.rematerialised(tc.remat), head.chunked(tc.head_chunk):
            s, n, g, extras = gradients(state.params, frozen, batch, key)
        return _update(tx, state, s, n, g, extras)

    state_shardings = whole if state_shardings is None else state_shardings
    frozen = {} if frozen is None else frozen
    frozen_shardings = jax.tree.map(lambda a: a.sharding, frozen)
    jitted = jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, rows, whole, frozen_shardings),
                     out_shardings=(state_shardings, whole))
    return TrainStep(jitted, frozen, state_shardings)


def _gradients(grad_fn, graphdef, k: int, micro_rows, dtype) -> Callable:
    """(params, frozen, batch, key) -> (summed loss, count, summed gradient, summed metrics) over the
    batch's k micro-batches (scanned; k = 1: the batch at once)."""
    def gradients(params, frozen, batch, key):
        if k == 1:
            (s, (n, extras)), g = grad_fn(params, frozen, graphdef, batch, key, dtype)
            return s, n, g, extras
        micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)
        micro = jax.lax.with_sharding_constraint(micro, micro_rows)

        def accumulate(carry, xs):
            i, mb = xs
            (s, (n, extras)), g = grad_fn(params, frozen, graphdef, mb, jax.random.fold_in(key, i), dtype)
            return jax.tree.map(jnp.add, carry, (s, n, g, extras)), None

        first = jax.tree.map(lambda x: x[0], micro)
        (_, (_, extras)), _ = jax.eval_shape(lambda p, fz, mb, k_: grad_fn(p, fz, graphdef, mb, k_, dtype),
                                             params, frozen, first, key)
        zeros = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, params),
                 jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), extras))
        (s, n, g, extras), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
        return s, n, g, extras
    return gradients


def _update(tx, state: TrainState, s, n, g, extras):
    """(the state after one optimizer update with the mean gradient g / max(n, 1), the step's
    metrics, extras / max(n, 1) among them); a non-finite loss or gradient norm leaves the state
    as it was (ok False)."""
    denom = jnp.maximum(n, 1.0)
    loss = s / denom
    gnorm = optax.tree.norm(g) / denom  # of the mean gradient g / denom
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    if isinstance(tx, AdamW):  # one fused pass per parameter, the guard inside it
        params, opt_state = tx.apply(g, 1 / denom, gnorm, ok, state.opt_state, state.params)
    else:  # any optax transformation
        updates, opt_state = tx.update(jax.tree.map(lambda x: x / denom, g), state.opt_state, state.params)
        params, opt_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b),
                                         (optax.apply_updates(state.params, updates), opt_state),
                                         (state.params, state.opt_state))
    new = TrainState(jnp.where(ok, state.step + 1, state.step), params, opt_state)
    return new, {"loss": loss, "tokens": n, "grad_norm": gnorm, "ok": ok,
                 **{k: v / denom for k, v in extras.items()}}


def make_eval_step(graphdef, mesh=None, loss=loss_sums, head_chunk: int = 0) -> Callable:
    """(params, host batch) -> loss(params, graphdef, batch): (summed loss, answer tokens) for SFT,
    no dropout; the batch's rows are split over the mesh's devices (default one); head_chunk:
    train.head_chunk (head.chunked)."""
    def evaluate(params, batch):
        with head.chunked(head_chunk):
            return loss(params, graphdef, batch)
    step = jax.jit(evaluate)
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
