#!/usr/bin/env python3
"""Training throughput at the seed's config (batch 8 rows, d_model 384, 6 layers).

    python bench/train_speed.py [--train ../shared/seed-data/custom_sft_train.jsonl]
                                [--config configs/seed.yaml] [--steps 40] [--set key=value ...]

Prints examples/s, answer tokens/s, non-pad tokens/s, model FLOP/s and MFU
against a matmul peak measured in the same run, compile time, number of
compilations and peak RSS; the last line is one JSON object of these figures.
"""
import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def matmul_peak(n=2048, repeats=10, dtype="float32"):
    """Best n^3 matmul rate under JAX, FLOP/s."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


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
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxsft import chatml, model, train
    from jaxsft.config import load_config
    from jaxsft.data import read_jsonl, row_texts
    from jaxsft.tokenizer import Tokenizer
    import dataclasses

    cfg = load_config(args.config, [f"data.train={args.train}", f"data.val={args.train}"] + args.set)
    tc = cfg.train
    rows = read_jsonl(cfg.data.train)
    tok = Tokenizer.build(row_texts(rows) + [cfg.data.system_prompt, "\n"])
    mcfg = dataclasses.replace(cfg.model, vocab_size=len(tok))
    examples, _ = chatml.encode_rows(rows, tok, cfg.data.system_prompt, mcfg.max_seq_len)

    peak = matmul_peak(args.peak_size, dtype=args.peak_dtype)
    graphdef, params = model.init(mcfg, tc.seed)
    total = args.warmup + args.steps
    tx = train.make_optimizer(tc, total)
    state = train.TrainState(jnp.int32(0), params, tx.init(params))
    step_fn = train.make_train_step(graphdef, tx, tc)
    key = jax.random.PRNGKey(tc.seed)

    prefix, min_rows, slots = train.packing(tc, tok, cfg.data.system_prompt, examples, mcfg.max_seq_len,
                                            tc.grad_accum_steps)
    slots = 0 if args.full_head else slots

    def batch_at(s):
        return chatml.batch_for_step(examples, s, tc.batch_size, tc.seed, tc.buckets, mcfg.max_seq_len,
                                     tc.pack_len, tc.grad_accum_steps, prefix, min_rows, slots)

    batches = [batch_at(s) for s in range(args.warmup, total)]
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batches[0], key).compile()
    compile_s = time.perf_counter() - t0
    del compiled
    # warm-up: a few steps, then one step per distinct batch shape, so the timed loop compiles nothing
    warm = [batch_at(s) for s in range(args.warmup)]
    warm += list({(b["inputs"].shape, "answer_at" in b): b for b in batches}.values())
    for b in warm:
        state, m = step_fn(state, b, key)
    jax.block_until_ready(state)
    compilations_warm = step_fn._cache_size()

    answer_tokens = nonpad = padded = head_everywhere = 0
    flops = exec_flops = 0.0
    head = 6 * mcfg.vocab_size * mcfg.d_model  # training FLOPs of the tied head, per position
    t0 = time.perf_counter()
    for b in batches:
        state, m = step_fn(state, b, key)
    jax.block_until_ready(state)
    dt = time.perf_counter() - t0
    for b in batches:
        B, L = b["inputs"].shape
        if "segments" in b:  # packed: one length per example
            lens = [int(n) for row in b["segments"] for n in np.bincount(row)[1:] if n]
        else:
            lens = [int(n) for n in (b["inputs"] != 0).sum(1) if n]  # pad id 0 never occurs inside a row
        nonpad += sum(lens)
        padded += B * L
        answer_tokens += int(b["loss_mask"].sum())
        # the output head counts where it runs: every token, or the answer_at positions
        flops += sum(model.flops_per_token(mcfg, n, head=False) * n for n in lens)
        flops += head * (int(b["loss_mask"].sum()) if "answer_at" in b else sum(lens))
        exec_flops += model.flops_per_token(mcfg, L, head=False) * B * L
        exec_flops += head * (len(b["answer_at"]) if "answer_at" in b else B * L)
        head_everywhere += "answer_at" not in b
    n_ex = len(batches) * tc.batch_size
    figures = {
        "config": os.path.basename(args.config), "params": model.count_params(state.params),
        "batch_size": tc.batch_size, "steps": args.steps, "s_per_step": dt / args.steps,
        "examples_per_s": n_ex / dt, "answer_tokens_per_s": answer_tokens / dt,
        "nonpad_tokens_per_s": nonpad / dt, "padded_fraction": 1 - nonpad / padded,
        "useful_gflops": flops / dt / 1e9, "executed_gflops": exec_flops / dt / 1e9,
        "peak_gflops": peak / 1e9, "mfu_useful": flops / dt / peak, "mfu_executed": exec_flops / dt / peak,
        "compile_s": compile_s, "compilations": step_fn._cache_size(),
        "compilations_after_warmup": step_fn._cache_size() - compilations_warm, "pack_len": tc.pack_len,
        "answer_slots": slots, "batches_head_everywhere": head_everywhere,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_dtype": args.peak_dtype, "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "dtype": tc.dtype, "devices": jax.device_count(),
    }
    for k, v in figures.items():
        print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
