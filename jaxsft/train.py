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
import signal
import sys
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from . import chatml, checkpoint, model, parallel
from .config import Config, UserError
from .data import Row, corpus_examples, read_corpus, read_jsonl, row_texts, split_corpus
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

    batch: inputs, targets (B, L) int32, loss_mask (B, L) float32; a packed batch
    (chatml.pack_batch) also has positions and segments (B, L) int32, and each
    token then attends only to earlier tokens of its own segment, and may have
    answer_at (N,) int32: flat positions that hold every loss_mask > 0 (padded
    with positions of mask 0); the output head then runs at those positions only.
    """
    if dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    positions = mask = cache = index = None
    if "segments" in batch:
        seg, L = batch["segments"], batch["segments"].shape[1]
        mask = (seg[:, :, None] == seg[:, None, :]) & jnp.tril(jnp.ones((L, L), bool))  # (B, L, L)
        positions = batch["positions"]
    if "prefix" in batch:  # the shared system prompt: computed once, its keys/values seen by flagged tokens
        cache, index = model.prefix_cache(graphdef, params, batch["prefix"][:1], mask.shape[0], L, dropout_key)
        mask = jnp.concatenate([jnp.broadcast_to(batch["shared"][:, :, None] > 0, (mask.shape[0], L, index)),
                                mask], axis=-1)  # (B, L, P + L)
        dropout_key = None if dropout_key is None else jax.random.fold_in(dropout_key, 1)
    select = batch.get("answer_at")
    logits, _ = model.apply(graphdef, params, batch["inputs"], positions=positions, mask=mask,
                            cache=cache, index=index, dropout_key=dropout_key,
                            select=select)  # (B, L, V) f32, or (N, V) with answer_at
    targets, m = batch["targets"], batch["loss_mask"]
    if select is not None:
        targets, m = targets.reshape(-1)[select], m.reshape(-1)[select]  # (N,)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * m), jnp.sum(m)


def make_train_step(graphdef, tx, tc, shardings=None) -> Callable:
    """(state, batch, key) -> (state, metrics), jitted with the state donated.

    The dropout key of step s is fold_in(key, s): a run resumed at step s draws
    the same masks as an uninterrupted one. A non-finite loss or gradient norm
    leaves the state unchanged and reports ok=False.
    shardings: None (one device), or (state shardings, batch sharding) on a mesh
    (see parallel.py): the state keeps its layout from step to step.
    """
    dtype = jnp.bfloat16 if tc.dtype == "bfloat16" else jnp.float32
    k = tc.grad_accum_steps
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
    if shardings is not None:  # fsdp: weights are gathered where used, their gradients reduce-scattered back
        whole = jax.sharding.NamedSharding(shardings[1].mesh, jax.sharding.PartitionSpec())
        grad_fn = jax.value_and_grad(
            lambda p, *a: loss_sums(jax.lax.with_sharding_constraint(p, whole), *a), has_aux=True)

    def step(state: TrainState, batch: dict, key):
        key = jax.random.fold_in(key, state.step)
        if k == 1:
            (s, n), g = grad_fn(state.params, graphdef, batch, key, dtype)
        else:
            micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)
            if shardings is not None:  # each micro-batch split over all devices
                micro = jax.lax.with_sharding_constraint(micro, micro_sharding)

            def accumulate(carry, xs):
                i, mb = xs
                (s, n), g = grad_fn(state.params, graphdef, mb, jax.random.fold_in(key, i), dtype)
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

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    state_sh, batch_sh = shardings
    micro_sharding = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec(None, *batch_sh.spec))
    rep = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, donate_argnums=0, in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep))


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


def packing(tc, tok: Tokenizer, system_prompt, examples, max_seq_len: int, multiple: int = 1):
    """(prefix, min_rows, answer_slots) of a run's packed batches (chatml.batch_for_step):
    the shared system prompt (train.share_prefix), the typical row count and the room
    for tokens with loss (0: the output head everywhere, as with gradient accumulation
    or several devices, whose batches are split); (None, 0, 0) unpacked."""
    if not tc.pack_len:
        return None, 0, 0
    prefix = chatml.system_prefix(tok, system_prompt) if tc.share_prefix else None
    slots = chatml.answer_slots(examples, tc.batch_size, tc.seed) if multiple == 1 else 0
    return prefix, chatml.typical_rows(examples, tc.batch_size, tc.seed, tc.buckets, max_seq_len,
                                       tc.pack_len, multiple, prefix), slots


def focus_examples(cfg: Config, tok: Tokenizer, max_seq_len: int) -> list:
    """The training examples of train.focus_categories (the curriculum's first steps)."""
    rows = read_jsonl(cfg.data.train)
    for name in cfg.train.focus_categories:
        if not any(r.category == name for r in rows):
            raise UserError(f"train.focus_categories: {cfg.data.train} has no row of category {name!r}")
    rows = [r for r in rows if r.category in cfg.train.focus_categories]
    examples, _ = chatml.encode_rows(rows, tok, cfg.data.system_prompt, max_seq_len)
    if not examples:
        raise UserError(f"train.focus_categories: no row of {list(cfg.train.focus_categories)} in "
                        f"{cfg.data.train} fits max_seq_len={max_seq_len}")
    return examples


def load_rows(cfg: Config) -> tuple[list[Row], list[Row]]:
    return read_jsonl(cfg.data.train), read_jsonl(cfg.data.val)


def tokenizer_for(cfg: Config, texts: list[str]) -> Tokenizer:
    """The vocabulary of a run trained on `texts` (reads no weights).

    From scratch: every character of `texts`, the system prompt and "\n". With
    model.init_from: the base run's tokenizer with the new characters appended in sorted
    order (old ids keep their meaning; the same texts always give the same vocabulary, so
    a resumed run rebuilds it identically); the base's model shape must match this config's.
    """
    if not cfg.model.init_from:
        return Tokenizer.build(list(texts) + [cfg.data.system_prompt, "\n"])
    base_cfg, base_tok = checkpoint.read_meta(cfg.model.init_from)
    for f in ("d_model", "n_heads", "n_layers", "d_ff"):
        if base_cfg["model"].get(f) != getattr(cfg.model, f):
            raise UserError(f"model.init_from: {cfg.model.init_from} has {f}={base_cfg['model'].get(f)}, "
                            f"this config has {getattr(cfg.model, f)}")
    return base_tok.extend(list(texts) + [cfg.data.system_prompt])


def vocabulary(cfg: Config, texts: list[str]):
    """(tokenizer_for(cfg, texts), init_params): None from scratch; with model.init_from,
    (the base's best parameters, its vocabulary size) for init_params_from."""
    tok = tokenizer_for(cfg, texts)  # checks the base's shape before any array is read
    if not cfg.model.init_from:
        return tok, None
    base_params, _, base_tok = checkpoint.restore(cfg.model.init_from)
    return tok, (base_params, len(base_tok))


def prepare_corpus(cfg: Config):
    """prepare() for pretraining (data.corpus set): the vocabulary of the whole corpus,
    next-token examples of its training and held-out paragraphs (data.split_corpus,
    data.corpus_examples), and no validation rows (no sample answers are printed)."""
    paragraphs = read_corpus(cfg.data.corpus)
    tok, init_params = vocabulary(cfg, paragraphs)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=len(tok))
    train_par, val_par = split_corpus(paragraphs)
    L = model_cfg.max_seq_len
    return model_cfg, tok, corpus_examples(train_par, tok, L), [], corpus_examples(val_par, tok, L), init_params


def prepare(cfg: Config, log=print):
    """Reads and validates everything a run needs before anything is written.

    Returns (model_cfg, tokenizer, train_examples, val_rows, val_examples, init_params);
    with data.corpus set, a pretraining run's (see prepare_corpus).
    """
    if cfg.data.corpus:
        return prepare_corpus(cfg)
    train_rows, val_rows = load_rows(cfg)
    tok, init_params = vocabulary(cfg, row_texts(train_rows))
    model_cfg = dataclasses.replace(cfg.model, vocab_size=len(tok))
    L = model_cfg.max_seq_len
    train_ex, dropped = chatml.encode_rows(train_rows, tok, cfg.data.system_prompt, L)
    val_ex, vdropped = chatml.encode_rows(val_rows, tok, cfg.data.system_prompt, L)
    if not train_ex:
        raise UserError(f"{cfg.data.train}: no row fits max_seq_len={L} with any of its answer")
    if not val_ex:
        raise UserError(f"{cfg.data.val}: no row fits max_seq_len={L} with any of its answer")
    if dropped or vdropped:
        log(f"warning: dropped {dropped} training and {vdropped} validation rows whose answer does not fit "
            f"max_seq_len={L}", file=sys.stderr)
    unk = sum(len(tok.unknown(t)) for t in row_texts(val_rows))
    if unk:
        log(f"note: {unk} validation characters are not in the training vocabulary (they become <unk>)",
            file=sys.stderr)
    return model_cfg, tok, train_ex, val_rows, val_ex, init_params


def init_params_from(model_cfg, seed: int, init_params):
    """Fresh parameters, or a pretrained model's with its embedding grown to the new vocabulary:
    every array is the base's, except that the embedding (n_old rows) gains the fresh rows
    n_old.. for the tokens appended to the base's vocabulary."""
    graphdef, params = model.init(model_cfg, seed)
    if init_params is not None:
        base, n_old = init_params

        def from_base(fresh, old):
            if fresh.shape == old.shape:
                return old
            assert fresh.shape[1:] == old.shape[1:] and old.shape[0] == n_old, (fresh.shape, old.shape)
            return jnp.concatenate([old, fresh[n_old:]], axis=0)  # the embedding: new tokens' rows appended

        params = jax.tree.map(from_base, params, base)  # a new tree: the arrays' shapes may change
    return graphdef, params


class MetricsLog:
    """metrics.jsonl: one JSON object per training step or evaluation."""

    def __init__(self, path: str, keep_until: Optional[int] = None):
        self.path = path
        if keep_until is not None and os.path.exists(path):  # resume: forget steps after the checkpoint
            with open(path, encoding="utf-8") as f:
                kept = [l.rstrip("\n") + "\n" for l in f if _step_of(l) is not None and _step_of(l) <= keep_until]
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)  # a kill now leaves the old file or the new one
        elif keep_until is None:
            open(path, "w").close()

    def write(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def _step_of(line: str) -> Optional[int]:
    """The step of a metrics.jsonl line; None for a line torn by a killed process."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _info(*args, file=None):
    from tqdm import tqdm
    tqdm.write(" ".join(str(a) for a in args), file=file or sys.stdout)


def train(cfg: Config, resume: bool = False, log=_info, progress: bool = True) -> dict:
    """Runs SFT as configured. Returns a summary dict (steps, best_val_loss, ...)."""
    from tqdm import tqdm
    from .decode import Generator

    tc = cfg.train
    mesh = parallel.setup(cfg.mesh)  # None on one device: nothing below is sharded then
    main = jax.process_index() == 0  # only process 0 writes logs, curves and run metadata
    if not main:
        log = lambda *a, **k: None  # noqa: E731
    if mesh is not None:
        parallel.check_batch(tc.batch_size, tc.grad_accum_steps, mesh)
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
    parallel.sync("jaxsft: run directory checked")  # before process 0 creates anything in it

    focus = tc.focus_steps  # the curriculum's steps come first; epochs count the steps after them
    focus_ex = focus_examples(cfg, tok, model_cfg.max_seq_len) if focus else []
    per_epoch = math.ceil(len(train_ex) / tc.batch_size)
    total = focus + per_epoch * tc.epochs
    total = total if tc.max_steps is None else min(total, tc.max_steps)
    graphdef, params = init_params_from(model_cfg, tc.seed, init_params)
    tx = make_optimizer(tc, total)
    state = TrainState(jnp.int32(0), params, tx.init(params))
    scalar = jnp.float32
    if mesh is not None:
        state_sh = parallel.state_shardings(state, mesh)
        batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
        state = parallel.shard_tree(state, state_sh)
        scalar = lambda v: parallel.shard_tree(np.float32(v), rep)  # noqa: E731
    best_val = float("inf")
    if not resume and main:  # before the checkpoint dirs: a run dir without config.json holds no run
        checkpoint.write_meta(run_dir, dataclasses.replace(cfg, model=model_cfg), tok)
    ckpt = checkpoint.RunCheckpoints(run_dir)
    if resume:
        restored = ckpt.restore_latest({"state": state, "best_val_loss": scalar(0)})
        if restored is None:  # stopped before its first save: nothing to continue, start again
            log(f"{run_dir} holds no training state yet; starting from step 0")
        else:
            state, best_val = restored["state"], float(restored["best_val_loss"])
            log(f"resumed {run_dir} at step {int(state.step)} (best validation loss {best_val:.4f})")
    start = int(state.step)
    metrics_log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), keep_until=start if resume else None) \
        if main else None

    n_params = model.count_params(state.params)
    log(f"model: {n_params / 1e6:.2f}M parameters, vocab {len(tok)} | train {len(train_ex)} rows, "
        f"val {len(val_ex)} | {total} steps ({per_epoch}/epoch), batch {tc.batch_size}")
    if focus:
        log(f"curriculum: steps 1-{focus} draw from the {len(focus_ex)} rows of "
            f"{', '.join(tc.focus_categories)} only")
    if mesh is not None:
        log(f"mesh: data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} over {mesh.size} "
            f"{mesh.devices.flat[0].platform} devices, {jax.process_count()} process(es)")

    train_step = make_train_step(graphdef, tx, tc, None if mesh is None else (state_sh, batch_sh))
    eval_step = make_eval_step(graphdef)
    schedule = make_schedule(tc, total)
    key = jax.random.PRNGKey(tc.seed)
    samples = [r.prompt_messages for r in val_rows[: tc.sample_questions]]
    scored = [r for r in val_rows if r.expected is not None][: tc.eval_exact]
    if mesh is not None:
        key = parallel.shard_tree(key, rep)
        eval_one = eval_step
        eval_step = lambda p, b: eval_one(p, parallel.host_batch_to_global(b, batch_sh))  # noqa: E731
        if jax.process_count() > 1:
            samples = scored = []  # answers would need every process to decode in step
    gen = Generator(None, model_cfg, tok, cfg.data.system_prompt, max_new_tokens=64) if samples or scored else None
    t_start = time.time()

    multiple = tc.grad_accum_steps * (1 if mesh is None else mesh.size)
    prefix, min_rows, slots = packing(tc, tok, cfg.data.system_prompt, train_ex, model_cfg.max_seq_len, multiple)
    _, focus_rows, focus_slots = packing(tc, tok, cfg.data.system_prompt, focus_ex, model_cfg.max_seq_len,
                                         multiple) if focus else (None, 0, 0)

    def batch_at(step):
        examples, k, rows, room = (focus_ex, step, focus_rows, focus_slots) if step < focus else \
            (train_ex, step - focus, min_rows, slots)
        b = chatml.batch_for_step(examples, k, tc.batch_size, tc.seed, tc.buckets, model_cfg.max_seq_len,
                                  tc.pack_len, multiple, prefix, rows, room)
        return b if mesh is None else parallel.host_batch_to_global(b, batch_sh)  # this process's rows only

    def save_latest(step):
        if ckpt.latest.latest_step() == step:
            return
        ckpt.save_latest(step, {"state": state, "best_val_loss": scalar(best_val)})

    eval_batch = tc.batch_size * -(-64 // tc.batch_size)  # >= 64 rows (no gradients kept): fewer, fuller calls

    def run_eval(step):
        nonlocal best_val
        val_loss = evaluate(eval_step, state.params, val_ex, eval_batch, tc.buckets, model_cfg.max_seq_len)
        improved = val_loss < best_val
        if improved:
            best_val = float(np.float32(val_loss))  # as the latest state keeps it: a resumed run compares alike
            ckpt.save_best(step, state.params, val_loss)
        record = {"step": step, "val_loss": val_loss, "best": improved}
        if gen is not None:
            gen.params = state.params
        exact = ""
        if scored:
            from .evaluate import exact_match
            answers = gen.answer([r.prompt_messages for r in scored])
            record["val_exact"] = float(np.mean([exact_match(a, r.expected) for a, r in zip(answers, scored)]))
            exact = f", exact match {100 * record['val_exact']:.1f}% of {len(scored)} rows"
        record["elapsed_s"] = round(time.time() - t_start, 2)  # wall time of this session, evaluations included
        if main:
            metrics_log.write([record])
        log(f"step {step}: val_loss {val_loss:.4f}" + (" (best, saved)" if improved else f" (best {best_val:.4f})")
            + exact)
        for q, a in zip(samples, gen.answer(samples) if samples else []):
            log(f"  {q[-1][1]} -> {a}")
        save_latest(step)
        if not main:
            return
        try:
            from .plots import write_curves
            write_curves(run_dir)
        except ImportError:
            pass

    pending, t_last, tokens_since = [], time.time(), 0.0
    bar = tqdm(total=total, initial=start, disable=not progress or not main, dynamic_ncols=True, unit="step")

    def flush():
        nonlocal pending, t_last, tokens_since
        if not pending:
            return
        records = []
        for s, m in jax.device_get(pending):
            if not m["ok"]:
                if main:
                    metrics_log.write(records)  # the good steps before it
                raise TrainingDiverged(f"non-finite loss or gradient norm at step {s}; stopped, the last good "
                                       f"checkpoints in {run_dir} are kept")
            records.append({"step": s, "loss": float(m["loss"]), "lr": float(schedule(s - 1)),
                            "grad_norm": float(m["grad_norm"]), "tokens": int(m["tokens"])})
        tokens_since += sum(r["tokens"] for r in records)
        now = time.time()
        bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", lr=f"{records[-1]['lr']:.2e}",
                        tok_s=f"{tokens_since / max(now - t_last, 1e-9):.0f}")
        t_last, tokens_since = now, 0.0
        if main:
            metrics_log.write(records)
        pending = []

    stop, saving = [], []  # Ctrl-Cs so far; set once the run only waits for its checkpoints

    def on_sigint(signum, frame):
        stop.append(signum)
        if saving:
            log("saving the training state, a moment", file=sys.stderr)
        elif len(stop) > 1:
            raise KeyboardInterrupt  # a second Ctrl-C: quit now, without saving this step
        else:
            log("stopping after this step to save the training state (Ctrl-C again to quit at once)",
                file=sys.stderr)

    in_main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM (a scheduler's preemption, `kill`) is handled like Ctrl-C: save the state, then stop
    old_handlers = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)} \
        if in_main_thread else {}
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
            end_of_epoch = (done > focus and (done - focus) % per_epoch == 0) or done == total
            if (tc.eval_every and done % tc.eval_every == 0) or end_of_epoch:
                flush()
                run_eval(done)
            elif tc.save_every and done % tc.save_every == 0:
                flush()
                save_latest(done)
            if stop and done < total:
                raise KeyboardInterrupt
        flush()
    except KeyboardInterrupt:
        saving.append(True)
        bar.close()
        if len(stop) > 1:  # the state may be mid-step: keep the last saved one
            log(f"stopped without saving this step; --resume continues from {run_dir}/latest", file=sys.stderr)
            raise
        flush()
        step = int(state.step)
        save_latest(step)
        ckpt.close()
        log(f"interrupted at step {step}; the training state is saved in {run_dir}/latest "
            f"(continue with the same config and --resume)", file=sys.stderr)
        raise
    finally:
        saving.append(True)
        ckpt.close()  # every way out lets a save in flight finish: the checkpoints stay whole
        if in_main_thread:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    return {"steps": total, "best_val_loss": best_val, "params": n_params, "run_dir": run_dir,
            "seconds": time.time() - t_start}
