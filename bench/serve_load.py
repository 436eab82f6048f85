#!/usr/bin/env python3
"""Load on a live chat server: N streamed chat completions at each concurrency.

    python bench/serve_load.py --checkpoint runs/default            # starts bin/serve on a free port
    python bench/serve_load.py --url http://127.0.0.1:8000          # a server already running
    python bench/serve_load.py --checkpoint runs/default --concurrency 1 8 32 --requests 128

Questions are the prompts of --data (default data/test.jsonl), in order, greedy. For each
concurrency: requests/s, generated tokens/s (usage.completion_tokens), p50/p95 time to first
token (the first chunk with text) and total latency, errors (a non-200 or a broken stream).
The server is warmed up first; the last line is one JSON object.
"""
import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def start_server(args, log_path, root=ROOT):
    """bin/serve of the tree at `root` on a free port; (process, url, seconds to ready)."""
    cmd = [sys.executable, os.path.join(root, "bin", "serve"), "--checkpoint", args.checkpoint, "--port", "0",
           "--slots", str(args.slots)]
    log = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=root))
    log.close()
    import httpx
    t0, url = time.time(), None
    while time.time() - t0 < 600:
        if proc.poll() is not None:
            sys.exit(f"bin/serve exited:\n{open(log_path, encoding='utf-8').read()}")
        m = url or re.search(r"listening on (http://\S+)", open(log_path, encoding="utf-8").read())
        if m:
            url = url or m.group(1)
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return proc, url, time.time() - t0
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("bin/serve was not ready after 600 s")


async def one(client, url, model, messages, max_tokens):
    """(ttft s, latency s, completion tokens) of one streamed completion; raises on an error."""
    t0 = time.perf_counter()
    ttft, tokens, done = None, None, False
    body = {"model": model, "messages": messages, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if max_tokens:
        body["max_tokens"] = max_tokens
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ev = json.loads(line[6:])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            if ev.get("choices") and ev["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
    if not done or tokens is None:
        raise RuntimeError("the stream ended without usage and [DONE]")
    total = time.perf_counter() - t0
    return (total if ttft is None else ttft), total, tokens


def pct(values, q):
    values = sorted(values)
    return values[min(int(q * len(values)), len(values) - 1)] if values else float("nan")


async def level(url, model, prompts, n, concurrency, max_tokens):
    import httpx
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results, errors = [], []
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        todo = iter(range(n))

        async def worker():
            for i in todo:
                try:
                    results.append(await one(client, url, model, prompts[i % len(prompts)], max_tokens))
                except Exception as e:  # counted, and the first few shown
                    errors.append(repr(e))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    lat = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {"concurrency": concurrency, "requests": n, "ok": len(results), "errors": len(errors),
            "error_samples": errors[:3], "wall_s": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": tokens / wall, "mean_completion_tokens": tokens / max(len(results), 1),
            "ttft_p50_ms": 1000 * pct(ttft, 0.5), "ttft_p95_ms": 1000 * pct(ttft, 0.95),
            "latency_p50_ms": 1000 * pct(lat, 0.5), "latency_p95_ms": 1000 * pct(lat, 0.95)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/default", help="run to serve (ignored with --url)")
    p.add_argument("--url", help="a running server (default: start bin/serve --port 0)")
    p.add_argument("--data", default=os.path.join(ROOT, "data/test.jsonl"), help="questions (JSONL rows)")
    p.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=0, help="per request (default: the server's, up to the context)")
    p.add_argument("--slots", type=int, default=32, help="bin/serve --slots when the bench starts it")
    args = p.parse_args()

    from jaxsft.data import read_jsonl
    rows = read_jsonl(args.data, need_answer=False)
    prompts = [[{"role": r, "content": c} for r, c in row.prompt_messages] for row in rows]

    proc, startup = None, None
    url = args.url
    if not url:
        log_path = os.path.join(ROOT, "bench", "out", "serve_load.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        proc, url, startup = start_server(args, log_path)
        print(f"bin/serve ready in {startup:.1f} s at {url} (log: {os.path.relpath(log_path)})", file=sys.stderr)
    try:
        import httpx
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]  # the name it serves
        # warm-up: every prompt length the questions need is compiled at start-up; this warms the HTTP side
        asyncio.run(level(url, model, prompts, 8, 8, args.max_tokens))
        levels = []
        for c in args.concurrency:
            r = asyncio.run(level(url, model, prompts, args.requests, c, args.max_tokens))
            levels.append(r)
            print(f"concurrency {c:>3}: {r['requests_per_s']:7.2f} req/s  {r['tokens_per_s']:8.1f} tok/s  "
                  f"ttft p50 {r['ttft_p50_ms']:6.1f} ms p95 {r['ttft_p95_ms']:6.1f} ms  "
                  f"latency p50 {r['latency_p50_ms']:7.1f} ms p95 {r['latency_p95_ms']:7.1f} ms  "
                  f"errors {r['errors']}", flush=True)
        health = httpx.get(url + "/health", timeout=30).json()
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=60)
    base = levels[0]["requests_per_s"]
    summary = {"checkpoint": None if args.url else args.checkpoint, "url": url, "startup_s": startup,
               "slots": health.get("slots"), "levels": levels,
               "throughput_vs_first": {str(r["concurrency"]): r["requests_per_s"] / base for r in levels},
               "recompiled_after_warm_up": health.get("compiled_programs") != health.get("compiled_at_ready")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
