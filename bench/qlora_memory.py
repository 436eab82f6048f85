#!/usr/bin/env python3
"""QLoRA (lora.base_dtype): peak RSS and seconds per step of LoRA rank 16 on a Qwen2.5-0.5B-shaped
base held as float32, bfloat16, int8 and int4, and on a Qwen2.5-1.5B-shaped base as int4. Issue 36.

    python bench/qlora_memory.py [--configs 0.5b:float32,0.5b:bfloat16,0.5b:int8,0.5b:int4,1.5b:int4]
                                 [--steps 1] [--remat block] [--head-chunk 256] [--budget-gb 20]

Shapes (family qwen2: q/k/v biases, tied head, rope_theta 1e6; random weights, nothing downloaded):

    0.5b  d_model 896, 24 layers, 14 heads / 2 key-value, d_ff 4864, vocabulary 151936   494M parameters
    1.5b  d_model 1536, 28 layers, 12 heads / 2 key-value, d_ff 8960, vocabulary 151936  1.54B parameters

LoRA rank 16, alpha 32, on all seven projections; 8 rows of 512 random tokens, the loss on each
row's last quarter (the output head at those 1,024 positions only, as bin/train runs SFT on one
device); AdamW; train.remat block by default (each block's inside recomputed in the backward pass:
without it the activations of 24 layers at 4,096 tokens, ~5 GB, would swamp the base's share);
--head-chunk is train.head_chunk (default: TrainConfig's; 0: the head's (1,024, 151,936) logits whole).

The base is built as a streaming loader would read it: one array at a time, each projection kernel
quantised (lora.quantize_base's own quant.quantize) as soon as it exists and its float copy dropped,
so the process never holds the float base whole; hostmem.trim() then runs as bin/train does before
its first step. (bin/train itself still loads model.init_from whole in float32 before quantising:
docs/user-guide.md.) The embedding, norms and biases stay float32 in every configuration.

Each configuration runs in a process of its own (--one SHAPE:DTYPE), which compiles the step and
checks XLA's plan (memory_analysis: temporaries + arguments + outputs - aliased) against --budget-gb
(refused, not run, above it: the machine is shared). Then 1 step (the first) and --steps more;
s/step is the fastest of those. Peak RSS is the child's maximum resident set (os.wait4's rusage);
"base" is the frozen arrays' bytes, "state" the adapters' and AdamW's. GB: 2^30 bytes. The command
that reproduces each line is printed beside it; the last line is a JSON list.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import _gb, child, default_budget_gb  # noqa: E402  (bench/memory.py: a configuration's process, its peak RSS)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {
    "0.5b": dict(d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, d_ff=4864),
    "1.5b": dict(d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, d_ff=8960),
    "tiny": dict(d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=256),  # a smoke test of this script
}
VOCAB, SEQ, BATCH, RANK = 151936, 512, 8, 16


def model_config(shape: str):
    from jaxsft.config import ModelConfig
    return ModelConfig(vocab_size=VOCAB, max_seq_len=SEQ, family="qwen2", attn_bias="qkv", tie_embeddings=True,
                       rope_theta=1000000.0, norm_eps=1e-6, dropout=0.0, **SHAPES[shape])


def streamed_base(mc, lc):
    """The frozen base as lora.init gives it (every projection kernel stored as lc.base_dtype says),
    built one array at a time: random N(0, 0.02) weights, norms 1, biases 0, each kernel quantised as
    soon as it exists. Returns (graphdef, base, adapters)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jaxsft import lora, model, quant
    graphdef, abstract_base, abstract_adapters = lora.graph(mc, lc)
    plain = dict(nnx.to_flat_state(model.abstract(mc)[1]))
    out = []
    for i, (path, var) in enumerate(sorted(plain.items(), key=lambda kv: tuple(map(str, kv[0])))):
        shape = var.get_value().shape
        if path[-1] == "scale":
            value = jnp.ones(shape, jnp.float32)
        elif path[-1] == "bias":
            value = jnp.zeros(shape, jnp.float32)
        else:
            value = 0.02 * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), i), shape, jnp.float32)
        if lora.is_projection(path) and lc.base_dtype != "float32":
            st = quant.quantize(value, lc.base_dtype)
            del value
            out.append((path, nnx.Param(st[0])))
            if len(st) > 1:
                out.append((path[:-1] + ("kernel_scale",), nnx.Param(st[1])))
        else:
            out.append((path, nnx.Param(value)))
    base = nnx.from_flat_state(sorted(out, key=lambda kv: tuple(map(str, kv[0]))))
    want = [(a.shape, a.dtype) for a in jax.tree.leaves(abstract_base)]
    assert jax.tree.structure(base) == jax.tree.structure(abstract_base)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(base)] == want
    return graphdef, base, lora.init_adapters(abstract_adapters, 0)


def batch_of(vocab: int):
    import numpy as np
    from jaxsft.batching import make_batch
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(BATCH):
        x = rng.integers(1, vocab, SEQ).astype(np.int32)
        m = np.zeros(SEQ, np.float32)
        m[-SEQ // 4:] = 1  # the answer: the row's last quarter
        examples.append((x, np.roll(x, -1), m))
    batch = make_batch(examples, BATCH, SEQ)
    return batch.replace(answer_at=np.flatnonzero(batch.loss_mask.reshape(-1)).astype(np.int32))


def one(name: str, steps: int, budget_gb: float, remat: str, head_chunk: int | None = None) -> dict:
    """Runs one configuration in this process; returns its figures."""
    import jax
    import numpy as np
    from jaxsft import hostmem, lora, model, parallel
    from jaxsft.config import LoraConfig, TrainConfig
    from jaxsft.steps import TrainState, make_optimizer, make_train_step

    shape, base_dtype = name.split(":")
    mc = model_config(shape)
    lc = LoraConfig(rank=RANK, alpha=2.0 * RANK, base_dtype=base_dtype)
    tc = TrainConfig(batch_size=BATCH, lr=1e-4, warmup_steps=0, remat=remat)
    if head_chunk is not None:
        tc = dataclasses.replace(tc, head_chunk=head_chunk)
    mesh = parallel.one_device_mesh()
    tx = make_optimizer(tc, 1000)
    t = time.perf_counter()
    graphdef, base, adapters = streamed_base(mc, lc)
    frozen = parallel.place(base, parallel.param_shardings(base, mesh))  # as bin/train places it
    del base
    state = TrainState.create(adapters, tx)
    shardings = parallel.state_shardings(state, mesh)
    state = parallel.shard_tree(state, shardings)
    del adapters
    hostmem.trim()  # as bin/train does before its first step
    out = {"config": name, "shape": shape, "base_dtype": base_dtype, "remat": remat, "head_chunk": tc.head_chunk,
           "build_s": time.perf_counter() - t,
           "params": sum(a.size for a in jax.tree.leaves(model.abstract(mc)[1])),
           "base_bytes": sum(a.nbytes for a in jax.tree.leaves(frozen)),
           "state_bytes": sum(a.nbytes for a in jax.tree.leaves(state)),
           "trainable": lora.count(state.params), "batch": f"{BATCH}x{SEQ}"}
    with open("/proc/self/status") as f:
        out["rss_before_step_bytes"] = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
    step = make_train_step(graphdef, tx, tc, mesh, shardings, frozen, lora.combine)
    batch = parallel.host_batch_to_global(batch_of(mc.vocab_size), parallel.batch_sharding(mesh))
    key = jax.random.PRNGKey(0)
    t = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()  # run as it is: calling `step` would compile again
    ma = compiled.memory_analysis()
    out["compile_s"] = time.perf_counter() - t
    out["xla_temp_bytes"], out["xla_argument_bytes"] = ma.temp_size_in_bytes, ma.argument_size_in_bytes
    planned = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    out["xla_planned_bytes"] = planned
    if planned > budget_gb * 2 ** 30:
        out["oom"] = f"XLA plans {planned / 2 ** 30:.1f} GB for the step (over the {budget_gb:g} GB budget): not run"
        return out
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        state, m = compiled(state, batch, key, step.frozen)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    timed = times[1:] or times  # --steps 0: the first step's time (compiled beforehand)
    out.update(first_step_s=times[0], s_per_step=float(np.min(timed)), step_s=timed, loss=float(m["loss"]))
    return out


def command(name: str, steps: int, budget_gb: float, remat: str, head_chunk: int | None = None) -> list[str]:
    chunk = [] if head_chunk is None else ["--head-chunk", str(head_chunk)]
    return [sys.executable, os.path.abspath(__file__), "--one", name, "--steps", str(steps), "--budget-gb",
            str(budget_gb), "--remat", remat] + chunk


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="0.5b:float32,0.5b:bfloat16,0.5b:int8,0.5b:int4,1.5b:int4")
    p.add_argument("--steps", type=int, default=1, help="timed steps after the first one (0: the first one's time)")
    p.add_argument("--remat", default="block", help="train.remat")
    p.add_argument("--head-chunk", type=int, default=None, help="train.head_chunk (default: TrainConfig's)")
    p.add_argument("--budget-gb", type=float, default=None,
                   help="a step XLA plans above this is reported as out of memory, not run (default: the "
                        "memory available now less 1.5 GB, at most 20)")
    p.add_argument("--one", metavar="SHAPE:DTYPE", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.budget_gb is None:
        args.budget_gb = default_budget_gb()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.budget_gb, args.remat, args.head_chunk)))
        return

    print(f"budget: a step XLA plans above {args.budget_gb:g} GB is not run", flush=True)
    results = []
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in args.configs.split(","):
        cmd = command(name, args.steps, args.budget_gb, args.remat, args.head_chunk)
        proc, stdout, stderr, rss = child(cmd, env)
        shown = "PYTHONPATH=. python bench/qlora_memory.py --one " + " ".join(cmd[3:])
        if proc.returncode:
            results.append({"config": name, "error": f"exit {proc.returncode}", "peak_rss_bytes": rss, "command": shown})
            print(f"{name:12s} failed (exit {proc.returncode}, peak RSS {_gb(rss)}): {stderr.strip()[-500:]}  "
                  f"[{shown}]", flush=True)
            continue
        r = json.loads(stdout.strip().splitlines()[-1])
        r.update(peak_rss_bytes=rss, command=shown)
        results.append(r)
        what = (f"{name:12s} head_chunk {r['head_chunk']:<3d} base {_gb(r['base_bytes'])}, state "
                f"{_gb(r['state_bytes'])} | RSS before the step {_gb(r['rss_before_step_bytes'])} | XLA temporaries {_gb(r['xla_temp_bytes'])}, planned "
                f"{_gb(r['xla_planned_bytes'])}")
        if "oom" in r:
            print(f"{what} | OUT OF MEMORY: {r['oom']}  [{shown}]", flush=True)
        else:
            print(f"{what} | peak RSS {_gb(rss)} | {r['s_per_step']:.1f} s/step (first {r['first_step_s']:.1f} s, "
                  f"compile {r['compile_s']:.0f} s) | loss {r['loss']:.4f}  [{shown}]", flush=True)
    f32 = next((r for r in results if r["config"] == "0.5b:float32" and "s_per_step" in r), None)
    for r in results:
        if f32 is not None and r["config"].startswith("0.5b:") and r is not f32 and "s_per_step" in r:
            print(f"{r['config']} / 0.5b:float32: peak RSS {r['peak_rss_bytes'] / f32['peak_rss_bytes']:.1%}, base "
                  f"{r['base_bytes'] / f32['base_bytes']:.1%}, step {r['s_per_step'] / f32['s_per_step']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
