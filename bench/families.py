"""LoRA on real-sized family bases: import, step time, export and peak memory.

    python bench/families.py [--shapes qwen2.5-0.5b llama3.2-1b] [--steps 20] [--batch-size 4]

For each shape, builds once (random weights, bf16 safetensors; nothing is downloaded) a model with
transformers and a small byte-level BPE tokenizer trained on data/ (the model's vocabulary size
stays the shape's: the tokenizer's ids are its first rows):

    qwen2.5-0.5b  Qwen2ForCausalLM: hidden 896, 24 layers, 14 heads / 2 key-value, intermediate 4864,
                  vocabulary 151936, tied, q/k/v biases, rope_theta 1e6 (~494M parameters)
    llama3.2-1b   LlamaForCausalLM: hidden 2048, 16 layers, 32 heads / 8 key-value, intermediate 8192,
                  vocabulary 128256, tied, llama3 rope scaling (factor 32, rope_theta 500000) (~1.24B)

then runs bin/train with model.init_from on it and LoRA rank 8 (every projection) for --steps
steps on a few data/ rows, and bin/export (merged, float32). Prints, per shape: import (from
bin/train's start to its "model:" line: interpreter, JAX, tokenizer, reading the weights, the
model's set-up), s/step (steps 10 to 20, from the times metrics.jsonl gains its records: no
compilation), bin/train's own loop time, bin/export's wall time, and each program's peak RSS
(os.wait4). A shape whose build or training does not fit prints the measured reason.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                         tie_word_embeddings=True, max_position_embeddings=32768,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama3.2-1b": ("LlamaConfig", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                        num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                        tie_word_embeddings=True, max_position_embeddings=131072, head_dim=64,
                                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                         "factor": 32.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192})),
}

BUILD = r'''
import json, os, sys, torch, transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
sys.path.insert(0, sys.argv[1])
from jaxsft.data import read_jsonl, row_texts
path, cls, kw = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
os.makedirs(path, exist_ok=True)
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tok.train_from_iterator(row_texts(read_jsonl(os.path.join(sys.argv[1], "data", "train.jsonl"))), trainer)
tok.save(os.path.join(path, "tokenizer.json"))
with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, f)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(
    getattr(transformers, cls)(bos_token_id=1, eos_token_id=2, **kw), dtype=torch.bfloat16)
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.normal_(0.0, 0.02)
model.save_pretrained(path)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
'''


def measured(cmd, watch=None):
    """Runs cmd (stdout and stderr merged); returns (exit status, output, wall s, peak RSS MiB,
    {line prefix: seconds after the start when the first such line came}). watch: line prefixes."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    seen, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        for w in watch or ():
            if line.startswith(w) and w not in seen:
                seen[w] = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, "".join(lines), time.perf_counter() - start, usage.ru_maxrss / 1024, seen


def watch_metrics(path, marks: dict, stop: threading.Event):
    """Records when metrics.jsonl first holds the record of steps 10 and 20."""
    while not stop.wait(0.2):
        try:
            with open(path, encoding="utf-8") as f:
                steps = [json.loads(line).get("step") for line in f if '"loss"' in line]
        except (OSError, ValueError):
            continue
        for s in (10, 20):
            if s in steps and s not in marks:
                marks[s] = time.perf_counter()


def rows(name, n, d):
    path = os.path.join(d, name)
    with open(os.path.join(REPO, "data", name), encoding="utf-8") as src, open(path, "w", encoding="utf-8") as f:
        f.writelines(src.readline() for _ in range(n))
    return path


def bench(shape: str, args) -> dict:
    src = os.path.join(args.root, shape)
    if not os.path.isfile(os.path.join(src, "config.json")):
        cls, kw = SHAPES[shape]
        code, out, wall, rss, _ = measured([sys.executable, "-c", BUILD, REPO, src, cls, json.dumps(kw)])
        if code:
            return {"shape": shape, "error": f"build failed (exit {code}, peak RSS {rss:.0f} MiB): {out[-400:]}"}
        print(f"{shape}: built in {wall:.0f} s ({out.strip().splitlines()[-1]}), peak RSS {rss:.0f} MiB", flush=True)
    d = tempfile.mkdtemp(prefix=f"bench-{shape}-", dir=args.root)
    run, exported = os.path.join(d, "run"), os.path.join(d, "exported")
    cmd = [sys.executable, os.path.join(REPO, "bin", "train"), "--no-progress",
           "--config", os.path.join(REPO, "configs", "default.yaml"), "--set", f"model.init_from={src}",
           "--set", "model.max_seq_len=128", "--set", "lora.rank=8", "--set", f"train.max_steps={args.steps}",
           "--set", f"train.batch_size={args.batch_size}", "--set", "train.pack_len=0", "--set", "data.test=null",
           "--set", f"data.train={rows('train.jsonl', 200, d)}", "--set", f"data.val={rows('val.jsonl', 8, d)}",
           "--set", "train.eval_exact=0", "--set", "train.sample_questions=0", "--set", "train.focus_steps=0",
           "--set", "train.focus_categories=[]", "--set", "train.warmup_steps=5", "--set", "train.lr=1e-4",
           "--set", f"out_dir={run}"]
    marks, stop = {}, threading.Event()
    watcher = threading.Thread(target=watch_metrics, args=(os.path.join(run, "metrics.jsonl"), marks, stop))
    watcher.start()
    code, out, wall, rss, seen = measured(cmd, watch=("model:", "done:"))
    stop.set()
    watcher.join()
    if code:
        return {"shape": shape, "error": f"bin/train failed (exit {code}, peak RSS {rss:.0f} MiB): {out[-600:]}"}
    loop = float(out.split("done: ")[1].split(" steps in ")[1].split(" s")[0])
    result = {"shape": shape, "import_s": round(seen["model:"], 1), "train_wall_s": round(wall, 1),
              "train_loop_s": loop, "train_peak_rss_mib": round(rss)}
    if 10 in marks and 20 in marks:
        result["s_per_step"] = round((marks[20] - marks[10]) / 10, 2)
    code, out, wall, rss, _ = measured([sys.executable, os.path.join(REPO, "bin", "export"), "--checkpoint", run,
                                        "--out", exported])
    if code:
        return {**result, "error": f"bin/export failed (exit {code}): {out[-400:]}"}
    size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(exported) for n in ns)
    result.update(export_s=round(wall, 1), export_peak_rss_mib=round(rss), export_mb=round(size / 1e6))
    print(out.strip().splitlines()[0] if out.strip() else "", flush=True)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--root", default="/tmp/jaxsft-families", help="where the models and runs go")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    os.makedirs(args.root, exist_ok=True)
    for shape in args.shapes:
        r = bench(shape, args)
        r["load_avg"] = round(os.getloadavg()[0], 2)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
