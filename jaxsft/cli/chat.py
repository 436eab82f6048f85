"""Chat with a trained model.

  bin/chat --checkpoint runs/default "什么是机器学习？"      one answer on stdout
  bin/chat --checkpoint runs/default --file rows.jsonl --out answers.jsonl
  bin/chat --checkpoint runs/default                         interactive (/clear, /system TEXT, /quit)
  bin/chat --checkpoint runs/default --compare runs/base "问题"  base vs SFT answers

Answers are printed as they are decoded. Greedy by default; --temperature > 0
samples (with --top-k, --top-p, --seed).
"""
import argparse
import json
import sys

from ..config import UserError
from ..files import atomic
from . import main_guard


def load(args):
    from ..decode import Generator, Sampling
    gen = Generator.from_run(args.checkpoint, args.system, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size)
    return gen, Sampling(args.temperature, args.top_k, args.top_p)


def warn_unknown(gen, texts):
    unknown = sorted({c for t in texts for c in gen.tok.unknown(t)})
    if unknown:
        print(f"note: {len(unknown)} character(s) not in the vocabulary are read as <unk>: {''.join(unknown[:20])}",
              file=sys.stderr)


def utf8_stdio():
    """UTF-8 in and out whatever the locale; a broken input byte becomes U+FFFD instead of an error."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="replace")


def stream_answer(gen, ids, sampling, seed):
    """Prints the answer to prompt `ids` as it is decoded; returns it. Text goes out in
    whole characters (a byte-level token may hold part of one: tokenizer.stream_text)."""
    from ..tokenizer import stream_text
    chars = []
    for c in stream_text(gen.tok, gen.stream_ids(ids, sampling, seed)):
        chars.append(c)
        sys.stdout.write(c)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(chars)


def compare(gen, sampling, args):
    """The seed's Part 7: the base model continues the raw text, the SFT model answers in ChatML."""
    import numpy as np
    from ..decode import Generator
    base = Generator.from_run(args.compare, "", max_new_tokens=args.max_new_tokens)
    model_cfg, tok = base.cfg, base.tok
    budget = model_cfg.max_seq_len - base.max_new_tokens
    bos = [] if tok.bos_id is None else [tok.bos_id]  # a base without a bos token (Qwen's) has none
    ids = bos + tok.encode(args.question)
    if len(ids) > budget:  # keep <bos> and the end of the text
        ids = bos + ids[len(ids) - budget + len(bos):]
        print("(the text is longer than the base model's context: its start is left out)", file=sys.stderr)
    continuation = tok.decode(base.generate_ids([np.asarray(ids, np.int32)], sampling, args.seed)[0])
    answer = gen.answer([[("user", args.question)]], sampling, args.seed)[0]
    print(f"instruction: {args.question}\n")
    print(f"[base {args.compare}] continues the raw text:\n{args.question}{continuation}\n")
    print(f"[SFT {args.checkpoint}] answers in the chat template:\n{answer}")


COMMANDS = "/clear forgets the conversation, /system TEXT sets the system prompt, /help lists these, /quit leaves."


def interactive(gen, sampling, seed):
    try:
        import readline  # noqa: F401  line editing that knows wide (CJK) characters
    except ImportError:
        pass
    print(f"jaxsft chat. {COMMANDS}", file=sys.stderr)
    history, warned = [], set()
    while True:
        try:
            line = input("你> ")
        except EOFError:
            print(file=sys.stderr)
            return
        line = line.strip()
        if not line:
            print("(please type a question)", file=sys.stderr)
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            gen.system_prompt = line[len("/system"):].strip()
            history = []
            print(f"(system prompt set to {gen.system_prompt!r}; conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/"):  # /help, or a command that does not exist: never sent to the model
            print(f"({'' if line == '/help' else 'unknown command ' + line.split()[0] + '; '}{COMMANDS})",
                  file=sys.stderr)
            continue
        new = set(gen.tok.unknown(line)) - warned
        if new:
            warned |= new
            warn_unknown(gen, ["".join(new)])
        history.append(("user", line))
        ids, truncated = gen.prompt_ids(history)
        if truncated:
            print("(conversation longer than the context: the oldest turns are left out)", file=sys.stderr)
        try:
            answer = stream_answer(gen, ids, sampling, seed)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n(stopped; this turn is forgotten)", file=sys.stderr)
            history.pop()
            continue
        seed += 1
        history.append(("assistant", answer))


@main_guard
def main():
    utf8_stdio()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", help="one question; without it, an interactive prompt")
    p.add_argument("--checkpoint", default="runs/default", help="run directory (default runs/default)")
    p.add_argument("--file", help="JSONL rows whose instruction (or messages) to answer")
    p.add_argument("--out", help="with --file: write each row with its 'answer' here (default stdout)")
    p.add_argument("--system", help="system prompt (default: the one the run was trained with)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="rows decoded together (engine slots) with --file")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", metavar="BASE_DIR",
                   help="also let this base run continue the question's raw text, and print both answers")
    args = p.parse_args()
    if args.max_new_tokens <= 0 or args.batch_size <= 0:
        raise UserError("--max-new-tokens and --batch-size must be positive")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    if args.question is not None and args.file:
        raise UserError("give either a question or --file, not both")
    if args.question is not None and not args.question.strip():
        raise UserError("the question is empty; please ask something")
    if args.compare and args.question is None:
        raise UserError("--compare needs a question, e.g. bin/chat --compare runs/base \"什么是机器学习？\"")

    if args.file:
        from ..data import read_jsonl
        rows = read_jsonl(args.file, need_answer=False)
        gen, sampling = load(args)
        convs = [r.prompt_messages for r in rows]
        warn_unknown(gen, [c for conv in convs for _, c in conv])
        answers = gen.answer(convs, sampling, args.seed)
        lines = []
        for r, a in zip(rows, answers):
            rec = {"line": r.line, "question": r.question, "answer": a}
            if r.expected is not None:
                rec["expected"] = r.expected
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        if args.out:
            with atomic(args.out) as f:
                f.writelines(lines)
            print(f"wrote {len(lines)} answers to {args.out}", file=sys.stderr)
        else:
            sys.stdout.writelines(lines)
        return

    gen, sampling = load(args)
    if args.question is not None:
        warn_unknown(gen, [args.question])
        if args.compare:
            compare(gen, sampling, args)
        else:
            stream_answer(gen, gen.prompt_ids([("user", args.question)])[0], sampling, args.seed)
        return
    interactive(gen, sampling, args.seed)
