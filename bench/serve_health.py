#!/usr/bin/env python3
"""Does one heavy request freeze the server? /health's latency while answers with the largest
stop strings the server allows run, side by side with the same load without stop strings.

    python bench/serve_health.py --checkpoint runs/default      # starts bin/serve on a free port
    python bench/serve_health.py --url http://127.0.0.1:8000

For each case: `--concurrency` streamed answers (greedy, as long as the context allows)
are kept running for `--seconds` while a probe (its own process) asks GET /health every 20 ms; it prints the
probe's p50 / p99 / max latency and the answers' tokens/s. The stop strings are
protocol.MAX_STOP strings of protocol.MAX_STOP_CHARS characters, built from the answers'
own characters so that their starts keep matching the text's end (the hold-back check's
worst case), while never matching whole. Target: p99 <= 50 ms. The last line is JSON.
"""
import argparse
import asyncio
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TARGET_P99_MS = 50.0


def stop_strings(answers, length=None):
    """MAX_STOP strings of MAX_STOP_CHARS (or `length`) characters: the answers' characters,
    each string ending in a character no answer has (so none ever matches whole)."""
    from jaxsft.serve import protocol
    count, length = protocol.MAX_STOP, length or getattr(protocol, "MAX_STOP_CHARS", 64)
    text = "".join(answers)
    out = []
    for i in range(count):
        body = (text[i:] + text) * (length // max(len(text), 1) + 2)
        out.append(body[:length - 1] + "\u2603")
    return out


async def answers_running(url, model, prompts, stop, concurrency, until):
    """Streamed answers, `concurrency` at a time, until time.perf_counter() passes `until`."""
    import httpx
    tokens, errors = [0], []

    async def worker(j):
        async with httpx.AsyncClient(timeout=300) as client:
            i = j
            while time.perf_counter() < until:
                body = {"model": model, "messages": prompts[i % len(prompts)], "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}
                if stop:
                    body["stop"] = stop
                async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                        return
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"usage": {' in line:
                            tokens[0] += json.loads(line[6:])["usage"]["completion_tokens"]
                i += concurrency

    await asyncio.gather(*(worker(j) for j in range(concurrency)))
    return tokens[0], errors


def probe(url, seconds, out):
    """In its own process (the answers' streams keep this one's event loop busy, which would
    count as the server's delay): GET /health every 20 ms for `seconds`; latencies to `out`."""
    import http.client
    host, port = url[len("http://"):].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    lat, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        conn.request("GET", "/health")
        r = conn.getresponse()
        r.read()
        lat.append(time.perf_counter() - t)
        assert r.status == 200, r.status
        time.sleep(0.02)
    out.put(lat)


def pct(values, q):
    values = sorted(values)
    return values[min(int(q * len(values)), len(values) - 1)]


def case(url, model, prompts, stop, concurrency, seconds):
    import multiprocessing
    out = multiprocessing.Queue()
    t0 = time.perf_counter()
    prober = multiprocessing.Process(target=probe, args=(url, seconds, out))
    prober.start()
    tokens, errors = asyncio.run(answers_running(url, model, prompts, stop, concurrency, t0 + seconds))
    wall = time.perf_counter() - t0
    lat = out.get(timeout=120)
    prober.join()
    return {"stop_strings": len(stop), "stop_chars": max(map(len, stop), default=0), "probes": len(lat),
            "health_p50_ms": 1000 * pct(lat, 0.5), "health_p99_ms": 1000 * pct(lat, 0.99),
            "health_max_ms": 1000 * max(lat), "tokens_per_s": tokens / wall, "errors": errors[:3]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/default", help="run to serve (ignored with --url)")
    p.add_argument("--url", help="a running server (default: start bin/serve --port 0)")
    p.add_argument("--data", default=os.path.join(ROOT, "data/test.jsonl"), help="questions (JSONL rows)")
    p.add_argument("--concurrency", type=int, default=32, help="answers running at once")
    p.add_argument("--seconds", type=float, default=20.0, help="per case")
    p.add_argument("--slots", type=int, default=32, help="bin/serve --slots when the bench starts it")
    p.add_argument("--stop-chars", type=int, help="each stop string's length (default: the most the server allows; "
                                                  "longer ones show what a server without the limit does)")
    args = p.parse_args()

    import httpx
    from jaxsft.data import read_jsonl
    from serve_load import start_server
    rows = read_jsonl(args.data, need_answer=False)
    prompts = [[{"role": r, "content": c} for r, c in row.prompt_messages] for row in rows]
    stop = stop_strings([row.expected or "" for row in rows[:50]], args.stop_chars)
    proc, url = None, args.url
    if not url:
        log_path = os.path.join(ROOT, "bench", "out", "serve_health.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        proc, url, startup = start_server(args, log_path)
        print(f"bin/serve ready in {startup:.1f} s at {url}", file=sys.stderr)
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        results = []
        for s in ([], stop):
            r = case(url, model, prompts, s, args.concurrency, args.seconds)
            results.append(r)
            print(f"{args.concurrency} answers, {r['stop_strings']} stop strings of {r['stop_chars']:>3} chars: "
                  f"/health p50 {r['health_p50_ms']:6.1f} ms  p99 {r['health_p99_ms']:6.1f} ms  "
                  f"max {r['health_max_ms']:6.1f} ms  ({r['probes']} probes)  {r['tokens_per_s']:7.1f} tok/s  "
                  f"errors {len(r['errors'])}", flush=True)
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=60)
    worst = results[-1]["health_p99_ms"]
    print(f"target: /health p99 <= {TARGET_P99_MS:.0f} ms with the largest stop strings: {worst:.1f} ms, "
          f"{'met' if worst <= TARGET_P99_MS else 'NOT met'}")
    print(json.dumps({"url": url, "concurrency": args.concurrency, "cases": results, "target_p99_ms": TARGET_P99_MS}))


if __name__ == "__main__":
    main()
