#!/usr/bin/env python3
"""Decoder latency and throughput on the seed's test questions.

    python bench/decode_speed.py [--checkpoint runs/seed] [--test ../shared/seed-data/custom_sft_test.jsonl]

With --checkpoint, answers come from that trained model (they stop at <|endoftext|>);
without it, a randomly initialised model at the seed's config decodes --max-new-tokens
tokens for every prompt (the seed's own chat() always ran 100 steps).
Prints:
  - seconds per answer, one prompt at a time (after compile);
  - `bin/chat --file` on every test row, end to end (process start to exit, compile
    included), as a user runs it (with --checkpoint);
  - the engine on every test row, each decoded (identical prompts too, which
    Generator decodes once): seconds, generated tokens/s, slot occupancy, prefill calls,
    the seconds spent prefilling and decoding, and the prefill's forward GFLOP/s (prompts
    that start with the system prompt prefilled after it, as Generator's engine does);
  - Generator.answer on every row (identical greedy prompts decoded once).
The last line is one JSON object.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="trained run directory (default: random seed-config model)")
    p.add_argument("--test", default=os.path.join(ROOT, "../shared/seed-data/custom_sft_test.jsonl"))
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="engine slots (bin/chat --batch-size)")
    args = p.parse_args()
    from jaxsft.cli import huge_pages
    huge_pages()  # as bin/train, bin/chat do (JAXSFT_HUGE_PAGES=0: without, to compare)

    import dataclasses
    import numpy as np
    from jaxsft import model, runs
    from jaxsft.config import ModelConfig
    from jaxsft.data import read_jsonl, row_texts
    from jaxsft.decode import Generator, Sampling
    from jaxsft.tokenizer import Tokenizer

    rows = read_jsonl(args.test, need_answer=False)
    if args.checkpoint:
        params, mcfg, tok = runs.restore(args.checkpoint)
    else:
        tok = Tokenizer.build(row_texts(rows) + ["你是一个有帮助的AI助手。", "\n"])
        mcfg = dataclasses.replace(ModelConfig(), vocab_size=len(tok))
        _, params = model.init(mcfg, 0)
    gen = Generator(params, mcfg, tok, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    convs = [r.prompt_messages for r in rows]
    unique = list(dict.fromkeys(convs))

    t = time.perf_counter()
    gen.answer(unique[:1])
    compile_single = time.perf_counter() - t
    for c in unique:  # compile every prompt bucket the questions need, so the timed loop compiles nothing
        gen.answer([c])
    times, lengths = [], []
    for c in unique:
        t = time.perf_counter()
        ids = gen.generate_ids([gen.prompt_ids(c)[0]])[0]
        times.append(time.perf_counter() - t)
        lengths.append(len(ids))

    # the engine on every row (no deduplication), after compiling the shapes it needs
    from jaxsft.engine import Engine
    prompts = [gen.prompt_ids(c)[0] for c in convs]
    from jaxsft.chatml import system_prefix
    reqs = gen.requests(prompts, Sampling(), 0)
    eng = Engine(params, mcfg, tok.stop_ids, args.batch_size, tok.pad_id, admit_at=8,  # as Generator builds it
                 prefix=system_prefix(tok, gen.system_prompt), context=gen.context(reqs))
    t = time.perf_counter()
    eng.warm_up([len(p) for p in prompts])
    compile_engine = time.perf_counter() - t
    t = time.perf_counter()
    eng.run(reqs)
    engine_s = time.perf_counter() - t

    t = time.perf_counter()
    answers = gen.answer(convs)
    all_s = time.perf_counter() - t
    chat_file_s = None
    if args.checkpoint:  # what a user waits for: bin/chat --file, process start to exit
        import subprocess
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(ROOT, "bin", "chat"), "--checkpoint", args.checkpoint,
                            "--file", args.test, "--out", os.path.join(tmp, "answers.jsonl"),
                            "--batch-size", str(args.batch_size)], check=True, env=dict(os.environ, PYTHONPATH=ROOT))
            chat_file_s = time.perf_counter() - t
    exact = None
    if args.checkpoint:
        exact = float(np.mean([a == r.expected for a, r in zip(answers, rows)]))
        assert [tok.decode(r.tokens) for r in reqs] == answers  # every row decoded = each distinct prompt once
    st = eng.stats
    figures = {
        "checkpoint": args.checkpoint, "params": model.count_params(params), "unique_questions": len(unique),
        "s_per_answer_median": float(np.median(times)), "s_per_answer_mean": float(np.mean(times)),
        "s_per_answer_max": float(np.max(times)), "mean_answer_tokens": float(np.mean(lengths)),
        "ms_per_token_single": 1000 * float(np.sum(times) / max(np.sum(lengths), 1)),
        "rows": len(convs), "chat_file_s": chat_file_s,
        "engine_s_all_rows": engine_s, "engine_rows_per_s": len(convs) / engine_s,
        "engine_tokens_per_s": st["tokens"] / engine_s, "engine_slot_occupancy": eng.occupancy(),
        "engine_decode_steps": st["decode_steps"], "engine_prefills": st["prefills"],
        "engine_prefill_pad_rows": st["prefill_pad_rows"], "engine_prefill_after_prefix": st["prefill_after_prefix"],
        "engine_prefill_positions": st["prefill_positions"], "engine_prefill_s": st["prefill_s"],
        # forward FLOPs of the positions the prefills computed (no output head: it runs at one
        # position a row), per second of prefill
        "engine_prefill_gflops": st["prefill_positions"] * model.flops_per_token(mcfg, 64, head=False) / 3
        / max(st["prefill_s"], 1e-9) / 1e9,
        "engine_decode_s": st["decode_s"], "engine_ms_per_decode_step": 1e3 * st["decode_s"] / max(st["decode_steps"], 1),
        "engine_compile_s": compile_engine, "engine_context": eng.S,
        "s_all_rows_answer": all_s, "slots": args.batch_size, "compile_s_single": compile_single,
        "exact_match": exact,
    }
    for k, v in figures.items():
        print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
