"""Import and fine-tune a ~135M-parameter Llama-format model: time and peak memory.

    python bench/llama_import.py [--dir /tmp/llama135m] [--steps 20] [--batch-size 8]

Builds, once, a model of SmolLM2-135M's shape with transformers (hidden 576, 30 layers,
9 heads, 3 key/value heads, intermediate 1536, vocabulary 49152, tied head, rope_theta
100000; random bf16 weights: nothing is downloaded) and a byte-level BPE tokenizer trained
on data/ (its own <|endoftext|>, <|im_start|>, <|im_end|>; jaxsft adds <|system|>,
<|user|>, <|assistant|>). Then runs bin/train on data/ with model.init_from pointing at
it and prints the wall time, the time bin/train reports for its steps, and the peak RSS
of the training process (needs torch and transformers only to build the model).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(path: str) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    sys.path.insert(0, REPO)
    from jaxsft.data import read_jsonl, row_texts
    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=49152, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(row_texts(read_jsonl(os.path.join(REPO, "data", "train.jsonl"))), trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
                   "eos_token": "<|im_end|>"}, f)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    print(f"built {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"tokenizer {tok.get_vocab_size()} tokens", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/llama135m", help="the Llama-format model (built when absent)")
    p.add_argument("--out", default="/tmp/llama135m-sft", help="the run directory (must not hold a run)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.dir, "config.json")):
        build(args.dir)
    cmd = [sys.executable, os.path.join(REPO, "bin", "train"), "--no-progress",
           "--config", os.path.join(REPO, "configs", "default.yaml"), "--set", f"model.init_from={args.dir}", "--set", f"train.max_steps={args.steps}",
           "--set", f"train.batch_size={args.batch_size}", "--set", "data.test=null", "--set", "train.eval_exact=0",
           "--set", "train.focus_steps=0", "--set", "train.focus_categories=[]", "--set", "train.warmup_steps=5",
           "--set", "train.lr=1e-4", "--set", f"out_dir={args.out}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    out = proc.communicate()[0]
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(out)
    if proc.returncode:
        sys.exit(proc.returncode)
    steps_s = float(re.search(r"done: \d+ steps in (\d+) s", out).group(1))
    print(json.dumps({"model": args.dir, "steps": args.steps, "batch_size": args.batch_size, "wall_s": round(wall, 1),
                      "train_loop_s": steps_s, "startup_import_s": round(wall - steps_s, 1),
                      "peak_rss_mb": round(peak), "load_avg": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
