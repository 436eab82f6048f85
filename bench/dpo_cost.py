"""What a DPO step costs against an SFT step: s/step and peak RSS, full fine-tuning and LoRA.

    python bench/dpo_cost.py [--base runs/default] [--batch-size 16] [--steps 20]

Each configuration runs in its own process (peak RSS is the process's: resource.getrusage) on
runs/default's architecture, from runs/default (bin/train --config configs/default.yaml first),
packed rows of 128 tokens:

    sft  B rows     data/train.jsonl, batch_size B (rows)
    sft  2B rows    the same number of answers as a DPO batch
    dpo  B pairs    data/prefs_train.jsonl (configs/dpo.yaml), batch_size B (pairs: 2B answers)

each with every parameter training and with LoRA rank 8 on every projection. s/step: the mean of
--steps steps, run a second time (the first pass compiles each packed shape); tokens/step: the
non-padding tokens a step reads. DPO also pays, once per run, the
reference pass over every training and validation pair (Trainer set-up, reported as `setup s`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(objective: str, rows: int, lora: bool, steps: int, base: str) -> dict:
    """Runs in the child: the Trainer of one configuration, its steps timed."""
    import resource

    import jax

    from jaxsft import parallel
    from jaxsft.config import load_config
    from jaxsft.setup import prepare
    from jaxsft.trainer import Trainer, quiet

    out = tempfile.mkdtemp(prefix="dpo-cost-")
    sets = [f"model.init_from={base}", f"train.batch_size={rows}", f"out_dir={os.path.join(out, 'run')}",
            "train.max_steps=1000", "train.eval_exact=0", "train.sample_questions=0", "train.pack_len=128"]
    if objective == "sft":
        sets += ["train.focus_steps=0", "train.focus_categories=[]", "data.test=null"]
    if lora:
        sets += ["lora.rank=8", "lora.alpha=16"]
    cfg = load_config(os.path.join(REPO, "configs", "dpo.yaml" if objective == "dpo" else "default.yaml"), sets)
    mesh = parallel.setup(cfg.mesh)
    t0 = time.time()
    trainer = Trainer(prepare(cfg, mesh, log=quiet), mesh, log=quiet, progress=False)
    setup_s = time.time() - t0
    state = trainer.state
    batches = [trainer.batch_at(s) for s in range(steps)]  # prepared outside the timing
    tokens = sum(int((trainer.plan.batch(s).inputs > 0).sum()) for s in range(steps)) / steps
    for b in batches:  # every packed shape compiled before the timing
        state, _ = trainer.train_step(state, b, trainer.key)
    jax.block_until_ready(state)
    t0 = time.time()
    for b in batches:
        state, metrics = trainer.train_step(state, b, trainer.key)
    jax.block_until_ready(state)
    step_s = (time.time() - t0) / steps
    trainer.state = state
    trainer.close()
    return {"step_s": step_s, "setup_s": setup_s, "tokens": tokens, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 2 ** 20}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/default")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--one", nargs=3, metavar=("OBJECTIVE", "ROWS", "LORA"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        objective, rows, lora = args.one
        print(json.dumps(one(objective, int(rows), lora == "lora", args.steps, args.base)))
        return
    if not os.path.isdir(args.base):
        sys.exit(f"{args.base}: no such run (bin/train --config configs/default.yaml first)")
    B = args.batch_size
    cases = [("sft", B, f"{B} rows"), ("sft", 2 * B, f"{2 * B} rows"), ("dpo", B, f"{B} pairs")]
    print(f"{'':5} {'objective':9} {'batch':>9} {'tokens/step':>11} {'s/step':>8} {'setup s':>8} {'peak RSS':>9}")
    for mode in ("full", "lora"):
        for objective, rows, label in cases:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", objective, str(rows), mode,
                   "--steps", str(args.steps), "--base", args.base]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
            if proc.returncode:
                print(f"{mode:5} {objective:9} {label:>9} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{mode:5} {objective:9} {label:>9} {r['tokens']:11.0f} {r['step_s']:8.3f} {r['setup_s']:8.1f} "
                  f"{r['peak_rss_gib']:7.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
