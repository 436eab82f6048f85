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


def exact_by_category(answers: list, rows: list) -> tuple[float, dict]:
    """(exact match over all rows, {category: exact match} of the rows that have one), as the
    trainer records them at each evaluation (val_exact, val_exact_category)."""
    scores = [exact_match(a, r.expected) for a, r in zip(answers, rows)]
    groups: dict = {}
    for s, r in zip(scores, rows):
        if r.category:
            groups.setdefault(r.category, []).append(s)
    return sum(scores) / max(len(scores), 1), {c: sum(groups[c]) / len(groups[c]) for c in sorted(groups)}


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


def distinct_n(answers: Sequence[Sequence], n: int) -> float:
    """Distinct-n of generated answers: the number of different n-grams over the total number of
    n-grams, counted within each answer (none spans two answers) over all of them; 0.0 when there
    are none. An answer is a sequence of units: bin/eval passes the run's tokens (characters, for
    jaxsft's character vocabulary; pieces for an imported BPE tokenizer).

        distinct_n(["abab", "ab"], 1) -> 2 / 6      (a, b, a, b, a, b)
        distinct_n(["abab", "ab"], 2) -> 2 / 4      (ab, ba, ab, ab)
    """
    grams = [tuple(a[i:i + n]) for a in answers for i in range(len(a) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


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


def table(head: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Rows of strings in columns two spaces apart, each as wide as its widest cell in terminal
    columns (`display_width`): the first column left-aligned, the others right-aligned."""
    widths = [max(display_width(r[i]) for r in [head, *cells]) for i in range(len(head))]

    def fmt(row):
        return "  ".join(pad(v, w, right=i > 0) for i, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head)] + [fmt(r) for r in cells])


def score_table(report: dict) -> str:
    """The compact table bin/eval prints: one line per category, then all rows.

    category   rows  exact  char-F1  answer len
    算术          3  66.7%    0.889        2.0
    all           3  66.7%    0.889        2.0
    """
    lines = [(c, f) for c, f in report["by_category"].items()] + [("all", report["overall"])]
    return table(["category", "rows", "exact", "char-F1", "answer len"],
                 [[c, str(f["n"]), f"{100 * f['exact_match']:.1f}%", f"{f['char_f1']:.3f}", f"{f['answer_len']:.1f}"]
                  for c, f in lines])


def preference_table(report: dict) -> str:
    """bin/eval --pairs's table (`preference.report`'s figures): one line per category, then all pairs.

    category  pairs  accuracy  margin
    算术          2     50.0%  -0.125
    all           2     50.0%  -0.125
    """
    lines = list(report["per_category"].items()) + [("all", report)]
    return table(["category", "pairs", "accuracy", "margin"],
                 [[c, str(f["n"]), f"{100 * f['preference_accuracy']:.1f}%", f"{f['margin']:.3f}"]
                  for c, f in lines])


def comparison_table(names: Sequence[str], runs: Sequence[dict]) -> str:
    """bin/eval's table of several runs: a column per run (`names`), a line per figure; the
    figures a run lacks (no rows file, no pairs file) are left out. Each of `runs` may hold
    `by_category` and `overall` (score_rows), `perplexity`, `distinct_1`, `distinct_2` and
    `preference` (preference.report, raw log-probs marked *).

    figure            base    sft
    exact 算术 (2)    0.0%  50.0%
    exact all (2)     0.0%  50.0%
    perplexity      31.200  1.520
    distinct-1       0.500  0.500
    distinct-2       0.750  0.750
    """
    first = runs[0]  # every run scored on the same files: the same categories and counts
    lines = []
    if "overall" in first:
        for c, f in first["by_category"].items():
            lines.append((f"exact {c} ({f['n']})", [f"{100 * r['by_category'][c]['exact_match']:.1f}%" for r in runs]))
        lines.append((f"exact all ({first['overall']['n']})",
                      [f"{100 * r['overall']['exact_match']:.1f}%" for r in runs]))
        lines.append(("perplexity", [f"{r['perplexity']:.3f}" for r in runs]))
        lines += [(f"distinct-{k}", [f"{r[f'distinct_{k}']:.3f}" for r in runs]) for k in (1, 2)]
    if "preference" in first:
        marked = any(r["preference"]["raw"] for r in runs)  # unmarked cells get a space: the digits align
        raw = ["*" if r["preference"]["raw"] else " " if marked else "" for r in runs]
        lines.append((f"preference ({first['preference']['n']} pairs)",
                      [f"{100 * r['preference']['preference_accuracy']:.1f}%{m}" for r, m in zip(runs, raw)]))
        lines.append(("margin", [f"{r['preference']['margin']:.3f}{m}" for r, m in zip(runs, raw)]))
    return "\n".join(line.rstrip() for line in table(["figure", *names], [[label, *cells] for label, cells in lines])
                     .splitlines())


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


def read_scored_rows(path, data=None) -> list:
    """The rows of data files to score (datasets_io.read_rows: a file, glob, list or save_to_disk
    directory; data: the config's data section, for its format and columns): each needs a
    reference answer."""
    from .config import DataConfig, UserError
    from .datasets_io import read_rows
    rows = read_rows(path, data or DataConfig(), need_answer=False)
    for r in rows:
        if r.expected is None:
            raise UserError(f"{r.where or f'{path}:{r.line}'}: no reference answer ('expected', 'response' or a last "
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
