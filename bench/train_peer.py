#!/usr/bin/env python3
"""jaxsft's train step against the same model in PyTorch (eager), in one run.

    python bench/train_peer.py [--config configs/seed.yaml] [--train ...] [--steps 10] [--rounds 3]
                               [--set train.dtype=bfloat16]

Three variants, timed in alternating blocks of --steps steps, --rounds times:

  jaxsft    the train step on packed rows with the system prompt in every row
            (train.share_prefix=false): the work the peer does, token for token
  torch     the same model in PyTorch (tied embedding, RMSNorm, rotary, SwiGLU, no biases,
            dropout, segment masks so packed rows never see each other, the output head at
            the same answer positions), fed the same token arrays, AdamW with the same
            clipping, torch.set_num_threads(2); float32, or under torch.autocast to bfloat16
            where train.dtype is bfloat16
  bin/train the trainer's own step and batches as configured (prefix shared, answer-only head)

Both start from the same parameters; their losses on the first batch (no dropout) are
printed to show it is one function. Prints s/step, examples/s and useful MFU of each
against a matmul peak in train.dtype measured in the same run (by JAX and by torch, before
and after the timed blocks, the larger counting), and
the ratios; the last line is one JSON object. torch is a benchmark-only dependency.

Then the ceiling (`*_products_alone_*`): the matrix products of each variant's step (forward,
and both products of the backward, of every layer, attention and the head, at the variant's
most common batch shape), each timed alone on contiguous operands and summed, under JAX and
under torch. That is the least a step of that shape can take with these matmul libraries if
every other op (norms, softmax, masks, the optimizer) were free; printed as s/step, as the
useful MFU it would give, and as its ratio to the peer's measured step.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

# torch's OpenMP threads spin while they wait; on a shared (oversubscribed) 2-core machine that
# made the peer's step 7-10x slower (10 s against 1.0 s at load average 7). Passive waiting is
# torch's best case here; it must be set before torch starts its threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_speed import ROOT, matmul_peak, work  # noqa: E402


def best_seconds(run, repeats):
    """The shortest of `repeats` timed calls of run(), after one untimed call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


def torch_peak(n=2048, repeats=10, dtype="float32"):
    """Best n^3 matmul rate under torch, FLOP/s."""
    import torch
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    return 2 * n ** 3 / best_seconds(lambda: a @ b, repeats)


def step_products(mcfg, rows, length, slots):
    """The matrix products of one train step on `rows` packed rows of `length` tokens with the
    output head at `slots` positions: {(batch, m, k, n): count}, forward and both backward
    products (dx, dw) of every linear layer, SwiGLU, the tied head and attention's two
    batched products per layer (one per row and head); the last layer's output projection and
    SwiGLU at the head's positions only, as the model runs them."""
    D, F, V, K = mcfg.d_model, mcfg.d_ff, mcfg.vocab_size, mcfg.head_dim
    HK, GK, N, T = mcfg.n_heads * K, mcfg.kv_heads * K, rows * length, length
    shapes = {}

    def add(batch, m, k, n, count=1):  # the forward (m, k) @ (k, n), its dx and dw products
        for s in ((batch, m, k, n), (batch, m, n, k), (batch, k, m, n)):
            shapes[s] = shapes.get(s, 0) + count

    for d_in, d_out in ((D, HK), (D, GK), (D, GK)):
        add(1, N, d_in, d_out, mcfg.n_layers)
    for d_in, d_out in ((HK, D), (D, F), (D, F), (F, D)):  # the last layer's at the head's positions
        add(1, N, d_in, d_out, mcfg.n_layers - 1)
        add(1, slots, d_in, d_out)
    add(rows * mcfg.n_heads, T, K, T, mcfg.n_layers)  # scores = q k^T
    add(rows * mcfg.n_heads, T, T, K, mcfg.n_layers)  # probs @ v
    add(1, slots, D, V)  # the tied head at the answer positions
    return shapes


def products_time(shapes, dtype="float32", repeats=20):
    """Seconds the products take alone, one after another, summed over `shapes`: {"jax": s,
    "torch": s, "each": {shape: (jax s, torch s)}}. Each product is timed by itself on
    contiguous operands (the best of `repeats`), so this is what the step's matmuls cost with
    no other op between them."""
    import jax
    import torch
    from jaxsft import ops
    bmm = jax.jit(jax.vmap(ops.mm))
    out = {"jax": 0.0, "torch": 0.0, "each": {}}
    for (b, m, k, n), count in shapes.items():
        a = jax.random.normal(jax.random.PRNGKey(0), (b, m, k), dtype)
        c = jax.random.normal(jax.random.PRNGKey(1), (b, k, n), dtype)
        ta, tc = torch.randn(b, m, k, dtype=getattr(torch, dtype)), torch.randn(b, k, n, dtype=getattr(torch, dtype))
        each = (best_seconds(lambda: bmm(a, c).block_until_ready(), repeats),
                best_seconds(lambda: torch.bmm(ta, tc), repeats))
        out["jax"] += each[0] * count
        out["torch"] += each[1] * count
        out["each"][(b, m, k, n)] = each
    return out


def torch_model(mcfg, params):
    """The jaxsft model in eager PyTorch, its weights copied from `params` (nnx.State)."""
    import torch
    import torch.nn.functional as F
    from flax import nnx

    D, H, K = mcfg.d_model, mcfg.n_heads, mcfg.head_dim
    assert mcfg.kv_heads == H and mcfg.tie_embeddings, "the peer covers the seed's shape"
    pure = nnx.to_pure_dict(params)

    def p(x):
        return torch.nn.Parameter(torch.tensor(x.__array__().copy()))

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = p(pure["embed"]["embedding"])  # (V, D)
            self.norm = p(pure["norm"]["scale"])
            self.blocks = torch.nn.ParameterList()
            for i in range(mcfg.n_layers):
                b = pure["blocks"][i]
                self.blocks.extend([p(b["norm1"]["scale"]), p(b["attn"]["wq"]["kernel"]), p(b["attn"]["wk"]["kernel"]),
                                    p(b["attn"]["wv"]["kernel"]), p(b["attn"]["wo"]["kernel"]), p(b["norm2"]["scale"]),
                                    p(b["mlp"]["w1"]["kernel"]), p(b["mlp"]["w3"]["kernel"]), p(b["mlp"]["w2"]["kernel"])])

        def forward(self, inputs, positions, segments, answer_at):  # (B, T) each; answer_at (A,)
            B, T = inputs.shape
            rate, eps = mcfg.dropout if self.training else 0.0, mcfg.norm_eps
            drop = lambda x: F.dropout(x, rate, self.training) if rate else x  # noqa: E731
            norm = lambda x, s: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * s  # noqa: E731
            half = K // 2
            freqs = mcfg.rope_theta ** (-torch.arange(half, dtype=torch.float32) / half)
            angles = positions.float()[..., None] * freqs  # (B, T, K/2)
            cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]

            def rope(x):  # (B, T, H, K)
                x1, x2 = x[..., :half], x[..., half:]
                return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

            causal = torch.ones(T, T, dtype=torch.bool).tril()
            mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
            x = drop(self.embed[inputs])
            w = list(self.blocks)
            for i in range(mcfg.n_layers):
                n1, wq, wk, wv, wo, n2, w1, w3, w2 = w[9 * i:9 * i + 9]
                h = norm(x, n1)
                q = rope((h @ wq).view(B, T, H, K)).transpose(1, 2)
                k = rope((h @ wk).view(B, T, H, K)).transpose(1, 2)
                v = (h @ wv).view(B, T, H, K).transpose(1, 2)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D)
                if i == mcfg.n_layers - 1:  # the rest of the last layer where the head reads, as jaxsft
                    o, x = o.reshape(B * T, D)[answer_at], x.reshape(B * T, D)[answer_at]
                x = x + drop(o @ wo)
                h = norm(x, n2)
                x = x + drop((F.silu(h @ w1) * (h @ w3)) @ w2)
            x = norm(x, self.norm)  # (A, D)
            return x @ self.embed.T  # (A, V)

    return GPT()


def torch_batches(host):
    import torch
    return [dict(inputs=torch.from_numpy(b.inputs).long(), positions=torch.from_numpy(b.positions).long(),
                 segments=torch.from_numpy(b.segments), answer_at=torch.from_numpy(b.answer_at).long(),
                 targets=torch.from_numpy(b.targets.reshape(-1)[b.answer_at]).long(),
                 mask=torch.from_numpy(b.loss_mask.reshape(-1)[b.answer_at])) for b in host]


def torch_loss(net, b):
    import torch.nn.functional as F
    logits = net(b["inputs"], b["positions"], b["segments"], b["answer_at"])
    nll = F.cross_entropy(logits, b["targets"], reduction="none")
    return (nll * b["mask"]).sum() / b["mask"].sum().clamp(min=1.0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs/seed.yaml"))
    p.add_argument("--train", default=os.path.join(ROOT, "../shared/seed-data/custom_sft_train.jsonl"))
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    from jaxsft.cli import huge_pages
    huge_pages()  # as bin/train, bin/chat do (JAXSFT_HUGE_PAGES=0: without, to compare)

    import jax
    import torch
    from jaxsft import parallel, steps
    from jaxsft.config import load_config
    from jaxsft.setup import prepare
    from jaxsft.trainer import Trainer

    torch.set_num_threads(args.threads)
    common = [f"data.train={args.train}", f"data.val={args.train}", "train.focus_steps=0"] + args.set
    base = load_config(args.config, common)
    mesh = parallel.setup(base.mesh)
    quiet = lambda *a, **k: None  # noqa: E731
    dtype = base.train.dtype  # bfloat16: the peer under torch.autocast
    peak_jax, peak_torch = matmul_peak(dtype=dtype), torch_peak(dtype=dtype)
    runs = {}
    for name, extra in (("jaxsft", ["train.share_prefix=false"]), ("bin/train", [])):
        cfg = load_config(args.config, common + extra + [f"out_dir={tempfile.mkdtemp()}/run"])
        trainer = Trainer(prepare(cfg, mesh, log=quiet), mesh, log=quiet, progress=False)
        plan = trainer.setup.plan.main
        host = [plan.batch(s) for s in range(args.steps)]
        for b in {b.inputs.shape: b for b in host}.values():  # compile every shape before timing
            trainer.state, _ = trainer.train_step(trainer.state, parallel.host_batch_to_global(b, trainer.rows),
                                                  trainer.key)
        jax.block_until_ready(trainer.state)
        runs[name] = dict(trainer=trainer, host=host, work=work(host, cfg.model), times=[])
    mcfg = runs["jaxsft"]["trainer"].setup.model_cfg
    host = runs["jaxsft"]["host"]
    assert all(b.prefix is None and b.answer_at is not None for b in host)

    # the same function: both models' loss on the first batch from the same parameters, no dropout
    graphdef, params0 = runs["jaxsft"]["trainer"].setup.init_params()
    net = torch_model(mcfg, params0)
    tb = torch_batches(host)
    net.eval()
    with torch.no_grad():
        loss_torch = float(torch_loss(net, tb[0]))
    s, n = steps.loss_sums(params0, graphdef, host[0])
    loss_jax = float(s / max(float(n), 1.0))
    net.train()
    tc = runs["jaxsft"]["trainer"].setup.cfg.train
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def torch_step(b):
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = torch_loss(net, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), tc.max_grad_norm)
        opt.step()
        return loss

    torch_step(tb[0])  # warm-up
    runs["torch"] = dict(host=host, work=runs["jaxsft"]["work"], times=[])
    loads = []
    for _ in range(args.rounds):
        for name in ("jaxsft", "torch", "bin/train"):
            r = runs[name]
            loads.append(os.getloadavg()[0])
            t0 = time.perf_counter()
            if name == "torch":
                for b in tb:  # tensors made before timing (from_numpy shares the memory)
                    torch_step(b)
            else:
                t = r["trainer"]
                for b in r["host"]:
                    t.state, m = t.train_step(t.state, parallel.host_batch_to_global(b, t.rows), t.key)
                jax.block_until_ready(t.state)
            r["times"].append((time.perf_counter() - t0) / args.steps)
    for name in ("jaxsft", "bin/train"):
        runs[name]["trainer"].close()
    # the peaks again after the timed blocks: on a shared machine one measurement can land in a
    # slow moment, which would inflate every MFU; the larger of the two counts
    peak_jax, peak_torch = max(peak_jax, matmul_peak(dtype=dtype)), max(peak_torch, torch_peak(dtype=dtype))

    rows = base.train.batch_size
    figures = {"config": os.path.basename(args.config), "steps_per_block": args.steps, "rounds": args.rounds,
               "peak_gflops_jax": peak_jax / 1e9, "peak_gflops_torch": peak_torch / 1e9,
               "loss_first_batch_jax": loss_jax, "loss_first_batch_torch": loss_torch,
               "dtype": dtype, "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
               "load_avg": [round(x, 2) for x in loads]}
    peak = max(peak_jax, peak_torch)
    for name in ("jaxsft", "torch", "bin/train"):
        r = runs[name]
        dt = statistics.median(r["times"])
        key = name.replace("/", "_")
        figures[f"{key}_s_per_step"] = dt
        figures[f"{key}_s_per_step_all"] = [round(t, 4) for t in r["times"]]
        figures[f"{key}_examples_per_s"] = rows / dt
        figures[f"{key}_mfu_useful"] = r["work"]["flops"] / args.steps / dt / peak
    figures["peak_gflops"] = peak / 1e9
    figures["ratio_jaxsft_vs_torch"] = figures["torch_s_per_step"] / figures["jaxsft_s_per_step"]
    figures["ratio_bin_train_vs_torch"] = figures["torch_s_per_step"] / figures["bin_train_s_per_step"]
    # the ceiling: each variant's matrix products alone, back to back, at its most common batch
    # shape (bin/train's without the shared prefix's own few tokens): what its step would take
    # if no other op (norms, softmax, masks, the optimizer) cost anything
    for name in ("jaxsft", "bin/train"):
        h = runs[name]["host"]
        shape = max({b.inputs.shape for b in h}, key=lambda s: sum(b.inputs.shape == s for b in h))
        slots = next(len(b.answer_at) for b in h if b.inputs.shape == shape)
        shapes = step_products(mcfg, *shape, slots)
        alone = products_time(shapes, dtype)
        per_step = runs[name]["work"]["flops"] / args.steps
        key = name.replace("/", "_")
        for lib in ("jax", "torch"):
            figures[f"{key}_products_alone_s_{lib}"] = alone[lib]
            figures[f"{key}_products_alone_mfu_{lib}"] = per_step / alone[lib] / peak
        figures[f"{key}_products_alone_ratio_vs_torch"] = figures["torch_s_per_step"] / alone["jax"]
        if name == "jaxsft":
            products = {str(s): [count, *(round(2 * s[0] * s[1] * s[2] * s[3] / t / 1e9, 1) for t in alone["each"][s])]
                        for s, count in shapes.items()}
            figures["jaxsft_products_count_gflops_jax_torch"] = products
    for k, v in figures.items():
        if isinstance(v, dict):  # the products of the identical-work step: (batch, m, k, n)
            print(f"{k:>28}:")
            for shape, (count, g_jax, g_torch) in v.items():
                print(f"{shape:>28}  x{count:<3d} JAX {g_jax:6.1f}  torch {g_torch:6.1f} GFLOP/s")
            continue
        print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
