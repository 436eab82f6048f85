"""Score trained models: greedy answers to every row of a JSONL file, compared with each
row's `expected` (or `response`, or last assistant turn), and preference accuracy on
preference pairs ({"prompt", "chosen", "rejected"}).

  bin/eval --checkpoint runs/default --data data/test.jsonl
  bin/eval --checkpoint runs/default --data data/test.jsonl --json report.json --show 5
  bin/eval --checkpoint runs/dpo --pairs data/prefs_test.jsonl --json prefs.json
  bin/eval --checkpoint runs/base runs/default runs/dpo --data data/test.jsonl --pairs data/prefs_test.jsonl

One run, --data: exact match, character F1 and mean answer length (characters) per
category and overall; --json writes those figures and every row's answer.

One run, --pairs: preference accuracy, the share of pairs whose chosen answer the run
ranks above the rejected one by implicit reward, log p(answer) - log p_ref(answer) summed
over the answer's tokens, against the run's starting model (a DPO run) or, for any other
run, by raw log-probs (it is its own reference: the output says so); and the mean margin
dpo.beta x (reward chosen - reward rejected). Per category and overall.

Several runs: one table, a column per run: exact match per category, perplexity of the
reference answers, distinct-1/distinct-2 of the greedy answers (--data), preference
accuracy and margin (--pairs). --json writes every run's figures.
"""
import argparse
import sys

from ..config import UserError
from . import main_guard


@main_guard
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=["runs/default"], metavar="RUN",
                   help="run directory, or several to compare (default runs/default)")
    p.add_argument("--data", help="JSONL rows with expected answers")
    p.add_argument("--pairs", help="JSONL preference pairs {prompt, chosen, rejected} (optional system, category)")
    p.add_argument("--json", help="write the figures (and, for one run, every row's answer) to this file")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N rows as instruction / expected / answer")
    p.add_argument("--system", help="system prompt (default: the one each run was trained with)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="rows decoded together (engine slots)")
    args = p.parse_args()
    if not args.data and not args.pairs:
        raise UserError("give --data (rows to answer), --pairs (preference pairs) or both")
    if args.max_new_tokens <= 0 or args.batch_size <= 0:
        raise UserError("--max-new-tokens and --batch-size must be positive")
    if args.show < 0:
        raise UserError("--show must not be negative")
    if args.show and len(args.checkpoint) > 1:
        raise UserError("--show prints one run's answers; give one --checkpoint")

    from .. import evaluate
    from ..datasets_io import read_pairs
    rows = evaluate.read_scored_rows(args.data) if args.data else None  # both files checked before any model
    pairs = read_pairs(args.pairs) if args.pairs else None
    if len(args.checkpoint) > 1:
        _compare(args, rows, pairs)
        return
    report, gen = {"checkpoint": args.checkpoint[0]}, None
    if rows:
        gen = _score(args, rows, report)
    if pairs:
        pref = _preference(args, pairs, None if gen is None else (gen.params, gen.cfg, gen.tok))
        report.update({"pairs": args.pairs, **pref} if not rows else {"pairs": args.pairs, "preference": pref})
    if args.json:
        from ..files import write_json
        write_json(args.json, report)
        print(f"wrote {args.json}", file=sys.stderr)


def _score(args, rows, out: dict):
    """The rows answered and scored: the table printed, the report added to `out`; returns the
    run's Generator."""
    from .. import evaluate
    from ..decode import Generator
    gen = Generator.from_run(args.checkpoint[0], args.system, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size)
    unk = sum(len(gen.tok.unknown(c)) for r in rows for _, c in r.prompt_messages)
    if unk:
        print(f"note: {unk} prompt characters are not in the vocabulary (read as <unk>)", file=sys.stderr)

    print(f"answering {len(rows)} rows of {args.data} ...", file=sys.stderr, flush=True)
    report = evaluate.score_rows(gen, rows)

    for row in report["rows"][: args.show]:
        print(f"instruction: {row['question']}\nexpected:    {row['expected']}\nanswer:      {row['answer']}\n"
              + "-" * 40)
    print(f"{args.checkpoint[0]} on {args.data}: {len(rows)} rows, greedy, max_new_tokens {gen.max_new_tokens}")
    print(evaluate.score_table(report))
    if report["truncated_prompts"] or report["unfinished"]:
        print(f"note: {report['truncated_prompts']} prompts were cut to fit the context; {report['unfinished']} "
              f"answers reached max_new_tokens without <|endoftext|>", file=sys.stderr)
    out.update({"data": args.data, "system_prompt": gen.system_prompt, "max_new_tokens": gen.max_new_tokens, **report})
    return gen


def _preference(args, pairs, restored=None) -> dict:
    """The run's preference figures on the pairs: the table printed, the report returned.
    restored: the run's (params, model config, tokenizer) when already read."""
    from .. import evaluate, preference
    print(f"scoring {len(pairs)} pairs of {args.pairs} ...", file=sys.stderr, flush=True)
    report = preference.report(args.checkpoint[0], pairs, args.system, restored)
    print(f"{args.checkpoint[0]} on {args.pairs}: {report['n']} pairs")
    print(preference.describe(report))
    print(evaluate.preference_table(report))
    if report["dropped"]:
        print(f"note: {report['dropped']} pairs left out: an answer does not fit max_seq_len", file=sys.stderr)
    return report


def _compare(args, rows, pairs) -> None:
    """Every run's figures (compare.run_figures) in one table, a column per run."""
    from .. import evaluate
    from ..compare import run_figures
    figures = []
    for run in args.checkpoint:
        print(f"{run}: answering {len(rows or [])} rows, scoring {len(pairs or [])} pairs ...", file=sys.stderr,
              flush=True)
        figures.append(run_figures(run, rows, pairs, args.system, args.max_new_tokens, args.batch_size))
    print(f"{len(figures)} runs" + (f" on {args.data} (greedy, max_new_tokens {args.max_new_tokens})" if rows else "")
          + (f" and {args.pairs}" if pairs else ""))
    print(evaluate.comparison_table(args.checkpoint, figures))
    if pairs and any(f["preference"]["raw"] for f in figures):
        print("* an SFT run, its own reference: raw log-probs, log p(chosen) > log p(rejected); "
              "a DPO run: rewards against its starting model")
    if args.json:
        from ..files import write_json
        write_json(args.json, {"data": args.data, "pairs": args.pairs, "runs": figures})
        print(f"wrote {args.json}", file=sys.stderr)
