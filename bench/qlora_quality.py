#!/usr/bin/env python3
"""QLoRA's quality (issue 36): LoRA on the same bin/pretrain base held as float32, int8 and int4
(lora.base_dtype), the same steps, then held-out exact match per category side by side.

    python bench/qlora_quality.py [--pretrain runs/pretrain] [--dtypes float32,int8,int4]
                                  [--out runs/qlora] [--steps 1600] [--reuse]

The recipe is data/README.md's LoRA comparison (configs/sft_from_pretrain.yaml: the curriculum,
packing; LoRA rank 64, alpha 128, lr 1.2e-3, 1600 steps, warmup 50, focus 150). The base is
`--pretrain` (bin/pretrain --config configs/pretrain.yaml is run first when it is missing).
Each run is bin/train in its own process, in --out_<dtype>; --reuse skips a run whose
test_report.json exists. The table reads each run's test_report.json (data/test.jsonl, greedy,
the best checkpoint by validation loss). Exact match is a count of 780 rows: one row is 0.13
points, and different base arithmetic draws a different trajectory, so compare the overall
figure with the spread the float32 recipe has over seeds (bench/README.md), not to the row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], log: str) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode} (log: {log})")
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain", default="runs/pretrain")
    p.add_argument("--dtypes", default="float32,int8,int4")
    p.add_argument("--out", default="runs/qlora", help="each run goes to OUT_<dtype>")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--reuse", action="store_true", help="keep a run whose test_report.json exists")
    args = p.parse_args()
    py = sys.executable
    if not os.path.isdir(os.path.join(ROOT, args.pretrain, "best")):
        print(f"bin/pretrain --config configs/pretrain.yaml --set out_dir={args.pretrain}", flush=True)
        s = run([py, "bin/pretrain", "--config", "configs/pretrain.yaml", "--set", f"out_dir={args.pretrain}",
                 "--no-progress"], os.path.join(ROOT, args.pretrain + ".log"))
        print(f"  {s:.0f} s", flush=True)
    reports = {}
    for dt in args.dtypes.split(","):
        out = f"{args.out}_{dt}"
        report = os.path.join(ROOT, out, "test_report.json")
        cmd = [py, "bin/train", "--config", "configs/sft_from_pretrain.yaml", "--set", f"model.init_from={args.pretrain}",
               "--set", f"out_dir={out}", "--set", "lora.rank=64", "--set", "lora.alpha=128", "--set",
               f"lora.base_dtype={dt}", "--set", f"train.max_steps={args.steps}", "--set", "train.warmup_steps=50",
               "--set", "train.focus_steps=150", "--no-progress"]
        if not (args.reuse and os.path.exists(report)):
            print(" ".join(["bin/train"] + cmd[2:]), flush=True)
            os.makedirs(os.path.dirname(os.path.join(ROOT, out)) or ".", exist_ok=True)
            s = run(cmd, os.path.join(ROOT, out + ".log"))
            print(f"  {s:.0f} s", flush=True)
        with open(report, encoding="utf-8") as f:
            reports[dt] = json.load(f)
        with open(os.path.join(ROOT, out, "metrics.jsonl"), encoding="utf-8") as f:
            vals = [json.loads(line)["val_loss"] for line in f if '"val_loss"' in line]
        reports[dt]["best_val_loss"] = min(vals)

    dts = list(reports)
    cats = list(next(iter(reports.values()))["by_category"])
    print("\n| category | rows | " + " | ".join(f"{d} exact" for d in dts) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in dts) + " |")
    for c in cats:
        n = reports[dts[0]]["by_category"][c]["n"]
        print(f"| {c} | {n} | " + " | ".join(f"{100 * reports[d]['by_category'][c]['exact_match']:.1f}%" for d in dts) + " |")
    print(f"| **all** | {reports[dts[0]]['n']} | "
          + " | ".join(f"**{100 * reports[d]['overall']['exact_match']:.1f}%**" for d in dts) + " |")
    print("| best validation loss | | " + " | ".join(f"{reports[d]['best_val_loss']:.4f}" for d in dts) + " |")
    if "float32" in reports:
        f32 = 100 * reports["float32"]["overall"]["exact_match"]
        for d in dts:
            if d != "float32":
                diff = 100 * reports[d]["overall"]["exact_match"] - f32
                print(f"{d} - float32: {diff:+.1f} points overall" + ("  (target for int8: within 1 point)" if d == "int8" else ""))


if __name__ == "__main__":
    main()
