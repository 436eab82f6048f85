"""The training loop. `train(cfg)` builds the mesh and the `Setup` (setup.py) and
runs a `Trainer`, whose `train()` reads straight down: take the step's batch, step,
log, evaluate or save. Evaluation extras (exact match, sample answers, curves)
are small hooks; Ctrl-C and SIGTERM are handled by `GracefulStop`.

A run directory (out_dir) holds config.json, tokenizer.json, best/ and latest/
(checkpoint.py), metrics.jsonl (metrics.py) and the same records as TensorBoard events
in tensorboard/ (tensorboard_log.py). Only process 0 writes logs and metadata; the
others get no-op loggers.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, dpo, hostmem, model, ops, parallel, runs
from .config import Config, UserError, lora_config_from_dict, model_config_from_dict, target_names, to_dict
from .metrics import MetricsLog, NullLog, Tee
from .batching import BatchPlan
from .setup import Setup, prepare
from .steps import TrainState, loss_sums, make_eval_step, make_train_step, sft_objective, validation_loss
from .tensorboard_log import TensorBoardLog


class TrainingDiverged(Exception):
    """A non-finite loss or gradient norm: the run stops, keeping the last good checkpoints."""


@dataclass(frozen=True)
class Summary:
    steps: int
    best_val_loss: float
    params: int
    run_dir: str
    seconds: float


def info(*args, file=None):
    """print() that keeps a tqdm progress bar intact, flushed: a job killed by its scheduler
    (SIGKILL) still leaves every line it printed in its log file."""
    from tqdm import tqdm
    file = file or sys.stdout
    tqdm.write(" ".join(str(a) for a in args), file=file)
    file.flush()


def quiet(*args, **kw):
    """The logger of processes other than 0."""


def train(cfg: Config, resume: bool = False, log=info, progress: bool = True) -> Summary:
    """Runs SFT (or, with data.corpus, pretraining) as configured."""
    mesh = parallel.setup(cfg.mesh)
    log = log if jax.process_index() == 0 else quiet
    dtype, why = ops.resolve_dtype(cfg.train.dtype)  # config.json keeps what the run used
    if cfg.train.dtype == "auto":
        log(f"train.dtype auto: {dtype} ({why})")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype=dtype))
    parallel.check_batch(cfg.train.batch_size, cfg.train.grad_accum_steps, mesh)
    trainer = Trainer(prepare(cfg, mesh, log), mesh, resume, log, progress)
    try:
        return trainer.train()
    finally:
        trainer.close()


class Trainer:
    """One run: its state on the mesh, checkpoints, metrics and evaluation hooks."""

    def __init__(self, setup: Setup, mesh, resume: bool = False, log=info, progress: bool = True):
        cfg, tc = setup.cfg, setup.cfg.train
        self.setup, self.mesh, self.log, self.run_dir = setup, mesh, log, cfg.out_dir
        self.main = jax.process_index() == 0
        self.progress = progress and self.main
        self.rows = parallel.batch_sharding(mesh)
        check_run_dir(setup, resume, log)
        parallel.sync("jaxsft: run directory checked")  # before process 0 creates anything in it
        parts = setup.init_model()  # what trains (every parameter, or LoRA's adapters) and what stays frozen
        state = TrainState.create(parts.trainable, setup.tx)
        self.state_shardings = parallel.state_shardings(state, mesh)
        self.state = parallel.shard_tree(state, self.state_shardings)
        self.frozen = parallel.place(parts.frozen, parallel.param_shardings(parts.frozen, mesh))
        self.best_val = float("inf")
        if resume:
            runs.verify_base(self.run_dir, cfg, setup.base)
        elif self.main:  # before the checkpoint dirs: a run dir without config.json holds no run
            runs.write_meta(self.run_dir, cfg, setup.tok, setup.base)
        # the base's arrays are fingerprinted: dropped, so that a base held in fewer bits
        # (lora.base_dtype) is the only copy the run keeps
        self.setup = setup = dataclasses.replace(setup, base=None)
        self.plan, self.val_plan = setup.plan, None
        plain = None if parts.merge is None else parallel.param_shardings(  # the merged model's layout
            jax.eval_shape(parts.merge, self.frozen, self.state.params), mesh)
        self._for_eval = parts.for_eval(self.frozen, plain)  # evaluation sees the plain model (LoRA: merged)
        if setup.dpo:  # the starting model's log-probs, before any step changes it
            self.plan, self.val_plan = self._with_reference(parts.plain_graphdef)
        self.ckpt = checkpoint.RunCheckpoints(self.run_dir)
        if resume:
            self._restore()
        self.start = int(self.state.step)
        self.metrics = metric_logs(cfg, self.start, resume) if self.main else NullLog()
        objective = dpo.objective(cfg.dpo, tc.batch_size) if setup.dpo else sft_objective
        self.train_step = make_train_step(parts.graphdef, setup.tx, tc, mesh, self.state_shardings, self.frozen,
                                          parts.combine, objective)
        self.eval_step = make_eval_step(parts.plain_graphdef, mesh, dpo.objective(cfg.dpo, tc.batch_size)
                                        if setup.dpo else loss_sums, tc.head_chunk)
        self.key = parallel.shard_tree(jax.random.PRNGKey(tc.seed), parallel.replicated(mesh))
        self.steplog = StepLog(self.metrics, setup.schedule, self.run_dir,
                               self.progress, setup.plan.total_steps, self.start,
                               "pairs" if setup.dpo else "tokens")
        self.measures, self.after_eval = eval_hooks(self)
        self.t_start = self.last_save = time.time()
        self._describe(parts.notes)

    def train(self) -> Summary:
        plan, total, tc = self.setup.plan, self.setup.plan.total_steps, self.setup.cfg.train
        hostmem.trim()  # what building and placing the state freed, back before the first step's peak
        with GracefulStop(self.log) as stop, Prefetch(self.batch_at, self.start, total) as batches:
            try:
                for step in range(self.start, total):
                    self.state, metrics = self.train_step(self.state, batches.get(step), self.key)
                    done = step + 1
                    self.steplog.add(done, metrics)
                    if (tc.eval_every and done % tc.eval_every == 0) or plan.ends_epoch(done):
                        self.evaluate(done)
                    elif self._save_due(done):
                        self.save_latest(done)
                    if stop.requested and done < total:
                        raise KeyboardInterrupt
                self.steplog.flush()
            except KeyboardInterrupt:
                stop.saving = True
                self.steplog.close()
                if stop.signals > 1:  # the state may be mid-step: keep the last saved one
                    self.log(f"stopped without saving this step; --resume continues from {self.run_dir}/latest",
                             file=sys.stderr)
                    raise
                self.steplog.flush()
                self.save_latest(int(self.state.step))
                self.ckpt.close()
                self.log(f"interrupted at step {int(self.state.step)}; the training state is saved in "
                         f"{self.run_dir}/latest (continue with the same config and --resume)", file=sys.stderr)
                raise
            finally:
                stop.saving = True
                self.ckpt.close()  # every way out lets a save in flight finish: the checkpoints stay whole
        return Summary(total, self.best_val, model.count_params(self.state.params), self.run_dir,
                       time.time() - self.t_start)

    def batch_at(self, step: int):
        """The global batch of `step` on the mesh (each process transfers its own rows)."""
        return parallel.host_batch_to_global(self.plan.batch(step), self.rows)

    def evaluate(self, step: int) -> None:
        """Validation loss (best checkpoint when it improves), the measure hooks, one
        metrics record and log line, the after-eval hooks, then the latest state."""
        self.steplog.flush()
        s, tc = self.setup, self.setup.cfg.train
        eval_rows = tc.batch_size * -(-64 // tc.batch_size)  # >= 64 rows (no gradients kept): fewer, fuller calls
        params = self.model_params()
        if s.dpo:
            figures = dpo.validation(self.eval_step, params, self.val_plan, tc.batch_size)
            val_loss = figures["val_loss"]
        else:
            val_loss = validation_loss(self.eval_step, params, s.val_examples, eval_rows, tc.buckets,
                                       s.model_cfg.max_seq_len)
            figures = {"val_loss": val_loss}
        improved = val_loss < self.best_val
        if improved:
            self.best_val = float(np.float32(val_loss))  # as the latest state keeps it: a resumed run compares alike
            self.ckpt.save_best(step, self.state.params, val_loss)
        record = {"step": step, **figures, "best": improved}
        notes = "".join(measure(params, record) for measure in self.measures)
        record["elapsed_s"] = round(time.time() - self.t_start, 2)  # wall time of this session, evaluations included
        self.metrics.write([record])
        if s.dpo:
            notes = (f", preference accuracy {100 * figures['val_rewards/accuracy']:.1f}%, margin "
                     f"{figures['val_rewards/margin']:.3f}") + notes
        self.log(f"step {step}: val_loss {val_loss:.4f}"
                 + (" (best, saved)" if improved else f" (best {self.best_val:.4f})") + notes)
        for hook in self.after_eval:
            hook(params)
        del params
        self.save_latest(step)

    def model_params(self):
        """The parameters of the model trained: state.params, or LoRA's adapters folded into the base."""
        return self._for_eval(self.state.params)

    def save_latest(self, step: int) -> None:
        """The full training state for --resume (metrics up to `step` written first)."""
        self.steplog.flush()
        self.last_save = time.time()
        if self.ckpt.latest.latest_step() == step:
            return
        best = parallel.shard_tree(np.float32(self.best_val), parallel.replicated(self.mesh))
        self.ckpt.save_latest(step, {"state": self.state, "best_val_loss": best})

    def close(self) -> None:
        self.steplog.close()
        self.ckpt.close()
        self.metrics.close()

    def _save_due(self, done: int) -> bool:
        tc = self.setup.cfg.train
        if tc.save_every and done % tc.save_every == 0:
            return True
        if not tc.save_every_s:
            return False
        if jax.process_count() == 1:
            return time.time() - self.last_save >= tc.save_every_s
        # every process must agree to save: process 0's clock decides, asked every 10 steps
        return done % 10 == 0 and parallel.agree(time.time() - self.last_save >= tc.save_every_s)

    def _with_reference(self, graphdef):
        """(the run plan, the validation pairs' plan), each pair with its reference log-probs: the
        starting model's (dpo.py), read from the run directory when it has them (--resume),
        else computed now, once, and written there."""
        s, tc = self.setup, self.setup.cfg.train
        val = BatchPlan(s.val_examples, tc.batch_size, tc.seed, tc.buckets, s.model_cfg.max_seq_len, pairs=True)
        found = dpo.load_reference(self.run_dir, len(s.train_examples), len(s.val_examples))
        if found is None:
            from tqdm import tqdm
            self.log(f"reference: the log-probs of {len(s.train_examples)} training and {len(s.val_examples)} "
                     f"validation pairs under the starting model, computed once (kept in "
                     f"{self.run_dir}/{dpo.REFERENCE_FILE})")
            step = dpo.make_logps_step(graphdef, tc.batch_size, lambda b: parallel.host_batch_to_global(b, self.rows),
                                       jnp.bfloat16 if tc.dtype == "bfloat16" else jnp.float32, tc.head_chunk)
            params = self.model_params()
            with tqdm(total=len(s.train_examples) + len(s.val_examples), disable=not self.progress,
                      unit="pair", dynamic_ncols=True) as bar:
                found = tuple(dpo.reference_logps(step, params, plan, tc.batch_size, bar.update)
                              for plan in (s.plan.main, val))
            del params
            if self.main:
                dpo.save_reference(self.run_dir, *found)
            parallel.sync("jaxsft: reference written")
        train_ref, val_ref = found
        plan = dataclasses.replace(s.plan, main=dataclasses.replace(s.plan.main, reference=train_ref))
        return plan, dataclasses.replace(val, reference=val_ref)

    def _restore(self) -> None:
        best = parallel.shard_tree(np.float32(0), parallel.replicated(self.mesh))
        restored = self.ckpt.restore_latest({"state": self.state, "best_val_loss": best})
        if restored is None:  # stopped before its first save: nothing to continue, start again
            self.log(f"{self.run_dir} holds no training state yet; starting from step 0")
            return
        self.state, self.best_val = restored["state"], float(restored["best_val_loss"])
        self.log(f"resumed {self.run_dir} at step {int(self.state.step)} "
                 f"(best validation loss {self.best_val:.4f})")

    def _describe(self, notes) -> None:
        s, tc, plan = self.setup, self.setup.cfg.train, self.setup.plan
        what = "windows" if s.pretraining else "pairs" if s.dpo else "rows"
        n = model.count_params(model.abstract(s.model_cfg)[1])
        self.log(f"model: {n / 1e6:.2f}M parameters, vocab {len(s.tok)} | "
                 f"train {len(s.train_examples)} {what}, val {len(s.val_examples)} | {plan.total_steps} steps "
                 f"({plan.main.steps_per_epoch}/epoch), batch {tc.batch_size}")
        for note in notes:
            self.log(note)
        if plan.focus_steps:
            self.log(f"curriculum: steps 1-{plan.focus_steps} draw from the {len(plan.focus.examples)} rows of "
                     f"{', '.join(tc.focus_categories)} only")
        if self.mesh.size > 1 or jax.process_count() > 1:
            self.log(f"mesh: data {self.mesh.shape['data']} x fsdp {self.mesh.shape['fsdp']} over {self.mesh.size} "
                     f"{self.mesh.devices.flat[0].platform} devices, {jax.process_count()} process(es)")


# the run directory and what --resume may change

# train keys whose change makes a resumed run differ from an uninterrupted one
TRAJECTORY_KEYS = ("batch_size", "epochs", "max_steps", "lr", "weight_decay", "warmup_steps", "max_grad_norm",
                   "seed", "grad_accum_steps", "dtype", "pack_len", "share_prefix", "focus_categories",
                   "focus_steps", "buckets", "eval_every", "objective", "head_chunk")


def check_run_dir(setup: Setup, resume: bool, log) -> None:
    """A new run needs an empty out_dir; --resume needs a run with this model and
    vocabulary, and warns of each changed setting that changes the trajectory."""
    run_dir, cfg = setup.cfg.out_dir, setup.cfg
    has_run = os.path.isdir(os.path.join(run_dir, "latest")) or os.path.isdir(os.path.join(run_dir, "best"))
    if resume and not has_run:
        raise UserError(f"{run_dir}: nothing to resume (no checkpoint there)")
    if not resume and has_run:
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another out_dir")
    if not resume:
        return
    old_cfg, old_tok = checkpoint.read_meta(run_dir)
    # (compared as ModelConfigs: a run written before a key existed has that key's default; attention is
    # how the same function is computed, which a resumed run may change, with a warning below)
    old_model = model_config_from_dict(old_cfg["model"])
    if dataclasses.replace(old_model, attention=setup.model_cfg.attention) != setup.model_cfg or \
            old_tok.itos != setup.tok.itos:
        raise UserError(f"{run_dir}: was trained with another model config or vocabulary; cannot resume")
    if old_model.attention != setup.model_cfg.attention:
        log(f"warning: model.attention was {old_model.attention} in {run_dir}, is {setup.model_cfg.attention} now: "
            f"the resumed run will not match an uninterrupted one", file=sys.stderr)
    old_lora = lora_config_from_dict(old_cfg.get("lora"))
    if (old_lora.rank, target_names(old_lora.targets) if old_lora.rank else ()) != \
            (cfg.lora.rank, target_names(cfg.lora.targets) if cfg.lora.rank else ()) or \
            (cfg.lora.rank and old_lora.alpha != cfg.lora.alpha):
        raise UserError(f"{run_dir}: was trained with another lora section (rank {old_lora.rank}); cannot resume")
    new = json.loads(json.dumps(to_dict(cfg.train)))  # as config.json holds it: lists, not tuples
    for k in TRAJECTORY_KEYS:
        old = old_cfg.get("train", {}).get(k)
        if k in old_cfg.get("train", {}) and old != new[k]:
            log(f"warning: train.{k} was {old} in {run_dir}, is {new[k]} now: the resumed run will not "
                f"match an uninterrupted one", file=sys.stderr)


# the pieces the loop calls


def metric_logs(cfg: Config, start: int, resume: bool) -> Tee:
    """Where process 0's records go: metrics.jsonl and, with train.tensorboard, TensorBoard's
    events. A resumed run keeps their records up to `start` (the latest state) and drops the rest."""
    logs = [MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), keep_until=start if resume else None)]
    if cfg.train.tensorboard:
        logs.append(TensorBoardLog(os.path.join(cfg.out_dir, "tensorboard"), to_dict(cfg), start))
    return Tee(logs)


class GracefulStop:
    """Ctrl-C or SIGTERM (a scheduler's preemption) asks the loop to stop after the
    current step and save; a second Ctrl-C quits at once, except while saving."""

    def __init__(self, log):
        self.log, self.signals, self.saving, self._old = log, 0, False, {}

    @property
    def requested(self) -> bool:
        return self.signals > 0

    def _handle(self, signum, frame):
        self.signals += 1
        if self.saving:
            self.log("saving the training state, a moment", file=sys.stderr)
        elif self.signals > 1:
            raise KeyboardInterrupt  # a second Ctrl-C: quit now, without saving this step
        else:
            self.log("stopping after this step to save the training state (Ctrl-C again to quit at once)",
                     file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Prefetch:
    """Prepares step s + 1's batch in a thread while step s runs."""

    def __init__(self, batch_at: Callable, start: int, total: int):
        self.batch_at, self.total = batch_at, total
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.next = self.pool.submit(batch_at, start) if start < total else None

    def get(self, step: int):
        batch = self.next.result()
        if step + 1 < self.total:
            self.next = self.pool.submit(self.batch_at, step + 1)
        return batch

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=False, cancel_futures=True)


class StepLog:
    """Per-step metrics, fetched from the device every 10 steps (a fetch waits for the
    step): metrics.jsonl records, the progress bar, and the divergence check."""

    def __init__(self, metrics, schedule, run_dir: str, progress: bool, total: int, start: int,
                 count: str = "tokens"):
        from tqdm import tqdm
        self.metrics, self.schedule, self.run_dir, self.count = metrics, schedule, run_dir, count
        self.pending, self.t_last, self.tokens = [], time.time(), 0.0
        self.bar = tqdm(total=total, initial=start, disable=not progress, dynamic_ncols=True, unit="step")

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))
        self.bar.update(1)
        if len(self.pending) >= 10:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        records = []
        for s, m in jax.device_get(self.pending):
            if not m["ok"]:
                self.metrics.write(records)  # the good steps before it
                raise TrainingDiverged(f"non-finite loss or gradient norm at step {s}; stopped, the last good "
                                       f"checkpoints in {self.run_dir} are kept")
            extras = {k: float(v) for k, v in m.items() if k not in ("loss", "tokens", "grad_norm", "ok")}
            records.append({"step": s, "loss": float(m["loss"]), "lr": float(self.schedule(s - 1)),
                            "grad_norm": float(m["grad_norm"]), self.count: int(m["tokens"]), **extras})
        self.tokens += sum(r[self.count] for r in records)
        now = time.time()
        rate = self.tokens / max(now - self.t_last, 1e-9)
        if self.count == "pairs":
            self.bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", lr=f"{records[-1]['lr']:.2e}",
                                 acc=f"{records[-1]['rewards/accuracy']:.2f}", pairs_s=f"{rate:.1f}")
        else:  # answer_tok_s: tokens with loss (the answers) per second, not every token the model reads
            self.bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", lr=f"{records[-1]['lr']:.2e}",
                                 answer_tok_s=f"{rate:.0f}")
        self.t_last, self.tokens = now, 0.0
        self.metrics.write(records)
        self.pending = []

    def close(self) -> None:
        self.bar.close()


# evaluation hooks


# curves.png is redrawn at an evaluation this many seconds or more after the last drawing (or the
# run's start), and at the run's last: matplotlib takes ~0.3 s a drawing, more than a short run's
# evaluations do, and a viewer refreshing the file needs no more
CURVES_EVERY_S = 30.0


def eval_hooks(trainer: Trainer) -> tuple[list, list]:
    """(measures, after_eval) of a run. A measure adds fields to the evaluation's
    record and returns a note for its log line: val_exact, the exact match of train.eval_exact validation answers
    (and val_exact_category, per category, when the rows have categories). After
    each evaluation: greedy answers to train.sample_questions questions are printed,
    and curves.png is redrawn (at most once every CURVES_EVERY_S, and at the run's last
    evaluation). Answers need every process to decode in step, so a multi-process run has
    neither."""
    s, tc = trainer.setup, trainer.setup.cfg.train
    measures, after = [], []
    samples = [r.prompt_messages for r in s.val_rows[: tc.sample_questions]]
    scored = [r for r in s.val_rows if r.expected is not None][: tc.eval_exact]
    if jax.process_count() > 1:
        samples = scored = []
    if samples or scored:
        from .decode import Generator
        gen = Generator(None, s.model_cfg, s.tok, s.cfg.data.system_prompt,
                        max_new_tokens=min(64, s.model_cfg.max_seq_len // 2))
    if scored:
        from .evaluate import exact_by_category

        def measure_exact(params, record):
            gen.params = params
            answers = gen.answer([r.prompt_messages for r in scored])
            record["val_exact"], by_category = exact_by_category(answers, scored)
            if by_category:  # (TensorBoard: val_exact_category/<name>)
                record["val_exact_category"] = by_category
            return f", exact match {100 * record['val_exact']:.1f}% of {len(scored)} rows"
        measures.append(measure_exact)
    if samples:
        def print_samples(params):
            gen.params = params
            for q, a in zip(samples, gen.answer(samples)):
                trainer.log(f"  {q[-1][1]} -> {a}")
        after.append(print_samples)
    if trainer.main:
        drawn = time.time()

        def draw_curves(params):
            nonlocal drawn
            if time.time() - drawn < CURVES_EVERY_S and int(trainer.state.step) < s.plan.total_steps:
                return
            try:
                from .plots import write_curves
            except ImportError:  # matplotlib is optional
                return
            write_curves(trainer.run_dir)
            drawn = time.time()
        after.append(draw_curves)
    return measures, after
