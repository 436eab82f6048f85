#!/usr/bin/env python3
"""bench/serve_load.py on two revisions, side by side: each from its own clone of this
repository, revisions alternating, same checkpoint, same machine.

    python bench/serve_ab.py BEFORE AFTER [--rounds 3] [--checkpoint runs/default]
    python bench/serve_ab.py 2dc4e37 HEAD

For each round and revision: throughput (answer tokens/s) at concurrency 32 and p50 time
to first token at concurrency 1; then the medians and AFTER / BEFORE. Target (issue 34):
both within 5%. Run it on a quiet machine: it measures whatever else the cores are doing too.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--checkpoint", default=os.path.join(ROOT, "runs", "default"))
    p.add_argument("--requests", type=int, default=128)
    args = p.parse_args()
    checkpoint = os.path.abspath(args.checkpoint)
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
            out = subprocess.run([sys.executable, os.path.join(d, "bench", "serve_load.py"), "--checkpoint", checkpoint,
                                  "--concurrency", "1", "32", "--requests", str(args.requests)],
                                 cwd=d, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=d))
            if out.returncode:
                sys.exit(f"{rev}: serve_load.py failed:\n{out.stderr[-2000:]}")
            s = json.loads(out.stdout.strip().splitlines()[-1])
            one, many = s["levels"]
            r = {"tok_s_32": many["tokens_per_s"], "ttft_p50_1": one["ttft_p50_ms"],
                 "errors": one["errors"] + many["errors"]}
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
