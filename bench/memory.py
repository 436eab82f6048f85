#!/usr/bin/env python3
"""Peak RSS and seconds per step of full fine-tuning at SmolLM2-135M's shape on packed
2,048-token rows, batch 4: attention with the full score matrix or blockwise
(model.attention), each with and without rematerialised blocks (train.remat). Issue 36.

    python bench/memory.py [--configs full,remat,blockwise,both] [--steps 2] [--budget-gb 20] [--dtype float32]

The model is SmolLM2-135M's shape (d_model 576, 30 layers, 9 heads, 3 key/value heads, d_ff
1536, vocabulary 49152, tied head, rope_theta 100000; 134.5M parameters) with random weights
(model.init: nothing is downloaded), float32, dropout 0, AdamW. Each of the 4 rows is packed
with examples of random lengths 128-1,024 tokens (the last one cut to fill the row exactly),
each with its own positions and segment id and its loss on its last quarter; the output head
runs at the loss positions only (answer_at), as bin/train runs SFT on one device.

Each configuration runs in a process of its own (--one NAME), which compiles the step, then
checks XLA's plan (`memory_analysis`: temporaries + arguments + outputs - aliased) against
--budget-gb: a step planned above it is reported as out of memory without running (the
machine is shared: the kernel's OOM killer might take someone else's process). Otherwise it
runs 1 step (compile and first run) and --steps more; s/step is the fastest of those, cpu-s/step
the process's CPU time (all threads) over the same step, which other work on the machine
inflates less. Peak RSS is the child's maximum resident set (os.wait4's rusage: JAX's runtime
and the compiler included); on a GPU the device's own peak is printed beside it. GB: 2^30 bytes.
The command that reproduces each line is printed beside it; the last line is a JSON list.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # name -> (model.attention, train.remat)
    "full": ("full", "none"),  # today's: every layer's (4, 9, 2048, 2048) scores kept for the backward pass
    "remat": ("full", "block"),
    "blockwise": ("blockwise", "none"),
    "both": ("blockwise", "block"),
    "both-dots": ("blockwise", "dots"),  # remat that also keeps the matrix products' outputs
    "cudnn": ("cudnn", "none"),  # a GPU with --dtype bfloat16 only (bench/gpu_check.sh)
    "cudnn-remat": ("cudnn", "block"),
}
SEQ, BATCH = 2048, 4


def smollm2_135m(attention: str):
    from jaxsft.config import ModelConfig
    return ModelConfig(vocab_size=49152, max_seq_len=SEQ, d_model=576, n_heads=9, n_kv_heads=3, n_layers=30,
                       d_ff=1536, rope_theta=100000.0, tie_embeddings=True, dropout=0.0, attention=attention)


def packed_batch(vocab: int, seed: int = 0):
    """BATCH rows of SEQ tokens, each filled with examples of 128-1,024 random tokens (loss:
    each example's last quarter), with answer_at at the loss positions."""
    import numpy as np
    from jaxsft.batching import Batch
    rng = np.random.default_rng(seed)
    shape = (BATCH, SEQ)
    inputs, positions, segments = (np.zeros(shape, np.int32) for _ in range(3))
    loss_mask = np.zeros(shape, np.float32)
    for r in range(BATCH):
        at, seg = 0, 1
        while at < SEQ:
            n = int(rng.integers(128, 1025))
            n = SEQ - at if SEQ - at - n < 128 else n  # the last example fills the row
            inputs[r, at:at + n] = rng.integers(1, vocab, n)
            positions[r, at:at + n], segments[r, at:at + n] = np.arange(n), seg
            loss_mask[r, at + n - n // 4:at + n] = 1
            at, seg = at + n, seg + 1
    targets = np.roll(inputs, -1, axis=1)
    answer_at = np.flatnonzero(loss_mask.reshape(-1)).astype(np.int32)
    return Batch(inputs, targets, loss_mask, positions, segments, answer_at=answer_at)


def one(name: str, steps: int, budget_gb: float, dtype: str = "float32") -> dict:
    """Runs one configuration in this process; returns its figures."""
    import jax
    import numpy as np
    from jaxsft import hostmem, model, parallel
    from jaxsft.config import TrainConfig
    from jaxsft.steps import TrainState, make_optimizer, make_train_step

    attention, remat = CONFIGS[name]
    mc = smollm2_135m(attention)
    tc = TrainConfig(batch_size=BATCH, lr=1e-4, warmup_steps=0, remat=remat, dtype=dtype)
    mesh = parallel.one_device_mesh()
    tx = make_optimizer(tc, 1000)
    graphdef, params = model.init(mc, 0)
    state = TrainState.create(params, tx)
    shardings = parallel.state_shardings(state, mesh)
    state = parallel.shard_tree(state, shardings)
    del params
    hostmem.trim()  # as bin/train does before its first step (which compiles it)
    step = make_train_step(graphdef, tx, tc, mesh, shardings)
    batch = packed_batch(mc.vocab_size)
    out = {"config": name, "attention": attention, "remat": remat, "params": model.count_params(state.params),
           "segments": int(batch.segments.max(axis=1).sum()), "loss_tokens": int(batch.loss_mask.sum())}
    batch = parallel.host_batch_to_global(batch, parallel.batch_sharding(mesh))
    key = jax.random.PRNGKey(0)
    t = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()  # run as it is: calling `step` would compile again
    ma = compiled.memory_analysis()
    out["compile_s"] = time.perf_counter() - t
    out["xla_temp_bytes"] = ma.temp_size_in_bytes
    planned = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    out["xla_planned_bytes"] = planned
    if planned > budget_gb * 2 ** 30:
        out["oom"] = f"XLA plans {planned / 2 ** 30:.1f} GB for the step (over the {budget_gb:g} GB budget): not run"
        return out
    times, cpu = [], []
    for i in range(steps + 1):
        t, c = time.perf_counter(), time.process_time()
        state, m = compiled(state, batch, key, step.frozen)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    out.update(first_step_s=times[0], s_per_step=float(np.min(times[1:])), cpu_s_per_step=float(np.min(cpu[1:])),
               step_s=times[1:], loss=float(m["loss"]))
    stats = jax.devices()[0].memory_stats()  # None on a CPU; a GPU's own memory
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = stats["peak_bytes_in_use"]
    return out


def command(name: str, steps: int, budget_gb: float, dtype: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--one", name, "--steps", str(steps), "--budget-gb",
            str(budget_gb), "--dtype", dtype]


def child(cmd: list[str], env: dict):
    """Runs cmd to its end: (the finished Popen, stdout, stderr, its peak RSS in bytes: os.wait4's
    rusage of this child alone, JAX's runtime and the compiler included)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (not Popen's wait: it reaps)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    return proc, stdout, stderr, usage.ru_maxrss * 1024


def _gb(n) -> str:
    return f"{n / 2 ** 30:.2f} GB"


def default_budget_gb() -> float:
    """--budget-gb's default: the memory available now less 1.5 GB, at most 20."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2 ** 20
    return round(min(20.0, avail - 1.5), 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="full,remat,blockwise,both")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the first (compiling) one")
    p.add_argument("--budget-gb", type=float, default=None,
                   help="a step XLA plans above this is reported as out of memory, not run (default: the "
                        "memory available now less 1.5 GB, at most 20)")
    p.add_argument("--dtype", default="float32", help="train.dtype (cudnn needs bfloat16)")
    p.add_argument("--one", metavar="NAME", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.budget_gb is None:
        args.budget_gb = default_budget_gb()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.budget_gb, args.dtype)))
        return

    print(f"budget: a step XLA plans above {args.budget_gb:g} GB is not run", flush=True)
    results = []
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in args.configs.split(","):
        cmd = command(name, args.steps, args.budget_gb, args.dtype)
        proc, stdout, stderr, rss = child(cmd, env)
        shown = "PYTHONPATH=. python bench/memory.py --one " + " ".join(cmd[3:])
        if proc.returncode:
            r = {"config": name, "error": f"exit {proc.returncode}", "peak_rss_bytes": rss, "command": shown}
            print(f"{name:10s} failed (exit {proc.returncode}, peak RSS {_gb(rss)}): {stderr.strip()[-500:]}  "
                  f"[{shown}]", flush=True)
            results.append(r)
            continue
        r = json.loads(stdout.strip().splitlines()[-1])
        r.update(peak_rss_bytes=rss, command=shown)
        results.append(r)
        what = f"{name:10s} attention {r['attention']:9s} remat {r['remat']:5s} | XLA temporaries " \
               f"{_gb(r['xla_temp_bytes'])}, planned {_gb(r['xla_planned_bytes'])}"
        if "oom" in r:
            print(f"{what} | OUT OF MEMORY: {r['oom']}  [{shown}]", flush=True)
        else:
            device = f" (GPU peak {_gb(r['device_peak_bytes'])})" if "device_peak_bytes" in r else ""
            print(f"{what} | peak RSS {_gb(rss)}{device} | {r['s_per_step']:.1f} s/step, {r['cpu_s_per_step']:.1f} cpu-s/step "
                  f"(steps {', '.join(f'{s:.1f}' for s in r['step_s'])} s; first {r['first_step_s']:.1f} s, compile "
                  f"{r['compile_s']:.0f} s) | loss {r['loss']:.4f}  [{shown}]", flush=True)
    ran = [r for r in results if "s_per_step" in r]
    if ran:
        fits = [r for r in ran if r["peak_rss_bytes"] <= 6 * 2 ** 30]
        fastest = min(ran, key=lambda r: r["s_per_step"])
        print(f"fastest that ran: {fastest['config']} ({fastest['s_per_step']:.1f} s/step)")
        for r in fits:
            print(f"{r['config']}: peak RSS {_gb(r['peak_rss_bytes'])} <= 6 GB, step {r['s_per_step'] / fastest['s_per_step']:.2f}x "
                  f"the fastest (cpu-s {r['cpu_s_per_step'] / fastest['cpu_s_per_step']:.2f}x)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
