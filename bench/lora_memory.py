#!/usr/bin/env python3
"""Full fine-tuning against LoRA: trainable parameters, checkpoint size on disk, optimizer
state, peak RSS and seconds per step, each variant in a process of its own.

    python bench/lora_memory.py [--shapes seed,100m] [--variants full,lora] [--steps 3]

Shapes: `seed` is configs/seed.yaml's model (d_model 384, 6 layers, 6 heads, d_ff 1536;
vocabulary 1024, about data/'s), batch 8 rows of 256 tokens; `100m` a Llama shape of
110M parameters (d_model 768, 12 layers, 12 heads, d_ff 2048, vocabulary 32000, tied
head), batch 4 rows of 256 tokens. Rows are random tokens with the loss on their last
quarter (the answer), the output head at those positions only, as bin/train runs SFT on one
device. Variants:

    full         every parameter trains (AdamW state for all of them)
    lora         lora.rank 8, alpha 16, all seven projections: the adapter term added beside
                 each projection, the base a constant of the step (jaxsft/lora.py)
    lora-merged  the same adapters folded into the kernels inside the step (W + s A B, then the
                 plain model): what the design sketch proposed; kept to show why it lost
    lora-bf16    lora with the base's projection kernels held in bfloat16 (QLoRA-style), widened to
                 float32 where used: measured, not offered as an option (on CPU it costs memory)
    lora-attn    lora on wq wk wv wo only, and qwix-attn: qwix's LoraProvider (what tunix
                 uses) on the same model; qwix finds no MLP kernel (ops.swiglu reads its
                 kernels inside a custom_vjp), so attention is what both can adapt

The state is placed and stepped as bin/train does (parallel.shard_tree, parallel.place,
steps.make_train_step); peak RSS is the process's maximum resident set after the timed
steps (JAX's own ~0.3 GB and the compiler's included), before any checkpoint is written;
then best/ (parameters or adapters) and latest/ (the full training state) are saved with
checkpoint.RunCheckpoints and measured. The machine is shared with other work: each variant
runs --rounds times, alternating, and s/step is the fastest step of all its rounds (the
median of each round is printed beside it). The last line is a JSON list, one object per
shape and variant.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHAPES = {
    "seed": dict(d_model=384, n_heads=6, n_layers=6, d_ff=1536, vocab_size=1024, batch=8),
    "100m": dict(d_model=768, n_heads=12, n_layers=12, d_ff=2048, vocab_size=32000, batch=4),
}
SEQ = 256


def _dir_bytes(d) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(d) for n in names)


def one(shape: str, variant: str, steps: int, profile: int = 0) -> dict:
    """Runs one variant in this process; returns its figures."""
    import jax
    import numpy as np
    from jaxsft import checkpoint, lora, model, parallel
    from jaxsft.batching import make_batch
    from jaxsft.config import LoraConfig, ModelConfig, TrainConfig
    from jaxsft.parts import keep_trainable
    from jaxsft.steps import TrainState, make_optimizer, make_train_step

    s = SHAPES[shape]
    mc = ModelConfig(vocab_size=s["vocab_size"], max_seq_len=SEQ, d_model=s["d_model"], n_heads=s["n_heads"],
                     n_layers=s["n_layers"], d_ff=s["d_ff"], dropout=0.0)
    tc = TrainConfig(batch_size=s["batch"], lr=1e-4, warmup_steps=0)
    targets = ("wq", "wk", "wv", "wo") if variant.endswith("attn") else LoraConfig().targets
    lc = LoraConfig(rank=8, alpha=16.0, targets=targets)
    mesh = parallel.one_device_mesh()
    tx = make_optimizer(tc, 1000)
    graphdef, params = model.init(mc, 0)
    frozen, combine = None, keep_trainable
    if variant != "full":
        combine = lora.combine
        if variant == "qwix-attn":
            import qwix
            from flax import nnx
            gpt = nnx.merge(graphdef, params)
            gpt = qwix.apply_lora_to_model(gpt, qwix.LoraProvider(module_path=r".*attn.*", rank=lc.rank, alpha=lc.alpha),
                                           np.zeros((1, 8), np.int32), rngs=nnx.Rngs(0))
            graphdef, adapters, params = nnx.split(gpt, nnx.LoRAParam, nnx.Param)
        else:
            graphdef, params, adapters = lora.init(mc, lc, 0, params)
        if variant == "lora-bf16":
            from flax import nnx
            params = nnx.from_flat_state([(p, v.replace(v.get_value().astype("bfloat16")) if p[-1] == "kernel" else v)
                                          for p, v in nnx.to_flat_state(params)])
        if variant == "lora-merged":  # the adapters folded into the kernels inside the step
            graphdef = model.abstract(mc)[0]
            combine = lambda base, ad: lora.merge(base, ad, lc)  # noqa: E731
        frozen, params = params, adapters
        frozen = parallel.place(frozen, parallel.param_shardings(frozen, mesh))  # as bin/train places it
    state = TrainState.create(params, tx)
    shardings = parallel.state_shardings(state, mesh)
    state = parallel.shard_tree(state, shardings)
    del params
    step = make_train_step(graphdef, tx, tc, mesh, shardings, frozen, combine)

    rng = np.random.default_rng(0)
    examples = []
    for _ in range(tc.batch_size):
        x = rng.integers(1, mc.vocab_size, SEQ).astype(np.int32)
        m = np.zeros(SEQ, np.float32)
        m[-SEQ // 4:] = 1  # the answer: the last quarter of the row
        examples.append((x, np.roll(x, -1), m))
    batch = make_batch(examples, tc.batch_size, SEQ)
    batch = batch.replace(answer_at=np.flatnonzero(batch.loss_mask.reshape(-1)).astype(np.int32))
    batch = parallel.host_batch_to_global(batch, parallel.batch_sharding(mesh))
    key = jax.random.PRNGKey(0)
    t = time.perf_counter()
    state, m = step(state, batch, key)
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    times = []  # the machine is shared: the fastest step is the one least disturbed
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, batch, key)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if profile:  # per-op time of `steps` more steps, on stderr (bench/profile_step.py's table)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from profile_step import hlo_shapes, op_table
        trace = tempfile.mkdtemp(prefix="lora_trace_")
        with jax.profiler.trace(trace):
            for _ in range(steps):
                state, m = step(state, batch, key)
                jax.block_until_ready(m)
        text = step.lower(state, batch, key).compile().as_text()
        shapes, totals = hlo_shapes(text), op_table(trace)
        for kind in sorted({n.rsplit(".", 1)[0] for n in totals}, key=lambda k: -sum(
                us for n, us in totals.items() if n.rsplit(".", 1)[0] == k))[:8]:
            print(f"{sum(us for n, us in totals.items() if n.rsplit('.', 1)[0] == kind) / steps / 1e3:9.1f} ms  "
                  f"all {kind}", file=sys.stderr)
        for name, us in totals.most_common(profile):
            print(f"{us / steps / 1e3:9.1f} ms  {name}  {shapes.get(name, '')}", file=sys.stderr)
        open(os.path.join(tempfile.gettempdir(), f"lora_bench_{shape}_{variant}.hlo"), "w").write(text)
        shutil.rmtree(trace, ignore_errors=True)

    n_base = model.count_params(frozen if frozen is not None else state.params)
    out = {"shape": shape, "variant": variant, "params": n_base, "trainable": model.count_params(state.params),
           "opt_state_bytes": sum(x.nbytes for x in jax.tree.leaves(state.opt_state)),
           "peak_rss_bytes": rss, "s_per_step": float(np.min(times)), "median_s": float(np.median(times)),
           "first_step_s": first,
           "loss": float(m["loss"]), "batch": f"{tc.batch_size}x{SEQ}"}
    d = tempfile.mkdtemp(prefix="lora_bench_")
    try:
        ck = checkpoint.RunCheckpoints(d)
        ck.save_best(1, state.params, 1.0)
        ck.save_latest(1, {"state": state, "best_val_loss": np.float32(1.0)})
        ck.close()
        out["best_bytes"], out["latest_bytes"] = _dir_bytes(os.path.join(d, "best")), _dir_bytes(os.path.join(d, "latest"))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return out


def _mb(n):
    return f"{n / 2 ** 20:,.1f} MB"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="seed,100m")
    p.add_argument("--variants", default="full,lora")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first (compiling) one")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of each variant, alternating (each figure: the best round's)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="with --one: print the N ops that took the most time per step (to stderr)")
    p.add_argument("--one", nargs=2, metavar=("SHAPE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.steps, args.profile)))
        return

    results = []
    for shape in args.shapes.split(","):
        for variant in [v for _ in range(args.rounds) for v in args.variants.split(",")]:
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", shape, variant, "--steps",
                                   str(args.steps)], capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{shape} {variant} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{shape:5s} {variant:12s} {r['params'] / 1e6:7.1f}M params, trainable {r['trainable']:>11,} "
                  f"| opt state {_mb(r['opt_state_bytes']):>10s} | best/ {_mb(r['best_bytes']):>10s}, latest/ "
                  f"{_mb(r['latest_bytes']):>10s} | peak RSS {_mb(r['peak_rss_bytes']):>10s} | "
                  f"{r['s_per_step']:.2f} s/step (median {r['median_s']:.2f}, first {r['first_step_s']:.1f} s), batch "
                  f"{r['batch']}", flush=True)
    by = {}
    for r in results:  # per variant: the lowest peak RSS and the fastest step of its rounds
        b = by.setdefault((r["shape"], r["variant"]), dict(r))
        b["peak_rss_bytes"] = min(b["peak_rss_bytes"], r["peak_rss_bytes"])
        b["s_per_step"] = min(b["s_per_step"], r["s_per_step"])
    for shape in args.shapes.split(","):
        full = by.get((shape, "full"))
        for variant in args.variants.split(","):
            r = by.get((shape, variant))
            if full is None or r is None or variant == "full":
                continue
            print(f"{shape} {variant} / full: trainable {r['trainable'] / full['trainable']:.2%}, peak RSS "
                  f"{r['peak_rss_bytes'] / full['peak_rss_bytes']:.1%}, best/ {r['best_bytes'] / full['best_bytes']:.2%}, "
                  f"latest/ {r['latest_bytes'] / full['latest_bytes']:.2%}, step {full['s_per_step'] / r['s_per_step']:.2f}x "
                  f"faster")
    print(json.dumps(list(by.values())))


if __name__ == "__main__":
    main()
