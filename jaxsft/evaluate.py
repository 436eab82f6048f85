"""Scoring answers against references, and the tables users read: pure functions.

Normalisation: both strings are stripped of leading and trailing whitespace
(str.strip), nothing else: case, inner spaces and punctuation all count.

    exact_match("  黑洞\\n", "黑洞")  -> 1.0
    char_f1("栈后进先出", "栈先进后出") -> 1.0   (same characters, any order)
    char_f1("黑洞", "黑色的洞")        -> 2 * (2/2 * 2/4) / (2/2 + 2/4) = 0.667

char_f1 is SQuAD's token F1 with characters as tokens: the overlap is the
multiset intersection of the two strings' characters, precision = overlap /
len(answer), recall = overlap / len(reference); two empty strings score 1,
one empty string scores 0.
"""
from __future__ import annotations

import math
import unicodedata
from collections import Counter
from typing import Optional, Sequence

NO_CATEGORY = "(none)"  # the by-category key of rows without a category


def normalize(text: str) -> str:
    return text.strip()


def exact_match(answer: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize(answer) == normalize(reference))


def char_f1(answer: str, reference: str) -> float:
    """Harmonic mean of character precision and recall (multiset overlap), in [0, 1]."""
    a, r = normalize(answer), normalize(reference)
    if not a or not r:
        return float(a == r)
    same = sum((Counter(a) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(a), same / len(r)
    return 2 * precision * recall / (precision + recall)


def score_row(answer: str, reference: str) -> dict:
    """{"exact_match", "char_f1", "answer_len"} for one answer (lengths in characters, normalised)."""
    return {"exact_match": exact_match(answer, reference), "char_f1": char_f1(answer, reference),
            "answer_len": len(normalize(answer))}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def aggregate(scores: Sequence[dict], categories: Sequence[str]) -> dict:
    """Per-row scores (from score_row) -> figures overall and per category.

    Returns {"overall": {...}, "by_category": {name: {...}}}, each {...} being
    {"n", "exact_match", "char_f1", "answer_len"} (means over the rows). Rows
    with category "" are counted under NO_CATEGORY; categories are sorted.
    """
    def figures(rows):
        return {"n": len(rows), **{k: _mean([s[k] for s in rows]) for k in ("exact_match", "char_f1", "answer_len")}}

    groups: dict[str, list] = {}
    for s, c in zip(scores, categories, strict=True):
        groups.setdefault(c or NO_CATEGORY, []).append(s)
    return {"overall": figures(list(scores)), "by_category": {c: figures(groups[c]) for c in sorted(groups)}}


def display_width(text: str) -> int:
    """Terminal columns of `text`: wide (CJK) characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text: str, width: int, right: bool = False) -> str:
    """`text` padded with spaces to `width` terminal columns."""
    fill = " " * max(width - display_width(text), 0)
    return fill + text if right else text + fill


def score_table(report: dict) -> str:
    """The compact table bin/eval prints: one line per category, then all rows.

    category   rows  exact  char-F1  answer len
    算术          3  66.7%    0.889        2.0
    all           3  66.7%    0.889        2.0
    """
    head = ["category", "rows", "exact", "char-F1", "answer len"]
    lines = [(c, f) for c, f in report["by_category"].items()] + [("all", report["overall"])]
    cells = [[c, str(f["n"]), f"{100 * f['exact_match']:.1f}%", f"{f['char_f1']:.3f}", f"{f['answer_len']:.1f}"]
             for c, f in lines]
    widths = [max(display_width(r[i]) for r in cells + [head]) for i in range(len(head))]

    def fmt(row):
        return "  ".join(pad(v, w, right=i > 0) for i, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head)] + [fmt(r) for r in cells])


def show_token(text: str) -> str:
    """A token as the mask table shows it: control characters escaped, a space as '␠'."""
    if text == " ":
        return "␠"
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def mask_table(ids: Sequence[int], loss_mask: Sequence[int], itos: Sequence[str],
               nll: Optional[Sequence[float]] = None) -> str:
    """The seed's Part 3 loss-masking table for one example.

    ids (T + 1,): the rendered row (cut to max_seq_len + 1); loss_mask (T,): 1
    where target ids[t + 1] counts in the loss; nll (T,): optional per-token
    loss. Position t reads token ids[t] and is trained to predict ids[t + 1]:

      pos  token         target        loss
        0  <bos>         <|user|>      ✗
        6  <|assistant|> o             ✓
      ...
    positions: 9, counted in the loss: 3 (33.3%)

    With nll, a column of per-token losses and a last line with their mean over
    the counted positions (the row's training loss) and its perplexity.
    """
    T = len(loss_mask)
    assert len(ids) == T + 1, (len(ids), T)
    tokens = [show_token(itos[i]) for i in ids]
    head = ["pos", "token", "target", "loss"] + (["nll"] if nll is not None else [])
    rows = []
    for t in range(T):
        row = [str(t), tokens[t], tokens[t + 1], "✓" if loss_mask[t] else "✗"]
        if nll is not None:
            row.append(f"{nll[t]:.3f}")
        rows.append(row)
    widths = [max(display_width(r[i]) for r in rows + [head]) for i in range(len(head))]
    right = {0, 4}

    def fmt(row):
        return "  ".join(pad(v, w, right=i in right) for i, (v, w) in enumerate(zip(row, widths))).rstrip()

    counted = int(sum(1 for m in loss_mask if m))
    out = [fmt(head)] + [fmt(r) for r in rows]
    out.append(f"positions: {T}, counted in the loss: {counted} ({100 * counted / max(T, 1):.1f}%)")
    if nll is not None:
        mean = sum(n for n, m in zip(nll, loss_mask) if m) / max(counted, 1)
        out.append(f"loss over counted positions: {mean:.4f} (perplexity {math.exp(min(mean, 50.0)):.2f})")
    return "\n".join(out)


def read_scored_rows(path: str) -> list:
    """The rows of a JSONL file to score: each needs a reference answer."""
    from .config import UserError
    from .data import read_jsonl
    rows = read_jsonl(path, need_answer=False)
    for r in rows:
        if r.expected is None:
            raise UserError(f"{path}:{r.line}: no reference answer ('expected', 'response' or a last "
                            f"assistant turn) to score against")
    return rows


def answer_rows(gen, rows):
    """Greedy answers (the engine, fed shortest prompts first so that prompts of one length
    bucket are prefilled together). Returns (answers, how many prompts were cut to fit,
    how many answers hit max_new_tokens)."""
    prompts, truncated = [], 0
    for r in rows:
        ids, cut = gen.prompt_ids(r.prompt_messages)
        prompts.append(ids)
        truncated += cut
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    ids = gen.generate_ids([prompts[i] for i in order])
    answers = [None] * len(rows)
    unfinished = 0
    for i, a in zip(order, ids):
        answers[i] = gen.tok.decode(a)
        unfinished += len(a) >= gen.max_new_tokens  # no <|endoftext|> within the budget
    return answers, truncated, unfinished


def score_rows(gen, rows) -> dict:
    """Answers every row with `gen` (decode.Generator) and scores it against its
    reference: {n, truncated_prompts, unfinished, overall, by_category, rows}, each
    row {line, category, question, expected, answer, exact_match, char_f1, answer_len}."""
    answers, truncated, unfinished = answer_rows(gen, rows)
    scores = [score_row(a, r.expected) for a, r in zip(answers, rows)]
    report = aggregate(scores, [r.category for r in rows])
    return {"n": len(rows), "truncated_prompts": truncated, "unfinished": unfinished, **report,
            "rows": [{"line": r.line, "category": r.category, "question": r.question, "expected": r.expected,
                      "answer": a, **sc} for r, a, sc in zip(rows, answers, scores)]}
