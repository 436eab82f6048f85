"""Optimizer, jitted train / eval steps, and the training loop.

The loss is the masked token cross-entropy summed over answer tokens and
divided by max(answer tokens, 1): a batch with no answer token gives 0, not NaN.
Gradient accumulation sums micro-batch gradients and divides by the token count
of the whole batch, so k micro-batches equal one batch k times larger.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from . import chatml, checkpoint, model
from .config import Config, UserError
from .data import Row, read_jsonl, row_texts
from .tokenizer import Tokenizer


class TrainingDiverged(Exception):
    """A non-finite loss or gradient norm: the run stops, keeping the last good checkpoints."""


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: object
    opt_state: object


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


def loss_sums(params, graphdef, batch: dict, dropout_key=None, dtype=jnp.float32):
    """Summed masked cross-entropy and the number of answer tokens.

    batch: inputs, targets (B, L) int32, loss_mask (B, L) float32.
    """
    if dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    logits, _ = model.apply(graphdef, params, batch["inputs"], dropout_key=dropout_key)  # (B, L, V) f32
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # (B, L)
    m = batch["loss_mask"]
    return jnp.sum(nll * m), jnp.sum(m)


def make_train_step(graphdef, tx, tc) -> Callable:
    """(state, batch, key) -> (state, metrics), jitted with the state donated.

    The dropout key of step s is fold_in(key, s): a run resumed at step s draws
    the same masks as an uninterrupted one. A non-finite loss or gradient norm
    leaves the state unchanged and reports ok=False.
    """
    dtype = jnp.bfloat16 if tc.dtype == "bfloat16" else jnp.float32
    k = tc.grad_accum_steps
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def step(state: TrainState, batch: dict, key):
        key = jax.random.fold_in(key, state.step)
        micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

        def accumulate(carry, xs):
            i, mb = xs
            (s, n), g = grad_fn(state.params, graphdef, mb, jax.random.fold_in(key, i), dtype)
            return jax.tree.map(jnp.add, carry, (s, n, g)), None

        zeros = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, state.params))
        if k == 1:
            (s, n), g = grad_fn(state.params, graphdef, batch, key, dtype)
        else:
            (s, n, g), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
        denom = jnp.maximum(n, 1.0)
        loss = s / denom
        grads = jax.tree.map(lambda x: x / denom, g)
        gnorm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        new = TrainState(state.step + 1, params, opt_state)
        new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        return new, {"loss": loss, "tokens": n, "grad_norm": gnorm, "ok": ok}

    return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef) -> Callable:
    """(params, batch) -> (summed loss, answer tokens), no dropout."""
    return jax.jit(lambda params, batch: loss_sums(params, graphdef, batch))


def evaluate(eval_step, params, examples, batch_size: int, buckets, max_seq_len: int) -> float:
    """Token-weighted validation loss over all examples (0.0 for no answer tokens)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # few buckets, little padding
    total, count = 0.0, 0.0
    for start in range(0, len(order), batch_size):
        chosen = [examples[i] for i in order[start:start + batch_size]]
        length = chatml.bucket_length(max(len(x) for x, _, _ in chosen), buckets, max_seq_len)
        s, n = eval_step(params, chatml.make_batch(chosen, batch_size, length))
        total += float(s)
        count += float(n)
    return total / max(count, 1.0)


def load_rows(cfg: Config) -> tuple[list[Row], list[Row]]:
    return read_jsonl(cfg.data.train), read_jsonl(cfg.data.val)


def prepare(cfg: Config, log=print):
    """Reads and validates everything a run needs before anything is written.

    Returns (model_cfg, tokenizer, train_examples, val_rows, val_examples, init_params).
    """
    train_rows, val_rows = load_rows(cfg)
    init_params = None
    if cfg.model.init_from:
        base_params, base_cfg, base_tok = checkpoint.restore(cfg.model.init_from)
        for f in ("d_model", "n_heads", "n_layers", "d_ff"):
            if getattr(base_cfg, f) != getattr(cfg.model, f):
                raise UserError(f"model.init_from: {cfg.model.init_from} has {f}={getattr(base_cfg, f)}, "
                                f"this config has {getattr(cfg.model, f)}")
        tok = base_tok.extend(row_texts(train_rows) + [cfg.data.system_prompt])
        init_params = (base_params, len(base_tok))
    else:
        tok = Tokenizer.build(row_texts(train_rows) + [cfg.data.system_prompt, "\n"])
    model_cfg = dataclasses.replace(cfg.model, vocab_size=len(tok))
    L = model_cfg.max_seq_len
    train_ex, dropped = chatml.encode_rows(train_rows, tok, cfg.data.system_prompt, L)
    val_ex, vdropped = chatml.encode_rows(val_rows, tok, cfg.data.system_prompt, L)
    if dropped or vdropped:
        log(f"warning: dropped {dropped} training and {vdropped} validation rows whose answer does not fit "
            f"max_seq_len={L}", file=sys.stderr)
    if not train_ex:
        raise UserError(f"{cfg.data.train}: no row fits max_seq_len={L} with any of its answer")
    if not val_ex:
        raise UserError(f"{cfg.data.val}: no row fits max_seq_len={L} with any of its answer")
    unk = sum(len(tok.unknown(t)) for t in row_texts(val_rows))
    if unk:
        log(f"note: {unk} validation characters are not in the training vocabulary (they become <unk>)",
            file=sys.stderr)
    return model_cfg, tok, train_ex, val_rows, val_ex, init_params


def init_params_from(model_cfg, seed: int, init_params):
    """Fresh parameters, or a pretrained model's with its embedding grown to the new vocabulary."""
    graphdef, params = model.init(model_cfg, seed)
    if init_params is not None:
        base, n_old = init_params
        emb = params["embed"]["embedding"]
        new_rows = emb[...][n_old:]
        base["embed"]["embedding"][...] = jnp.concatenate([base["embed"]["embedding"][...], new_rows], axis=0)
        params = base
    return graphdef, params


class MetricsLog:
    """metrics.jsonl: one JSON object per training step or evaluation."""

    def __init__(self, path: str, keep_until: Optional[int] = None):
        self.path = path
        if keep_until is not None and os.path.exists(path):  # resume: forget steps after the checkpoint
            with open(path, encoding="utf-8") as f:
                kept = [l for l in f if l.strip() and json.loads(l)["step"] <= keep_until]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        elif keep_until is None:
            open(path, "w").close()

    def write(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def _info(*args, file=None):
    from tqdm import tqdm
    tqdm.write(" ".join(str(a) for a in args), file=file or sys.stdout)


def train(cfg: Config, resume: bool = False, log=_info, progress: bool = True) -> dict:
    """Runs SFT as configured. Returns a summary dict (steps, best_val_loss, ...)."""
    from tqdm import tqdm
    from .decode import Generator

    tc = cfg.train
    model_cfg, tok, train_ex, val_rows, val_ex, init_params = prepare(cfg, log)
    run_dir = cfg.out_dir
    has_run = os.path.isdir(os.path.join(run_dir, "latest")) or os.path.isdir(os.path.join(run_dir, "best"))
    if resume and not has_run:
        raise UserError(f"{run_dir}: nothing to resume (no checkpoint there)")
    if not resume and has_run:
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another out_dir")
    if resume:
        old_cfg, old_tok = checkpoint.read_meta(run_dir)
        if old_cfg["model"] != checkpoint.to_dict(model_cfg) or old_tok.itos != tok.itos:
            raise UserError(f"{run_dir}: was trained with another model config or vocabulary; cannot resume")

    per_epoch = math.ceil(len(train_ex) / tc.batch_size)
    total = per_epoch * tc.epochs if tc.max_steps is None else min(per_epoch * tc.epochs, tc.max_steps)
    graphdef, params = init_params_from(model_cfg, tc.seed, init_params)
    tx = make_optimizer(tc, total)
    state = TrainState(jnp.int32(0), params, tx.init(params))
    best_val = float("inf")
    ckpt = checkpoint.RunCheckpoints(run_dir)
    if resume:
        restored = ckpt.restore_latest({"state": state, "best_val_loss": jnp.float32(0)})
        state, best_val = restored["state"], float(restored["best_val_loss"])
        log(f"resumed {run_dir} at step {int(state.step)} (best validation loss {best_val:.4f})")
    else:
        checkpoint.write_meta(run_dir, dataclasses.replace(cfg, model=model_cfg), tok)
    start = int(state.step)
    metrics_log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), keep_until=start if resume else None)

    n_params = model.count_params(state.params)
    log(f"model: {n_params / 1e6:.2f}M parameters, vocab {len(tok)} | train {len(train_ex)} rows, "
        f"val {len(val_ex)} | {total} steps ({per_epoch}/epoch), batch {tc.batch_size}")

    train_step = make_train_step(graphdef, tx, tc)
    eval_step = make_eval_step(graphdef)
    schedule = make_schedule(tc, total)
    key = jax.random.PRNGKey(tc.seed)
    samples = [r.prompt_messages for r in val_rows[: tc.sample_questions]]
    gen = Generator(None, model_cfg, tok, cfg.data.system_prompt, max_new_tokens=64) if samples else None

    def batch_at(step):
        return chatml.batch_for_step(train_ex, step, tc.batch_size, tc.seed, tc.buckets, model_cfg.max_seq_len)

    def save_latest(step):
        if ckpt.latest.latest_step() == step:
            return
        ckpt.save_latest(step, {"state": state, "best_val_loss": jnp.float32(best_val)})

    def run_eval(step):
        nonlocal best_val
        val_loss = evaluate(eval_step, state.params, val_ex, tc.batch_size, tc.buckets, model_cfg.max_seq_len)
        improved = val_loss < best_val
        if improved:
            best_val = val_loss
            ckpt.save_best(step, state.params, val_loss)
        metrics_log.write([{"step": step, "val_loss": val_loss, "best": improved}])
        log(f"step {step}: val_loss {val_loss:.4f}" + (" (best, saved)" if improved else f" (best {best_val:.4f})"))
        if gen is not None:
            gen.params = state.params
            for q, a in zip(samples, gen.answer(samples)):
                log(f"  {q[-1][1]} -> {a}")
        save_latest(step)
        try:
            from .plots import write_curves
            write_curves(run_dir)
        except ImportError:
            pass

    pending, t_last, tokens_since = [], time.time(), 0.0
    bar = tqdm(total=total, initial=start, disable=not progress, dynamic_ncols=True, unit="step")

    def flush():
        nonlocal pending, t_last, tokens_since
        if not pending:
            return
        records = []
        for s, m in jax.device_get(pending):
            if not m["ok"]:
                raise TrainingDiverged(f"non-finite loss or gradient norm at step {s}; stopped, the last good "
                                       f"checkpoints in {run_dir} are kept")
            records.append({"step": s, "loss": float(m["loss"]), "lr": float(schedule(s - 1)),
                            "grad_norm": float(m["grad_norm"]), "tokens": int(m["tokens"])})
        tokens_since += sum(r["tokens"] for r in records)
        now = time.time()
        bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", lr=f"{records[-1]['lr']:.2e}",
                        tok_s=f"{tokens_since / max(now - t_last, 1e-9):.0f}")
        t_last, tokens_since = now, 0.0
        metrics_log.write(records)
        pending = []

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        nxt = pool.submit(batch_at, start) if start < total else None
        for step in range(start, total):
            batch = nxt.result()
            if step + 1 < total:
                nxt = pool.submit(batch_at, step + 1)  # prepared while this step runs
            state, metrics = train_step(state, batch, key)
            pending.append((step + 1, metrics))
            bar.update(1)
            done = step + 1
            if len(pending) >= 10:
                flush()
            end_of_epoch = done % per_epoch == 0 or done == total
            if (tc.eval_every and done % tc.eval_every == 0) or end_of_epoch:
                flush()
                run_eval(done)
            elif tc.save_every and done % tc.save_every == 0:
                flush()
                save_latest(done)
        flush()
    except KeyboardInterrupt:
        bar.close()
        flush()
        step = int(state.step)
        save_latest(step)
        ckpt.wait()
        ckpt.close()
        log(f"interrupted at step {step}; state saved. Resume with: bin/train --config ... --resume "
            f"(same config, out_dir {run_dir})", file=sys.stderr)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    ckpt.wait()
    ckpt.close()
    return {"steps": total, "best_val_loss": best_val, "params": n_params, "run_dir": run_dir}
