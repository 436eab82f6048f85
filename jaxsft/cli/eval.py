"""Score a trained model: greedy answers to every row of a JSONL file, compared
with each row's `expected` (or `response`, or last assistant turn).

  bin/eval --checkpoint runs/default --data data/test.jsonl
  bin/eval --checkpoint runs/default --data data/test.jsonl --json report.json --show 5

Prints exact match, character F1 and mean answer length (characters) per
category and overall. --json writes those figures and every row's answer.
"""
import argparse
import sys

from ..config import UserError
from . import main_guard


@main_guard
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/default", help="run directory (default runs/default)")
    p.add_argument("--data", required=True, help="JSONL rows with expected answers")
    p.add_argument("--json", help="write the figures and every row's answer to this file")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N rows as instruction / expected / answer")
    p.add_argument("--system", help="system prompt (default: the one the run was trained with)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="rows decoded together (engine slots)")
    args = p.parse_args()
    if args.max_new_tokens <= 0 or args.batch_size <= 0:
        raise UserError("--max-new-tokens and --batch-size must be positive")
    if args.show < 0:
        raise UserError("--show must not be negative")

    from .. import evaluate
    from ..decode import Generator
    from ..files import write_json
    rows = evaluate.read_scored_rows(args.data)
    gen = Generator.from_run(args.checkpoint, args.system, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size)
    system = gen.system_prompt
    unk = sum(len(gen.tok.unknown(c)) for r in rows for _, c in r.prompt_messages)
    if unk:
        print(f"note: {unk} prompt characters are not in the vocabulary (read as <unk>)", file=sys.stderr)

    print(f"answering {len(rows)} rows of {args.data} ...", file=sys.stderr, flush=True)
    report = evaluate.score_rows(gen, rows)

    for row in report["rows"][: args.show]:
        print(f"instruction: {row['question']}\nexpected:    {row['expected']}\nanswer:      {row['answer']}\n"
              + "-" * 40)
    print(f"{args.checkpoint} on {args.data}: {len(rows)} rows, greedy, max_new_tokens {gen.max_new_tokens}")
    print(evaluate.score_table(report))
    if report["truncated_prompts"] or report["unfinished"]:
        print(f"note: {report['truncated_prompts']} prompts were cut to fit the context; {report['unfinished']} "
              f"answers reached max_new_tokens without <|endoftext|>", file=sys.stderr)

    if args.json:
        write_json(args.json, {"checkpoint": args.checkpoint, "data": args.data, "system_prompt": system,
                                        "max_new_tokens": gen.max_new_tokens, **report})
        print(f"wrote {args.json}", file=sys.stderr)
