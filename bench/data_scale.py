#!/usr/bin/env python3
"""Data preparation at a million rows: a ShareGPT Parquet file through `datasets` (first run,
then cached) against today's JSONL path on the same rows.

    nice python bench/data_scale.py [--rows 1000000] [--dir /tmp/jaxsft_data_scale] [--keep]

Writes --rows rows (data/train.jsonl's, cycled) as ShareGPT Parquet and as jaxsft JSONL, then
runs `setup.prepare` on configs/default.yaml with data.train set to each, every run in a fresh
process (one CPU device) so its peak RSS is its own:

    jsonl          the JSONL read in memory, as before datasets_io (every row a Python object)
    parquet first  the Parquet file with an empty datasets cache: loading, the rows step,
                   the vocabulary and the examples step, all written to the cache
    parquet again  the same, the cache kept: what a second run on the same data pays

Each prints the seconds prepare() took (and its CPU seconds, datasets' map workers included:
on a shared machine the wall time is the CPU time stretched by the others' load), the whole process's seconds (the imports included),
and the peak RSS when prepare() returns, before training would start (the JSON also holds the
RSS at that moment split into private memory, RssAnon, and pages of memory-mapped files and
libraries, RssFile: the Arrow files the examples are read from count there); the table sets them
beside the issue's targets (first preparation <= 60 s, second start <= 5 s, peak RSS <= 2 GB).
The last line is one JSON object of the figures.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TARGETS = {"parquet first": ("prepare_s", 60.0), "parquet again": ("prepare_s", 5.0)}
RSS_TARGET_MB = 2048


def write_data(n: int, out: str) -> tuple[str, str]:
    """n rows of data/train.jsonl (cycled) as out/train.parquet (ShareGPT) and out/train.jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    with open(os.path.join(ROOT, "data", "train.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    role_from = {"system": "system", "user": "human", "assistant": "gpt"}

    def sharegpt(r):
        msgs = r["messages"] if "messages" in r else [{"role": "user", "content": r["instruction"]},
                                                      {"role": "assistant", "content": r["response"]}]
        return {"conversations": [{"from": role_from[m["role"]], "value": m["content"]} for m in msgs],
                "category": r.get("category", ""), "expected": r.get("expected")}
    block = pa.Table.from_struct_array(pa.array([sharegpt(r) for r in rows]))
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    parquet, jsonl = os.path.join(out, "train.parquet"), os.path.join(out, "train.jsonl")
    with pq.ParquetWriter(parquet, block.schema) as w, open(jsonl, "w", encoding="utf-8") as f:
        for start in range(0, n, len(rows)):
            k = min(len(rows), n - start)
            w.write_table(block.slice(0, k))
            f.write(lines if k == len(rows) else "".join(lines.splitlines(keepends=True)[:k]))
    return parquet, jsonl


def worker(train: str, in_memory: bool) -> dict:
    """prepare() on configs/default.yaml with data.train = train; the figures of this process."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, ROOT)
    from jaxsft import datasets_io, parallel
    from jaxsft.config import load_config
    from jaxsft.setup import prepare
    if in_memory:
        datasets_io.ARROW_BYTES = 1 << 62  # every JSONL in memory: jaxsft's path before datasets_io
    cfg = load_config(os.path.join(ROOT, "configs", "default.yaml"),
                      [f"data.train={train}", f"data.val={os.path.join(ROOT, 'data', 'val.jsonl')}",
                       "data.test=null"])
    mesh = parallel.one_device_mesh()
    cpu = _cpu_s()
    t = time.perf_counter()
    s = prepare(cfg, mesh, log=lambda *a, **k: None)
    seconds, cpu = time.perf_counter() - t, _cpu_s() - cpu
    s.plan.batch(0)  # the first batch, from wherever the examples are kept
    status = dict(line.split(":", 1) for line in open("/proc/self/status")) if os.path.exists("/proc/self/status") \
        else {}
    mapped = {k: round(int(status[k].split()[0]) / 1024) for k in ("RssAnon", "RssFile") if k in status}
    return {"prepare_s": round(seconds, 2), "prepare_cpu_s": round(cpu, 1), "rss_now_mb": mapped,
            "examples": len(s.train_examples),
            "kept_in": type(s.train_examples).__name__, "vocab": len(s.tok),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (datasets' map workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_worker(train: str, in_memory: bool, env: dict) -> dict:
    t = time.perf_counter()
    args = [sys.executable, os.path.abspath(__file__), "--worker", train] + (["--in-memory"] if in_memory else [])
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"worker failed:\n{proc.stdout}\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = round(time.perf_counter() - t, 2)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dir", default="/tmp/jaxsft_data_scale", help="where the files and the datasets cache go")
    p.add_argument("--keep", action="store_true", help="keep --dir afterwards")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.in_memory)))
        return

    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    print(f"load average {os.getloadavg()[0]:.1f} at the start")
    t = time.perf_counter()
    parquet, jsonl = write_data(args.rows, args.dir)
    print(f"{args.rows} rows written in {time.perf_counter() - t:.1f} s: {parquet} "
          f"({os.path.getsize(parquet) / 2**20:.0f} MB), {jsonl} ({os.path.getsize(jsonl) / 2**20:.0f} MB)")
    env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(args.dir, "cache"), PYTHONPATH=ROOT)
    results = {"jsonl": run_worker(jsonl, True, env),
               "parquet first": run_worker(parquet, False, env),
               "parquet again": run_worker(parquet, False, env)}
    print(f"\n{'':14s} {'prepare s':>10s} {'cpu s':>7s} {'process s':>10s} {'peak RSS MB':>12s} {'examples':>9s}"
          f"  {'kept in':13s} target")
    for name, r in results.items():
        goal = TARGETS.get(name)
        goal = f"prepare <= {goal[1]:.0f} s, RSS <= {RSS_TARGET_MB} MB" if goal else "(today's path)"
        print(f"{name:14s} {r['prepare_s']:10.1f} {r['prepare_cpu_s']:7.1f} {r['process_s']:10.1f} "
              f"{r['peak_rss_mb']:12d} {r['examples']:9d}  {r['kept_in']:13s} {goal}")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end (cpu s: prepare's CPU time, "
          f"its map workers' included)")
    met = all(results[k][f] <= v for k, (f, v) in TARGETS.items()) and \
        all(results[k]["peak_rss_mb"] <= RSS_TARGET_MB for k in TARGETS)
    print(f"targets {'met' if met else 'NOT met'}")
    print(json.dumps({"rows": args.rows, **{k.replace(' ', '_'): v for k, v in results.items()}, "targets_met": met}))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
