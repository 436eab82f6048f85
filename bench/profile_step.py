#!/usr/bin/env python3
"""Per-op time of the train step: a jax.profiler trace of a few steps, summed by XLA op.

    python bench/profile_step.py [--config configs/seed.yaml] [--train ...] [--steps 5] [--top 25]

Builds the step as bin/train does (setup.prepare, Trainer), warms it up, traces
`--steps` steps and prints the ops that took the most time per step (op time is summed
over the CPU runtime's threads, so it can exceed the wall time).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def op_table(trace_dir):
    """{op name: total microseconds} from the perfetto trace the profiler wrote."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    totals = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e["name"]
        thread = threads.get((e["pid"], e.get("tid")), "")
        if name.startswith(("PjitFunction", "ThunkExecutor", "TfrtCpu", "$")) or "python" in thread.lower():
            continue
        totals[name] += e.get("dur", 0)
    return totals


def hlo_shapes(text):
    """{instruction name: its result shape} from a compiled module's HLO text."""
    found = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.-]+) = (\S+(?: \S+\))?)", text, re.M):
        found.setdefault(m.group(1), m.group(2)[:60])
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs/seed.yaml"))
    p.add_argument("--train", default=os.path.join(ROOT, "../shared/seed-data/custom_sft_train.jsonl"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    from jaxsft.cli import huge_pages
    huge_pages()  # as bin/train, bin/chat do (JAXSFT_HUGE_PAGES=0: without, to compare)

    import jax
    from jaxsft import parallel
    from jaxsft.config import load_config
    from jaxsft.setup import prepare
    from jaxsft.trainer import Trainer

    cfg = load_config(args.config, [f"data.train={args.train}", f"data.val={args.train}",
                                    f"out_dir={tempfile.mkdtemp()}/run", "train.focus_steps=0"] + args.set)
    mesh = parallel.setup(cfg.mesh)
    trainer = Trainer(prepare(cfg, mesh, log=lambda *a, **k: None), mesh, log=lambda *a, **k: None, progress=False)
    step_fn, state, key = trainer.train_step, trainer.state, trainer.key
    batches = [trainer.batch_at(s) for s in range(args.steps)]
    for b in batches:  # compile every shape
        state, _ = step_fn(state, b, key)
    jax.block_until_ready(state)
    out = tempfile.mkdtemp()
    t0 = time.perf_counter()
    with jax.profiler.trace(out, create_perfetto_trace=True):
        for b in batches:
            state, _ = step_fn(state, b, key)
        jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / args.steps
    trainer.close()
    totals = op_table(out)
    total = sum(totals.values())
    text = step_fn.lower(state, batches[0], key).compile().as_text()
    shapes = hlo_shapes(text)
    entry = text[text.index("\nENTRY"):]
    n_ops = len(re.findall(r"^\s+(?:ROOT )?%?[\w.-]+ = ", entry, re.M))
    n_copies = len(re.findall(r"= \S+ copy\(", entry))
    print(f"wall {wall * 1e3:.1f} ms/step (traced), op time {total / args.steps / 1e3:.1f} ms/step, "
          f"compiled step: {n_ops} top-level instructions, {n_copies} copies")
    kinds = collections.Counter()
    for name, us in totals.items():
        kinds[re.sub(r"\.\d+$", "", name)] += us
    print("by kind (ms/step, share, count):")
    for kind, us in kinds.most_common(args.top // 2):
        n = sum(re.sub(r"\.\d+$", "", k) == kind for k in totals)
        print(f"{us / args.steps / 1e3:8.2f} ms  {100 * us / total:5.1f}%  {n:5d}  {kind}")
    print("by op:")
    for name, us in totals.most_common(args.top):
        print(f"{us / args.steps / 1e3:8.2f} ms  {100 * us / total:5.1f}%  {name}  {shapes.get(name, '')}")


if __name__ == "__main__":
    main()
