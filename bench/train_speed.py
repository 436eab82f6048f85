#!/usr/bin/env python3
"""Training throughput at the seed's config (batch 8 rows, d_model 384, 6 layers).

    python bench/train_speed.py [--train ../shared/seed-data/custom_sft_train.jsonl]
                                [--config configs/seed.yaml] [--steps 40] [--set key=value ...]
                                [--head-min-logits N]

Prints examples/s, answer tokens/s, non-pad tokens/s, model FLOP/s and MFU
against a matmul peak measured in the same run, compile time, number of
compilations and peak RSS; the last line is one JSON object of these figures.
"""
import argparse
import dataclasses
import json
import os
import resource
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def matmul_peak(n=2048, repeats=10, dtype="float32"):
    """Best n^3 matmul rate under JAX, FLOP/s: the product the model runs (`ops.mm`: bfloat16
    operands with float32 accumulation)."""
    import jax
    from jaxsft import ops
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(ops.mm)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def work(host, mcfg):
    """What a list of host batches asks of the model: answer tokens, non-pad and padded
    tokens, useful FLOPs (real tokens; the head, and the last layer's output projection and
    SwiGLU, where they run) and executed FLOPs."""
    import numpy as np
    from jaxsft import model
    answer_tokens = nonpad = padded = head_everywhere = 0
    flops = exec_flops = 0.0
    head = 6 * mcfg.vocab_size * mcfg.d_model  # training FLOPs of the tied head, per position
    # the last layer's output projection and SwiGLU run only where the head does (model.GPT)
    tail = 6 * mcfg.d_model * (mcfg.n_heads * mcfg.head_dim + 3 * mcfg.d_ff)
    for b in host:
        B, L = b.inputs.shape
        if b.segments is not None:  # packed: one length per example
            lens = [int(n) for row in b.segments for n in np.bincount(row)[1:] if n]
        else:
            lens = [int(n) for n in (b.inputs != 0).sum(1) if n]  # pad id 0 never occurs inside a row
        nonpad += sum(lens)
        padded += B * L
        answer_tokens += int(b.loss_mask.sum())
        # the output head counts where it runs: every token, or the answer_at positions
        flops += sum(model.flops_per_token(mcfg, n, head=False) * n for n in lens)
        flops += head * (int(b.loss_mask.sum()) if b.answer_at is not None else sum(lens))
        exec_flops += model.flops_per_token(mcfg, L, head=False) * B * L
        exec_flops += head * (len(b.answer_at) if b.answer_at is not None else B * L)
        if b.answer_at is not None:
            flops -= tail * (sum(lens) - int(b.loss_mask.sum()))
            exec_flops -= tail * (B * L - len(b.answer_at))
        head_everywhere += b.answer_at is None
    return dict(answer_tokens=answer_tokens, nonpad=nonpad, padded=padded, flops=flops,
                exec_flops=exec_flops, head_everywhere=head_everywhere)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs/seed.yaml"))
    p.add_argument("--train", default=os.path.join(ROOT, "../shared/seed-data/custom_sft_train.jsonl"))
    p.add_argument("--steps", type=int, default=40, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak (8192 on a GPU)")
    p.add_argument("--peak-dtype", default="float32", help="matmul dtype for the peak (bfloat16 on a GPU)")
    p.add_argument("--full-head", action="store_true",
                   help="the output head at every position (no answer_at), to compare")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--head-min-logits", type=int, default=None,
                   help="head.MIN_LOGITS: chunk the head (train.head_chunk) from this many logits on, to time "
                        "the chunked head on a small vocabulary (0: wherever there is more than one chunk)")
    args = p.parse_args()
    from jaxsft.cli import huge_pages
    huge_pages()  # as bin/train, bin/chat do (JAXSFT_HUGE_PAGES=0: without, to compare)

    import jax
    from jaxsft import head, model, ops, parallel
    from jaxsft.config import load_config
    if args.head_min_logits is not None:
        head.MIN_LOGITS = args.head_min_logits
    from jaxsft.setup import prepare
    from jaxsft.trainer import Trainer

    cfg = load_config(args.config, [f"data.train={args.train}", f"data.val={args.train}",
                                    f"out_dir={tempfile.mkdtemp()}/run", "train.focus_steps=0"] + args.set)
    tc = cfg.train
    peak = matmul_peak(args.peak_size, dtype=args.peak_dtype)
    # the trainer's own setup, state, step and batches (prefix shared, packing geometry, answer slots)
    mesh = parallel.setup(cfg.mesh)
    setup = prepare(cfg, mesh, log=lambda *a, **k: None)
    if args.full_head:
        setup = dataclasses.replace(setup, plan=dataclasses.replace(
            setup.plan, main=dataclasses.replace(setup.plan.main, answer_slots=0)))
    trainer = Trainer(setup, mesh, log=lambda *a, **k: None, progress=False)
    mcfg, plan, step_fn, key, state = setup.model_cfg, setup.plan.main, trainer.train_step, trainer.key, trainer.state
    total = args.warmup + args.steps
    host = [plan.batch(s) for s in range(args.warmup, total)]
    batches = [parallel.host_batch_to_global(h, trainer.rows) for h in host]
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batches[0], key).compile()
    compile_s = time.perf_counter() - t0
    del compiled
    # warm-up: a few steps, then one step per distinct batch shape, so the timed loop compiles nothing
    warm = [trainer.batch_at(s) for s in range(args.warmup)]
    warm += list({(h.inputs.shape, h.answer_at is None): b for h, b in zip(host, batches)}.values())
    for b in warm:
        state, m = step_fn(state, b, key)
    jax.block_until_ready(state)
    compilations_warm = step_fn.jitted._cache_size()

    t0 = time.perf_counter()
    for h in host:  # the host-to-device copy counts, as in a run (there it overlaps the step before)
        state, m = step_fn(state, parallel.host_batch_to_global(h, trainer.rows), key)
    jax.block_until_ready(state)
    dt = time.perf_counter() - t0
    # what a time-based save of the latest state (train.save_every_s) costs the loop: the call
    # returns once the arrays are copied to the host; orbax writes the files in the background
    trainer.state = state
    t0 = time.perf_counter()
    trainer.save_latest(total)
    save_call_s = time.perf_counter() - t0
    trainer.ckpt.wait()
    save_total_s = time.perf_counter() - t0
    trainer.close()
    w = work(host, mcfg)
    answer_tokens, nonpad, padded, flops, exec_flops, head_everywhere = (
        w[k] for k in ("answer_tokens", "nonpad", "padded", "flops", "exec_flops", "head_everywhere"))
    n_ex = len(batches) * tc.batch_size
    figures = {
        "config": os.path.basename(args.config), "params": model.count_params(state.params),
        "batch_size": tc.batch_size, "steps": args.steps, "s_per_step": dt / args.steps,
        "examples_per_s": n_ex / dt, "answer_tokens_per_s": answer_tokens / dt,
        "nonpad_tokens_per_s": nonpad / dt, "padded_fraction": 1 - nonpad / padded,
        "useful_gflops": flops / dt / 1e9, "executed_gflops": exec_flops / dt / 1e9,
        "peak_gflops": peak / 1e9, "mfu_useful": flops / dt / peak, "mfu_executed": exec_flops / dt / peak,
        "compile_s": compile_s, "compilations": step_fn.jitted._cache_size(),
        "compilations_after_warmup": step_fn.jitted._cache_size() - compilations_warm, "pack_len": tc.pack_len,
        "answer_slots": plan.answer_slots, "batches_head_everywhere": head_everywhere,
        "latest_save_call_s": save_call_s, "latest_save_total_s": save_total_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_dtype": args.peak_dtype, "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "dtype": tc.dtype,
        "dtype_used": ops.resolve_dtype(tc.dtype)[0], "devices": jax.device_count(),
    }
    for k, v in figures.items():
        print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
