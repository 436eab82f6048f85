#!/usr/bin/env python3
"""Two revisions' servers under the same load, side by side: each revision's bin/serve from its
own clone of this repository, revisions alternating, same checkpoint, same machine, and the
same client for both (this tree's bench/serve_load.py, against each server's URL).

    python bench/serve_ab.py BEFORE AFTER [--rounds 3] [--checkpoint runs/default]
    python bench/serve_ab.py 9d1f022 HEAD --rounds 5

For each round and revision: throughput (answer tokens/s) at concurrency 32 over --requests-32
requests (1,024: some ten seconds of load; 128 requests, about one second, swung ±15% from run
to run) and p50 time to first token at concurrency 1 over --requests-1; then the medians and
AFTER / BEFORE. Target (issue 34): both within 5%. Run it on a quiet machine: it measures
whatever else the cores are doing too.
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile

import serve_load

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def measure(tree: str, args, prompts, log_path: str) -> dict:
    """One round for one revision: its server started, both levels run, the server stopped."""
    proc, url, _ = serve_load.start_server(args, log_path, root=tree)
    try:
        import httpx
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        asyncio.run(serve_load.level(url, model, prompts, 16, 8, 0))  # warms the HTTP side
        one = asyncio.run(serve_load.level(url, model, prompts, args.requests_1, 1, 0))
        many = asyncio.run(serve_load.level(url, model, prompts, args.requests_32, 32, 0))
    finally:
        proc.terminate()
        proc.wait(60)
    return {"tok_s_32": many["tokens_per_s"], "ttft_p50_1": one["ttft_p50_ms"], "errors": one["errors"] + many["errors"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checkpoint", default=os.path.join(ROOT, "runs", "default"))
    p.add_argument("--requests-1", type=int, default=128, help="requests at concurrency 1")
    p.add_argument("--requests-32", type=int, default=1024, help="requests at concurrency 32")
    p.add_argument("--slots", type=int, default=32)
    args = p.parse_args()
    args.checkpoint = os.path.abspath(args.checkpoint)

    from jaxsft.data import read_jsonl
    rows = read_jsonl(os.path.join(ROOT, "data", "test.jsonl"), need_answer=False)
    prompts = [[{"role": r, "content": c} for r, c in row.prompt_messages] for row in rows]
    tmp = tempfile.mkdtemp(prefix="serve_ab-")
    trees = {}
    for rev in (args.before, args.after):
        sha = subprocess.check_output(["git", "-C", ROOT, "rev-parse", rev], text=True).strip()
        d = os.path.join(tmp, sha[:10])
        subprocess.run(["git", "clone", "-q", ROOT, d], check=True)
        subprocess.run(["git", "-C", d, "checkout", "-q", sha], check=True)
        trees[rev] = d
    got = {rev: [] for rev in trees}
    for i in range(args.rounds):
        for rev, d in trees.items():
            r = measure(d, args, prompts, os.path.join(tmp, f"serve-{i}-{os.path.basename(d)}.log"))
            got[rev].append(r)
            print(f"round {i + 1}  {rev:>10}: concurrency 32 {r['tok_s_32']:7.1f} tok/s   concurrency 1 ttft p50 "
                  f"{r['ttft_p50_1']:5.1f} ms   errors {r['errors']}", flush=True)
    med = {rev: {k: statistics.median(x[k] for x in rs) for k in ("tok_s_32", "ttft_p50_1")} for rev, rs in got.items()}
    b, a = med[args.before], med[args.after]
    for rev in trees:
        print(f"median {rev:>10}: concurrency 32 {med[rev]['tok_s_32']:7.1f} tok/s   concurrency 1 ttft p50 "
              f"{med[rev]['ttft_p50_1']:5.1f} ms")
    print(f"after / before: throughput {a['tok_s_32'] / b['tok_s_32']:.3f}, ttft p50 {a['ttft_p50_1'] / b['ttft_p50_1']:.3f} "
          f"(target: throughput >= 0.95, ttft <= 1.05)")
    print(json.dumps({"before": args.before, "after": args.after, "runs": got, "medians": med}))


if __name__ == "__main__":
    main()
