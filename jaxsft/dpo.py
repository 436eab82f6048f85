"""Direct preference optimisation: the loss of a `PairBatch` and the reference's log-probabilities.

For pair k with chosen answer c and rejected answer r, the policy's and the reference's
log-probabilities of each whole answer (summed over its loss tokens) give

    h_k = (log p(c) - log p_ref(c)) - (log p(r) - log p_ref(r))
    sigmoid:  loss_k = -(1 - eps) log sigmoid(beta h_k) - eps log sigmoid(-beta h_k)   (eps: label_smoothing)
    ipo:      loss_k = (h_k - 1 / (2 beta))^2, the log-probabilities averaged per answer token

plus, with sft_weight > 0, sft_weight x (-log p(c) / |c|), the chosen answer's per-token
negative log-likelihood (RPO), and the implicit rewards beta (log p(c) - log p_ref(c)) and beta (log p(r) - log p_ref(r)); a
pair is ranked right when the chosen reward is the larger. As TRL's DPOTrainer computes them.

The reference is the run's starting model (model.init_from; with LoRA the base with the
adapters off), whose log-probabilities are computed once, before the first step, for every
training and validation pair (`reference_logps`) and kept in the run directory: each step
runs one model, and no second copy of the parameters is held. No dropout: the policy is
compared with a reference that has none (TRL's default too).
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import head, ops
from .batching import BatchPlan, PairBatch
from .config import DpoConfig, UserError
from .files import atomic
from .steps import token_nll

REFERENCE_FILE = "reference.npz"
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
           "logps/chosen", "logps/rejected")


def answer_logps(params, graphdef, batch: PairBatch, pairs: int, dtype=jnp.float32):
    """Per pair (K = `pairs`): the model's log-probability sums of the chosen and of the rejected
    answer, the reference's, and each answer's loss-token count: six (K,) float32 arrays."""
    with ops.products_in(dtype):  # (N, L), or (A,) at answer_at; in chunks as steps.token_nll chooses
        logp = -token_nll(params, graphdef, batch)
    sign, pair, ref = batch.sign, batch.pair, batch.reference
    if batch.answer_at is not None:
        sign, pair, ref = (a.reshape(-1)[batch.answer_at] for a in (sign, pair, ref))
    chosen, rejected = (sign > 0).astype(jnp.float32), (sign < 0).astype(jnp.float32)

    def per_pair(values, which):
        return jax.ops.segment_sum((values * which).reshape(-1), pair.reshape(-1), pairs)

    return (per_pair(logp, chosen), per_pair(logp, rejected), per_pair(ref, chosen), per_pair(ref, rejected),
            per_pair(1.0, chosen), per_pair(1.0, rejected))


def loss_sums(params, graphdef, batch: PairBatch, dropout_key=None, dtype=jnp.float32, *, dc: DpoConfig,
              pairs: int):
    """(summed loss over the batch's pairs, number of pairs, {metric: summed over the pairs}):
    the objective's contract (steps.make_train_step); pairs without answers (a short last
    batch) count for nothing. dropout_key is ignored (no dropout: see the module's note)."""
    pc, pr, rc, rr, nc, nr = answer_logps(params, graphdef, batch, pairs, dtype)
    real = ((nc > 0) & (nr > 0)).astype(jnp.float32)
    nll = -pc / jnp.maximum(nc, 1)  # the chosen answer's, per token
    if dc.loss == "ipo":  # per-token means (nc, nr >= 1 where real)
        mc, mr = jnp.maximum(nc, 1), jnp.maximum(nr, 1)
        pc, pr, rc, rr = pc / mc, pr / mr, rc / mc, rr / mr
    chosen, rejected = pc - rc, pr - rr
    h = chosen - rejected
    if dc.loss == "ipo":
        loss = (h - 1 / (2 * dc.beta)) ** 2
    else:
        eps = dc.label_smoothing
        loss = -(1 - eps) * jax.nn.log_sigmoid(dc.beta * h) - eps * jax.nn.log_sigmoid(-dc.beta * h)
    if dc.sft_weight:
        loss = loss + dc.sft_weight * nll
    rw_c, rw_r = dc.beta * chosen, dc.beta * rejected
    values = (rw_c, rw_r, (rw_c > rw_r).astype(jnp.float32), rw_c - rw_r, pc, pr)
    extras = {name: jnp.sum(real * v) for name, v in zip(METRICS, values)}
    return jnp.sum(real * loss), jnp.sum(real), extras


def objective(dc: DpoConfig, pairs: int) -> Callable:
    """The DPO loss for batches of `pairs` pairs, as steps.make_train_step takes it."""
    return functools.partial(loss_sums, dc=dc, pairs=pairs)


def ordered_batches(plan: BatchPlan, pairs: int):
    """(indices, batch) over every pair of `plan` (pack_len 0: padded to length buckets), `pairs`
    at a time, in order of length so each batch pads little (a few shapes, each compiled once)."""
    plan = BatchPlan(plan.examples, pairs, plan.seed, plan.buckets, plan.max_seq_len, pairs=True,
                     reference=plan.reference)
    lengths = [max(len(c[0]), len(r[0])) for c, r in plan.examples]
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), pairs):
        indices = order[start:start + pairs]
        yield indices, plan.batch_of(indices)


def make_logps_step(graphdef, pairs: int, place=lambda b: b, dtype=jnp.float32, head_chunk: int = 0) -> Callable:
    """(params, host PairBatch) -> (K, 2) float32: each pair's chosen and rejected log-prob sums,
    the products in `dtype` and the head in chunks of `head_chunk` (head.chunked) as the trainer's
    step has them: the reference then scores as the policy's first step does, and a large
    vocabulary's logits are never whole."""
    def logps(p, b):
        with head.chunked(head_chunk):
            return jnp.stack(answer_logps(p, graphdef, b, pairs, dtype)[:2], axis=1)
    step = jax.jit(logps)
    return lambda params, batch: step(params, place(batch))


def reference_logps(logps_step, params, plan: BatchPlan, pairs: int, progress=None) -> np.ndarray:
    """(len(plan.examples), 2) float32: the log-prob sums of every pair's chosen and rejected
    answer under `params` (the reference), `pairs` pairs per call."""
    out = np.zeros((len(plan.examples), 2), np.float32)
    for indices, batch in ordered_batches(plan, pairs):
        out[indices] = np.asarray(logps_step(params, batch))[: len(indices)]
        if progress is not None:
            progress(len(indices))
    return out


def save_reference(run_dir: str, train: np.ndarray, val: np.ndarray) -> None:
    """The reference's log-probs, written whole or not at all (files.atomic)."""
    with atomic(os.path.join(run_dir, REFERENCE_FILE), "wb") as f:
        np.savez(f, train=train, val=val)


def load_reference(run_dir: str, n_train: int, n_val: int):
    """(train, val) as save_reference wrote them, or None when the run has none; UserError when
    they do not match the pairs this config reads (the data changed since the run began)."""
    path = os.path.join(run_dir, REFERENCE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as f:
            train, val = f["train"], f["val"]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); delete it to compute the reference again") from None
    if train.shape != (n_train, 2) or val.shape != (n_val, 2):
        raise UserError(f"{path}: holds {len(train)} training and {len(val)} validation pairs, the data now "
                        f"{n_train} and {n_val}; the data changed since this run began")
    return train, val


def validation(eval_step, params, plan: BatchPlan, pairs: int) -> dict:
    """The mean loss and metrics over every pair of `plan` (its reference attached):
    {"val_loss": ..., "val_rewards/accuracy": ..., ...}."""
    total, count, sums = 0.0, 0.0, dict.fromkeys(METRICS, 0.0)
    for _, batch in ordered_batches(plan, pairs):
        s, n, extras = jax.device_get(eval_step(params, batch))
        total, count = total + float(s), count + float(n)
        for k in METRICS:
            sums[k] += float(extras[k])
    n = max(count, 1.0)
    return {"val_loss": total / n, **{f"val_{k}": v / n for k, v in sums.items()}}
