#!/usr/bin/env python3
"""How much a recipe depends on luck: trains one config on several seeds and prints
each seed's held-out exact match, per category, with the mean and the worst.

    python bench/seeds.py [--config configs/default.yaml] [--seeds 42 7 1 2 3]
                          [--out runs/seeds] [--set key=value ...] [--reuse]

Each seed is one `bin/train --config C --set train.seed=N --set out_dir=OUT/seedN` in a
process of its own (one after the other: they would share the cores otherwise); bin/train
answers `data.test` with the run's best checkpoint and writes test_report.json, which
this script reads. --reuse skips seeds whose test_report.json exists (a rerun after an
interruption; it reads the seed's log too). The seed is the only thing that changes: the data order, the initial
weights and the dropout keys all come from it. Nothing here reads the test split but
bin/train's final scoring.

Prints one line per seed as it finishes, then a markdown table (seeds as rows,
categories as columns, then the mean and the worst), and writes OUT/seeds.json.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def run_seed(config: str, seed: int, out_dir: str, sets: list[str], log_path: str) -> float:
    """bin/train for one seed, its output to log_path; returns the wall seconds."""
    cmd = [sys.executable, os.path.join(ROOT, "bin", "train"), "--config", config, "--no-progress",
           "--set", f"train.seed={seed}", "--set", f"out_dir={out_dir}"]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"error: seed {seed}: bin/train exited {proc.returncode}; see {log_path}")
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs/default.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 1, 2, 3])
    p.add_argument("--out", default=os.path.join(ROOT, "runs/seeds"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every bin/train")
    p.add_argument("--reuse", action="store_true", help="keep the seeds whose test_report.json exists")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    results = []
    for seed in args.seeds:
        run = os.path.join(args.out, f"seed{seed}")
        report_path = os.path.join(run, "test_report.json")
        wall = None
        if not (args.reuse and os.path.isfile(report_path)):
            wall = run_seed(args.config, seed, run, args.set, os.path.join(args.out, f"seed{seed}.log"))
        with open(report_path) as f:
            report = json.load(f)
        # bin/train's last line: "done: N steps in S s, best validation loss L, checkpoint in DIR"
        with open(os.path.join(args.out, f"seed{seed}.log")) as f:
            done = [ln for ln in f if ln.startswith("done: ")][-1]
        m = re.match(r"done: (\d+) steps in (\d+) s, best validation loss ([0-9.]+)", done)
        row = {"seed": seed, "wall_s": wall, "train_s": int(m[2]), "steps": int(m[1]),
               "best_val_loss": float(m[3]), "exact": report["overall"]["exact_match"],
               "by_category": {c: v["exact_match"] for c, v in report["by_category"].items()}}
        results.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)

    cats = sorted({c for r in results for c in r["by_category"]})
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    head = ["seed", "steps", "train s", "best val loss", "exact"] + cats
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([str(r["seed"]), str(r["steps"]), f"{r['train_s']:.0f}",
                                        f"{r['best_val_loss']:.4f}", pct(r["exact"])]
                                       + [pct(r["by_category"].get(c, 0.0)) for c in cats]) + " |")
    for name, agg in (("mean", lambda xs: sum(xs) / len(xs)), ("worst", min)):
        lines.append("| " + " | ".join([f"**{name}**", "", "", "", f"**{pct(agg([r['exact'] for r in results]))}**"]
                                       + [pct(agg([r["by_category"].get(c, 0.0) for r in results])) for c in cats])
                     + " |")
    print("\n".join(lines))
    mean = sum(r["exact"] for r in results) / len(results)
    with open(os.path.join(args.out, "seeds.json"), "w") as f:
        json.dump({"config": args.config, "sets": args.set, "seeds": results, "mean_exact": mean,
                   "worst_exact": min(r["exact"] for r in results)}, f, ensure_ascii=False, indent=1)
    print(f"mean exact {pct(mean)}, worst {pct(min(r['exact'] for r in results))} over {len(results)} seeds")


if __name__ == "__main__":
    main()
