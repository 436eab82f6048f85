"""Export a run as a Llama-format model directory that transformers loads as it is:

  bin/export --checkpoint runs/default --out exported/
  python -c 'from transformers import AutoModelForCausalLM, AutoTokenizer; \
             AutoModelForCausalLM.from_pretrained("exported"); AutoTokenizer.from_pretrained("exported")'

Writes config.json (LlamaForCausalLM), model.safetensors, tokenizer.json, tokenizer_config.json
(with a chat template that renders our ChatML and the run's system prompt),
special_tokens_map.json and generation_config.json (eos <|endoftext|>). The best checkpoint
is exported; --out must not exist or be empty.
"""
import argparse
import sys

from . import main_guard


@main_guard
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory")
    p.add_argument("--out", required=True, help="directory to write (new or empty)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="tensor dtype in model.safetensors (default float32)")
    args = p.parse_args()
    from ..hf import export
    files = export(args.checkpoint, args.out, args.dtype)
    print(f"wrote {args.out}: {', '.join(files)}", file=sys.stderr)
