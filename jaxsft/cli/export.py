"""Export a run as a Llama-format model directory that transformers loads as it is:

  bin/export --checkpoint runs/default --out exported/
  python -c 'from transformers import AutoModelForCausalLM, AutoTokenizer; \
             AutoModelForCausalLM.from_pretrained("exported"); AutoTokenizer.from_pretrained("exported")'

Writes config.json (the class of the run's family: LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM or Qwen3ForCausalLM), model.safetensors, tokenizer.json, tokenizer_config.json
(with a chat template that renders our ChatML and the run's system prompt; a run on a
base's own template: that template and the base's special tokens), special_tokens_map.json
and generation_config.json (eos <|endoftext|>; on a base's own template, the base's file).
The best checkpoint is exported; --out must not exist or be empty.

A LoRA run (lora.rank > 0) is exported merged: W + (alpha/rank) A B. With --adapter it is
exported as a base and a PEFT adapter beside it instead:

  bin/export --checkpoint runs/sft_lora --out exported/ --adapter   # exported/base/, exported/adapter/
  python -c 'from peft import PeftModel; from transformers import AutoModelForCausalLM; \
             PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("exported/base"), "exported/adapter")'
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
    p.add_argument("--adapter", action="store_true",
                   help="a LoRA run: the base (--out/base) and a PEFT adapter (--out/adapter), unmerged")
    args = p.parse_args()
    from ..runs import export
    files = export(args.checkpoint, args.out, args.dtype, args.adapter)
    print(f"wrote {args.out}: {', '.join(files)}", file=sys.stderr)
