#!/usr/bin/env python3
"""Generate the jaxsft instruction-tuning data set (Chinese, char-level).

Run from anywhere:  python data/generate.py
Writes (next to this script): train.jsonl, val.jsonl, test.jsonl, corpus/*.txt,
prefs_{train,val,test}.jsonl (preference pairs for DPO, built from the rows)
and refreshes the generated sections of README.md (between the markers).

The material is in sources/ beside this script (UTF-8), read at start:
  facts.txt       knowledge facts, one "term|body" a line; the answer is
                  "{term}是{body}。" (at most 25 chars)
  compare.txt     comparison groups, one a line: "name|feature;name|feature;..."
  words.txt       classification words, one "class|word word ..." a line
  templates.json  question forms per category, the prefixes and suffixes they
                  are combined with, the multi-turn prefixes, the corpus's
                  phrasings of a fact
This script holds the rules: answers, held-out splits, sizes and checks.

Pure stdlib, fixed seed (random.Random(1234)), byte-for-byte reproducible:
nothing here iterates over a set/dict in hash order (str hashing is salted
per process), everything that feeds the RNG or the output is sorted/listed.
The order of the RNG calls is part of the output: reordering them changes
every file.

Held-out design (see README.md): val/test use instruction templates that
never occur in train, and for the algorithmic categories also operands
(number pairs, strings, comparison pairs, parity numbers) that never occur in
train.  Knowledge facts and classification words are shared (a model cannot
answer a fact it never saw) but are asked with held-out templates.
"""
import json
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = os.path.join(HERE, "sources")
SEED = 1234
SYSTEM_PROMPT = "你是一个有帮助的AI助手。"
MAX_RENDER = 180          # chars of system + all turns (markers not counted)
MAX_RESPONSE = 40         # chars of any assistant answer
MAX_FACT = 25             # chars of a knowledge answer

CATEGORIES = ["知识问答", "定义", "比较", "判断", "算术", "字符串", "分类", "多轮对话"]
SPLITS = ("train", "val", "test")


def die(msg):
    sys.stderr.write("generate.py: ERROR: " + msg + "\n")
    sys.exit(1)


def read_source(name):
    with open(os.path.join(SOURCES, name), encoding="utf-8") as f:
        return f.read()


def source_lines(name):
    """The non-blank lines of sources/NAME, stripped."""
    return [line.strip() for line in read_source(name).splitlines() if line.strip()]


# --------------------------------------------------------------------------
# Templates.  An instruction template is PREFIX + FORM + SUFFIX.  Per
# category (and per operation inside 算术/字符串) a fixed random set of
# these combinations is held out: val/test use only held-out combinations,
# train only the others, so no val/test template string ever occurs in
# train, while every prefix, form and suffix does (in other combinations).
# --------------------------------------------------------------------------
_T = json.loads(read_source("templates.json"))
PREFIXES, SUFFIXES = _T["prefixes"], _T["suffixes"]
KNOW_FORMS = _T["knowledge"]            # {x}: the term
DEF_FORMS = _T["define"]                # {d}: the definition
CMP_FORMS = _T["compare"]               # {a}, {b}: two items
CMP_SINGLE_FORMS = _T["compare_single"]  # {a}: one item; train only
JUDGE_FORMS = _T["judge"]               # {r}: one of JUDGE_RELS
JUDGE_RELS = _T["judge_relations"]
# {o}: the symbol +/-, {w}: the word 加/减; every form exists for both operations
ARITH_FORMS = _T["arithmetic"]
# (form, op) tuples; the operand is always in quotes “…”: the answer copies it
# from between two fixed marks
STR_FORMS = [(f, op) for op, forms in _T["string"].items() for f in forms]
CLS_FORMS = _T["classify"]              # {w}: the word
PAR_FORMS = _T["parity"]                # {n}: the number
MT_PREFIXES = _T["multi_turn_prefixes"]  # before the 2nd user turn
CORPUS_KNOW_FORMS = _T["corpus_knowledge"]  # {t}: term, {b}: body


def split_templates(name, forms, n_held):
    """All PREFIX+form+SUFFIX combinations of `forms` -> (train, held) template lists.

    `forms` are strings or (string, op) tuples; tuples are grouped by op and
    n_held combinations are held out per op.  The choice uses its own RNG
    seeded by the category name, so it does not depend on anything else.
    """
    rng = random.Random("%d-%s" % (SEED, name))
    groups = {}
    for f in forms:
        groups.setdefault(f[1] if isinstance(f, tuple) else None, []).append(f)
    train, held = [], []
    for op in sorted(groups, key=str):
        combos = []
        for f in groups[op]:
            text = f[0] if isinstance(f, tuple) else f
            for p in PREFIXES:
                for x in SUFFIXES:
                    sep = " " if x and text[-1] not in "？。！" else ""
                    combos.append((p + text + sep + x,) + ((op,) if op is not None else ()))
        pick = set(rng.sample(range(len(combos)), n_held))
        held += [c for i, c in enumerate(combos) if i in pick]
        train += [c for i, c in enumerate(combos) if i not in pick]
    unwrap = (lambda c: c) if isinstance(forms[0], tuple) else (lambda c: c[0])
    return [unwrap(c) for c in train], [unwrap(c) for c in held]


def arith_forms():
    out = []
    for f in ARITH_FORMS:
        out.append((f.replace("{o}", "+").replace("{w}", "加"), "+"))
        out.append((f.replace("{o}", "-").replace("{w}", "减"), "-"))
    return out


KNOW_TRAIN, KNOW_HELD = split_templates("知识问答", KNOW_FORMS, 14)
DEF_TRAIN, DEF_HELD = split_templates("定义", DEF_FORMS, 12)
CMP_TRAIN, CMP_HELD = split_templates("比较", CMP_FORMS, 12)
CMP_SINGLE_TRAIN, _ = split_templates("比较_单", CMP_SINGLE_FORMS, 0)   # all combinations, train only
JUDGE_TRAIN, JUDGE_HELD = split_templates("判断", JUDGE_FORMS, 12)
ARITH_TRAIN, ARITH_HELD = split_templates("算术", arith_forms(), 8)
STR_TRAIN, STR_HELD = split_templates("字符串", STR_FORMS, 4)
CLS_TRAIN, CLS_HELD = split_templates("分类_词", CLS_FORMS, 12)
PAR_TRAIN, PAR_HELD = split_templates("分类_奇偶", PAR_FORMS, 10)

# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------
NUM_MAX = 99               # arithmetic / judgement operands are 0..99
PAR_MAX = 999              # parity numbers 0..999
N_STRINGS = 6000
SIZES = {
    # category: (train, val, test); None = use every candidate
    "知识问答": (3200, 60, 120),
    "定义": (2000, 40, 80),
    "比较": (600, 40, 80),
    "比较_跨组": (1000, 0, 0),    # pairs of items from different groups, train only
    "比较_单": (1000, 0, 0),      # single-item rows, train only
    "判断": (2000, 50, 100),
    "算术": (4000, 60, 120),
    "字符串": (3600, 60, 120),
    "分类_词": (800, 30, 60),
    "分类_奇偶": (800, 20, 40),
    "多轮对话": (1000, 30, 60),
}
STR_TRAIN_WEIGHTS = {"rev": 2, "up": 2, "len": 1, "cnt": 1}
HOLD = {  # (val, test) sizes of held-out operand pools
    "arith_pairs": (150, 300),
    "judge_pairs": (120, 240),
    "strings": (150, 300),
    "parity": (60, 120),
    "cmp_pairs": (10, 20),
}


# --------------------------------------------------------------------------
# Sources: facts, comparison groups, classification words
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Sources:
    """sources/*.txt, parsed and checked; lists keep file order."""
    facts: list     # [(term, body)]
    groups: list    # [[(name, feature)]]: val/test compare only within a group
    feats: dict     # name -> feature, every group
    words: list     # [(word, class)], shared by all splits (templates are held out)


def load_sources():
    facts = parse_facts(source_lines("facts.txt"))
    groups = parse_compare(source_lines("compare.txt"))
    words = parse_words(source_lines("words.txt"))
    return Sources(facts, groups, {n: f for g in groups for n, f in g}, words)


def parse_facts(lines):
    facts = []
    for line in lines:
        term, body = line.split("|")
        facts.append((term, body))
    terms = [t for t, _ in facts]
    bodies = [b for _, b in facts]
    if len(set(terms)) != len(terms):
        die("duplicate fact terms: %s" % sorted(t for t, n in Counter(terms).items() if n > 1))
    if len(set(bodies)) != len(bodies):
        die("duplicate fact bodies")
    for t, b in facts:
        if len(fact_answer(t, b)) > MAX_FACT:
            die("fact answer too long (%d): %s" % (len(fact_answer(t, b)), fact_answer(t, b)))
    return facts


def parse_compare(lines):
    groups = []
    seen = set()
    for line in lines:
        g = []
        for item in line.split(";"):
            name, feat = item.split("|")
            if name in seen:
                die("duplicate comparison item " + name)
            seen.add(name)
            g.append((name, feat))
        groups.append(g)
    bad = [cmp_answer(a, fa, b, fb) for g in groups for a, fa in g for b, fb in g
           if a != b and len(cmp_answer(a, fa, b, fb)) > MAX_RESPONSE]
    if bad:
        die("comparison answers too long: %s" % bad)
    return groups


def parse_words(lines):
    words = []
    for line in lines:
        cls, ws = line.split("|")
        words += [(w, cls) for w in ws.split()]
    if len(set(w for w, _ in words)) != len(words):
        die("duplicate classification word")
    return words


# --------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------
def fact_answer(term, body):
    return "%s是%s。" % (term, body)


def cmp_answer(a, fa, b, fb):
    return "%s%s，%s%s。" % (a, fa, b, fb)


def arith(a, b, op, slip=(0, 0), carry=True):
    """The worked answer: the operands restated, then units column first
    (a, b in 0..99; for "-", a >= b):
    27+15：个位7+5=12，十位2+1+1=4，得42。  /  85-49：个位15-9=6，十位8-4-1=3，得36。
    Every step is a one-digit fact or a copy, so a held-out pair needs no
    table entry that train lacks; restating the operands first puts the digits
    each step copies at a fixed spot in the answer, whatever the question's wording.

    The rejected answers of prefs (wrong_arith) are worked the same way with
    one slip, every later step consistent with it: slip=(u, t) adds u to the
    units result and t to the tens result, carry=False drops the carry/borrow:
    27+15：个位7+5=12，十位2+1+0=3，得32。"""
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    if op == "+":
        s0 = a0 + b0 + slip[0]
        c = s0 // 10 if carry else 0
        s1 = a1 + b1 + c + slip[1]
        return "%d+%d：个位%d+%d=%d，十位%d+%d+%d=%d，得%d。" % (a, b, a0, b0, s0, a1, b1, c, s1,
                                                           10 * s1 + s0 % 10)
    borrow = int(a0 < b0)
    d0 = a0 + 10 * borrow - b0 + slip[0]
    c = borrow if carry else 0
    d1 = a1 - b1 - c + slip[1]
    return "%d-%d：个位%d-%d=%d，十位%d-%d-%d=%d，得%d。" % (a, b, a0 + 10 * borrow, b0, d0,
                                                       a1, b1, c, d1, 10 * d1 + d0)


def judge(a, b, r, turned=False):
    """The operands restated, tens digits first, units only on a tie, then the
    true relation, the relation the question claims, and the verdict:
    62和25：十位6>2，所以62大于25；问的是大于，对。
    43和47：十位4=4，个位3<7，所以43小于47；问的是大于，不对。

    turned=True is the rejected answer of prefs: every comparison turned
    around, so the verdict flips with it (62和25：十位6<2，所以62小于25；问的是大于，不对。);
    a tie (a == b) has nothing to turn and flips only the verdict."""
    def sym(x, y):
        x, y = (y, x) if turned else (x, y)
        return ">" if x > y else ("<" if x < y else "=")
    truth = {">": "大于", "<": "小于", "=": "等于"}[sym(a, b)]
    work = "十位%d%s%d，" % (a // 10, sym(a // 10, b // 10), b // 10)
    if a // 10 == b // 10:
        work += "个位%d%s%d，" % (a % 10, sym(a % 10, b % 10), b % 10)
    right = (truth == r) != (turned and a == b)
    return "%d和%d：%s所以%d%s%d；问的是%s，%s。" % (a, b, work, a, truth, b, r, "对" if right else "不对")


def str_op(s, op, c):
    """The bare result of a string operation: what str_answer quotes."""
    if op == "rev":
        return s[::-1]
    if op == "len":
        return str(len(s))
    if op == "cnt":
        return str(s.count(c))
    return s.upper()


def str_answer(s, op, c, result=None):
    """The answer restates the quoted operand, so every letter of the result is
    copied from a fixed spot nearby instead of being found in a question whose
    wording varies:
    “abc”倒过来是“cba”。  “abc”的大写是“ABC”。  “abc”有3个字母。  “abca”中有2个a。
    `result` replaces the right result (the rejected answers of prefs)."""
    r = str_op(s, op, c) if result is None else result
    if op == "rev":
        return "“%s”倒过来是“%s”。" % (s, r)
    if op == "up":
        return "“%s”的大写是“%s”。" % (s, r)
    if op == "len":
        return "“%s”有%s个字母。" % (s, r)
    return "“%s”中有%s个%s。" % (s, r, c)


def parity(n, flip=False):
    """The number restated, its units digit, the verdict: 96的个位是6，是偶数。
    The units digit is a copy from a fixed spot; its parity is one of 10 facts.
    flip=True gives the other verdict (the rejected answer of prefs)."""
    return "%d的个位是%d，是%s。" % (n, n % 10, "偶数" if (n % 2 == 0) != flip else "奇数")


# --------------------------------------------------------------------------
# Operand pools: per split, the operands it may use
# --------------------------------------------------------------------------
def split_pool(rng, items, n_val, n_test):
    items = list(items)
    rng.shuffle(items)
    return items[n_val + n_test:], items[:n_val], items[n_val:n_val + n_test]


def string_pool(rng):
    strings, seen = [], set()
    while len(strings) < N_STRINGS:
        s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        # no string in the pool is the reverse of another one, so a held-out
        # string never shows up as the answer of a train reversal either
        if s not in seen and s[::-1] not in seen:
            seen.add(s)
            strings.append(s)
    return strings


def compare_pools(rng, groups):
    """(train, val, test) pairs within a group.  Hold out only from groups with
    >= 3 items, and keep every item in at least one train pair."""
    cmp_pairs = [tuple(sorted((g[i][0], g[j][0])))
                 for g in groups for i in range(len(g)) for j in range(i + 1, len(g))]
    big = [p for g in groups if len(g) >= 3
           for p in cmp_pairs if p[0] in dict(g) and p[1] in dict(g)]
    rng.shuffle(big)
    need = sum(HOLD["cmp_pairs"])
    held, deg = [], Counter(n for p in cmp_pairs for n in p)
    for p in big:
        if len(held) == need:
            break
        if deg[p[0]] > 1 and deg[p[1]] > 1:
            held.append(p)
            deg[p[0]] -= 1
            deg[p[1]] -= 1
    if len(held) < need:
        die("could not hold out enough comparison pairs")
    held_set = set(held)
    return ([p for p in cmp_pairs if p not in held_set],
            held[:HOLD["cmp_pairs"][0]], held[HOLD["cmp_pairs"][0]:])


def cross_group_pairs(groups):
    """Pairs of items from different groups (train only): thousands of pairings,
    each seen about once, so an answer has to be put together from the two
    items' features, not recalled whole."""
    group_of = {n: i for i, g in enumerate(groups) for n, _ in g}
    names = sorted(group_of)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if group_of[a] != group_of[b]]


def operand_pools(rng, groups):
    """split -> {ar, ju, pa, st, cm, cross}: arithmetic and judgement number
    pairs, parity numbers, strings, comparison pairs within and across groups.
    The val and test pools are disjoint from train and from each other."""
    all_pairs = [(a, b) for a in range(NUM_MAX + 1) for b in range(a, NUM_MAX + 1)]
    ar = split_pool(rng, all_pairs, *HOLD["arith_pairs"])
    ju = split_pool(rng, all_pairs, *HOLD["judge_pairs"])
    pa = split_pool(rng, range(PAR_MAX + 1), *HOLD["parity"])
    st = split_pool(rng, string_pool(rng), *HOLD["strings"])
    cm = compare_pools(rng, groups)
    cross = (cross_group_pairs(groups), [], [])
    return {split: dict(ar=ar[i], ju=ju[i], pa=pa[i], st=st[i], cm=cm[i], cross=cross[i])
            for i, split in enumerate(SPLITS)}


# --------------------------------------------------------------------------
# Candidate builders.  Each candidate: (instruction, response, meta)
# meta = (subtype, key, template)   key = operand identity for leakage checks
# --------------------------------------------------------------------------
def few(rng, templates, k):
    """k templates drawn at random (all of them when k is None): keeps the
    train candidate lists small when there are many templates per operand."""
    return list(templates) if k is None else rng.sample(list(templates), k)


def cands_knowledge(facts, templates):
    return [(t.format(x=term), fact_answer(term, body), ("fact", term, t))
            for term, body in facts for t in templates]


def cands_define(facts, templates):
    return [(t.format(d=body), term, ("fact", term, t))
            for term, body in facts for t in templates]


def cands_compare(pairs, feats, templates, singles=(), rng=None, k=None):
    out = []
    for x, y in pairs:
        for a, b in ((x, y), (y, x)):
            for t in (templates if k is None else few(rng, templates, k)):
                out.append((t.format(a=a, b=b), cmp_answer(a, feats[a], b, feats[b]),
                            ("pair", tuple(sorted((a, b))), t)))
    for a in singles:
        for t in CMP_SINGLE_TRAIN:
            out.append((t.format(a=a), "%s%s。" % (a, feats[a]), ("single", a, t)))
    return out


def cands_judge(rng, pairs, templates, k=None):
    out = []
    for x, y in pairs:
        for a, b in ((x, y), (y, x)) if x != y else ((x, y),):
            for r in JUDGE_RELS:
                for t in few(rng, templates, k):
                    out.append((t.format(a=a, b=b, r=r), judge(a, b, r),
                                ("pair", (x, y), t)))
    return out


def cands_arith(rng, pairs, templates, k=None):
    out = []
    for x, y in pairs:
        for t, op in (few(rng, [t for t in templates if t[1] == "+"], k)
                      + few(rng, [t for t in templates if t[1] == "-"], k)):
            if op == "+":
                orders = ((x, y), (y, x)) if x != y else ((x, y),)
            else:
                orders = ((max(x, y), min(x, y)),)
            for a, b in orders:
                out.append((t.format(a=a, b=b), arith(a, b, op),
                            ("add" if op == "+" else "sub", (x, y), t)))
    return out


def cands_string(rng, strings, templates, k=None):
    out = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    ops = sorted(set(op for _, op in templates))
    for s in strings:
        for t, op in [t for o in ops for t in few(rng, [t for t in templates if t[1] == o], k)]:
            c = ""
            if op == "cnt":
                if rng.random() < 0.8:
                    c = rng.choice(s)
                else:
                    c = rng.choice([ch for ch in letters if ch not in s])
            out.append((t.format(s=s, c=c), str_answer(s, op, c), (op, s, t)))
    return out


def cands_classify(words, templates):
    return [(t.format(w=w), cls, ("word", w, t)) for w, cls in words for t in templates]


def cands_parity(nums, templates):
    return [(t.format(n=n), parity(n), ("parity", n, t)) for n in nums for t in templates]


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    """What build() makes."""
    splits: dict    # split -> [(row, meta)], shuffled
    pools: dict     # split -> the operands it used (see operand_pools)


def take(rng, cands, n, used=None):
    """Sample n candidates with distinct instructions (deterministic)."""
    cands = list(cands)
    rng.shuffle(cands)
    out, seen = [], set() if used is None else used
    for c in cands:
        if n is not None and len(out) >= n:
            break
        if c[0] in seen:
            continue
        seen.add(c[0])
        out.append(c)
    if n is not None and len(out) < n:
        die("not enough candidates: wanted %d got %d" % (n, len(out)))
    return out


def take_balanced(rng, cands, n, weights=None):
    """Like take(), but split n over the subtypes (meta[0], in sorted order):
    evenly, or in proportion to weights[subtype]."""
    kinds = sorted(set(c[2][0] for c in cands))
    w = [1 if weights is None else weights[k] for k in kinds]
    sizes = [n * wk // sum(w) for wk in w]
    for i in range(n - sum(sizes)):
        sizes[i] += 1
    out = []
    for k, nk in zip(kinds, sizes):
        out += take(rng, [c for c in cands if c[2][0] == k], nk)
    rng.shuffle(out)
    return out


def seed_row(cat, c):
    instr, resp, meta = c
    return {"instruction": instr, "response": resp, "category": cat, "expected": resp}, meta


def candidates(rng, split, P, src):
    """Category key -> every candidate of one split: the train templates for
    train, the held-out ones for val/test.  Train draws 3 random templates per
    operand (all of them for val/test).  The key order is the RNG order."""
    tr = split == "train"
    k = 3 if tr else None
    return {
        "知识问答": cands_knowledge(src.facts, KNOW_TRAIN if tr else KNOW_HELD),
        "定义": cands_define(src.facts, DEF_TRAIN if tr else DEF_HELD),
        "比较": cands_compare(P["cm"], src.feats, CMP_TRAIN if tr else CMP_HELD),
        "比较_跨组": cands_compare(P["cross"], src.feats, CMP_TRAIN, rng=rng, k=1),
        "比较_单": cands_compare([], src.feats, (), singles=sorted(src.feats) if tr else ()),
        "判断": cands_judge(rng, P["ju"], JUDGE_TRAIN if tr else JUDGE_HELD, k),
        "算术": cands_arith(rng, P["ar"], ARITH_TRAIN if tr else ARITH_HELD, k),
        "字符串": cands_string(rng, P["st"], STR_TRAIN if tr else STR_HELD, k),
        "分类_词": cands_classify(src.words, CLS_TRAIN if tr else CLS_HELD),
        "分类_奇偶": cands_parity(P["pa"], PAR_TRAIN if tr else PAR_HELD),
    }


def shared_rows(rng, key, cands):
    """Rows of a category whose operands all splits share (facts, words):
    val and test draw from one shuffled list so no row is in both."""
    cat = key.split("_")[0]
    out = {"train": [seed_row(cat, c) for c in take(rng, cands["train"][key], SIZES[key][0])]}
    used = set()
    for si, split in ((1, "val"), (2, "test")):
        out[split] = [seed_row(cat, c) for c in take(rng, cands[split][key], SIZES[key][si], used)]
    return out


def held_out_rows(rng, key, cands):
    """Rows of a category whose operands are held out per split."""
    cat = key.split("_")[0]
    out = {}
    for si, split in enumerate(SPLITS):
        cs, n = cands[split][key], SIZES[key][si]
        if key == "算术" or (key == "字符串" and split != "train"):
            rows = take_balanced(rng, cs, n)
        elif key == "字符串":   # copying (rev, up) is learned slowest: twice the rows
            rows = take_balanced(rng, cs, n, STR_TRAIN_WEIGHTS)
        else:
            rows = take(rng, cs, n)
        out[split] = [seed_row(cat, c) for c in rows]
    return out


def multi_turn_rows(rng, cands, n):
    """n two-turn dialogues of one split: a knowledge-ish question, then an
    algorithmic one; about half start with the system prompt."""
    first_keys = ["知识问答", "定义", "比较"]
    second_keys = ["算术", "字符串", "判断", "分类_词", "分类_奇偶"]
    seen = set()
    rows = []
    while len(rows) < n:
        c1 = rng.choice(cands[rng.choice(first_keys)])
        c2 = rng.choice(cands[rng.choice(second_keys)])
        prefix = rng.choice(MT_PREFIXES)
        msgs = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": SYSTEM_PROMPT})
        msgs += [{"role": "user", "content": c1[0]},
                 {"role": "assistant", "content": c1[1]},
                 {"role": "user", "content": prefix + c2[0]},
                 {"role": "assistant", "content": c2[1]}]
        key = json.dumps(msgs, ensure_ascii=False)
        if key in seen:
            continue
        seen.add(key)
        rows.append(({"messages": msgs, "category": "多轮对话", "expected": c2[1]},
                     ("multi", (c1[2], c2[2]), None)))
    return rows


def build(rng, src):
    """The rows of all three splits.  Each step below draws from rng, so their
    order (and the order inside each) is what the committed files depend on."""
    pools = operand_pools(rng, src.groups)
    cands = {split: candidates(rng, split, pools[split], src) for split in SPLITS}
    splits = {split: [] for split in SPLITS}
    parts = ([shared_rows(rng, key, cands) for key in ("知识问答", "定义", "分类_词")]
             + [held_out_rows(rng, key, cands) for key in
                ("比较", "比较_跨组", "比较_单", "判断", "算术", "字符串", "分类_奇偶")])
    for part in parts:
        for split in SPLITS:
            splits[split] += part[split]
    for si, split in enumerate(SPLITS):
        splits[split] += multi_turn_rows(rng, cands[split], SIZES["多轮对话"][si])
    for split in SPLITS:
        rng.shuffle(splits[split])
    return Dataset(splits, pools)


# --------------------------------------------------------------------------
# Corpus (train operands only; facts are shared).  One function per file,
# called in a fixed order: each draws from the same RNG.
# --------------------------------------------------------------------------
def paragraphs(rng, sents, k_lo, k_hi):
    """The sentences joined into lines of k_lo..k_hi sentences each."""
    lines, i = [], 0
    while i < len(sents):
        k = rng.randint(k_lo, k_hi)
        lines.append("".join(sents[i:i + k]))
        i += k
    return lines


def corpus_knowledge(rng, src):
    sents = []
    for _ in range(6):
        order = list(src.facts)
        rng.shuffle(order)
        sents += [rng.choice(CORPUS_KNOW_FORMS).format(t=t, b=b) for t, b in order]
    return paragraphs(rng, sents, 4, 7)


def corpus_compare(rng, src, P):
    sents = []
    for _ in range(4):
        s2 = []
        for g in src.groups:
            for a, fa in g:
                s2.append("%s%s。" % (a, fa))
        for x, y in P["cm"]:
            for a, b in ((x, y), (y, x)):
                s2.append("%s%s，而%s%s。" % (a, src.feats[a], b, src.feats[b]))
        rng.shuffle(s2)
        sents += s2
    return paragraphs(rng, sents, 3, 6)


def corpus_arithmetic(rng, P):
    # written "等于" or "=" right after the operands: check() finds pairs that way
    sents = []
    for x, y in rng.sample(P["ar"], 3500):
        a, b = (x, y) if rng.random() < 0.5 else (y, x)
        sents.append(rng.choice(["%d加%d等于%d。", "%d+%d=%d。"]) % (a, b, a + b))
        hi, lo = max(x, y), min(x, y)
        sents.append(rng.choice(["%d减%d等于%d。", "%d-%d=%d。"]) % (hi, lo, hi - lo))
    rng.shuffle(sents)
    return paragraphs(rng, sents, 5, 8)


def corpus_judgement(rng, P):
    sents = []
    for x, y in rng.sample(P["ju"], 2500):
        a, b = (x, y) if rng.random() < 0.5 else (y, x)
        rel = "大于" if a > b else ("小于" if a < b else "等于")
        sents.append("%d%s%d。" % (a, rel, b))
    return paragraphs(rng, sents, 5, 8)


def corpus_strings(rng, P):
    sents = []
    for s in rng.sample(P["st"], 2500):
        c = rng.choice(s)
        opts = [str_answer(s, op, c) for op in ("rev", "up", "len", "cnt")]
        sents += rng.sample(opts, 2)
    return paragraphs(rng, sents, 4, 7)


def corpus_classification(rng, src, P):
    sents = []
    for _ in range(4):
        for w, cls in src.words:
            sents.append(rng.choice(["%s是%s。", "%s属于%s。"]) % (w, cls))
    for n in P["pa"]:
        sents.append(parity(n))
    rng.shuffle(sents)
    return paragraphs(rng, sents, 5, 8)


def build_corpus(rng, src, P):
    """File name -> lines; P: the train operand pools."""
    files = {}
    files["knowledge.txt"] = corpus_knowledge(rng, src)
    files["compare.txt"] = corpus_compare(rng, src, P)
    files["arithmetic.txt"] = corpus_arithmetic(rng, P)
    files["judgement.txt"] = corpus_judgement(rng, P)
    files["strings.txt"] = corpus_strings(rng, P)
    files["classification.txt"] = corpus_classification(rng, src, P)
    return files


# --------------------------------------------------------------------------
# Preference pairs (DPO): prefs_{train,val,test}.jsonl.  Each pair's prompt
# is a row of the same split (so prefs_test asks only test questions, never
# a train or val one), "chosen" is that row's answer and "rejected" a
# plausible wrong answer of the same shape.  They draw from their own RNG
# (seeded like split_templates), so the other files do not change.
# --------------------------------------------------------------------------
PREFS_TRAIN = 4000   # a per-category sample of train; val and test use every row
FACT_NEIGHBOURS = 5  # a wrong fact comes from this many lines around it in facts.txt
# the category of a multi-turn row's second question, by its meta kind
SECOND_TURN = {"add": "算术", "sub": "算术", "rev": "字符串", "len": "字符串", "cnt": "字符串",
               "up": "字符串", "pair": "判断", "word": "分类", "parity": "分类"}


def near(items, i):
    """The items within FACT_NEIGHBOURS places of items[i], itself excluded:
    facts.txt is ordered by topic, so these are mostly related terms."""
    return items[max(0, i - FACT_NEIGHBOURS):i] + items[i + 1:i + 1 + FACT_NEIGHBOURS]


def wrong_fact(category, term, rng, src):
    """知识问答: the term with a related term's body; 定义: a related term."""
    i = [t for t, _ in src.facts].index(term)
    if category == "定义":
        return rng.choice(near([t for t, _ in src.facts], i))
    bodies = [fact_answer(term, b) for _, b in near(src.facts, i)]
    return rng.choice([a for a in bodies if len(a) <= MAX_FACT] or bodies)


def wrong_compare(answer, meta, rng, src):
    """Two items: the comparison turned around, each item with the other's
    feature.  One item (train only): the feature of another item of its group."""
    if meta[0] == "single":
        group = next(g for g in src.groups if meta[1] in dict(g))
        return "%s%s。" % (meta[1], rng.choice([f for n, f in group if n != meta[1]]))
    x, y = meta[1]
    a, b = (x, y) if answer == cmp_answer(x, src.feats[x], y, src.feats[y]) else (y, x)
    return cmp_answer(a, src.feats[b], b, src.feats[a])


def wrong_arith(answer, rng):
    """A dropped carry/borrow (half the time, when there is one) or one
    column's digit off by one, the later steps worked from the slip."""
    a, op, b = re.match(r"(\d+)([+-])(\d+)：", answer).groups()
    a, b = int(a), int(b)
    if op == "+":   # the units and tens results as arith writes them
        units = a % 10 + b % 10
        carry = units >= 10
        tens = a // 10 + b // 10 + carry
    else:
        carry = a % 10 < b % 10
        units = a % 10 + 10 * carry - b % 10
        tens = a // 10 - b // 10 - carry
    if carry and rng.random() < 0.5:
        return arith(a, b, op, carry=False)
    top = 18 if op == "+" else 9   # the largest units result a column can have
    slips = [(d, 0) for d in (-1, 1) if 0 <= units + d <= top]
    slips += [(0, d) for d in (-1, 1) if tens + d >= 0]
    return arith(a, b, op, slip=rng.choice(slips))


def slip_letters(r, rng, avoid):
    """r with a copying slip a small model makes: two neighbouring (different)
    letters swapped, or, where every such swap is a string in `avoid` (the
    operand pools: a rejected answer brings no held-out string into another
    split), one letter dropped."""
    swaps = [r[:i] + r[i + 1] + r[i] + r[i + 2:] for i in range(len(r) - 1) if r[i] != r[i + 1]]
    drops = [r[:i] + r[i + 1:] for i in range(len(r))]
    for outs in (swaps, drops):
        outs = [o for o in outs if o.lower() not in avoid]
        if outs:
            return rng.choice(outs)
    return None


def wrong_string(answer, meta, rng, avoid):
    """Length or count off by one (a miscount); reversal or upper case with a
    copying slip (slip_letters)."""
    op, s = meta[0], meta[1]
    c = answer[-2] if op == "cnt" else ""
    r = str_op(s, op, c)
    if op in ("len", "cnt"):
        wrong = str(rng.choice([n for n in (int(r) - 1, int(r) + 1) if n >= (1 if op == "len" else 0)]))
    else:
        wrong = slip_letters(r, rng, avoid)
    return None if wrong is None else str_answer(s, op, c, wrong)


def wrong_answer(category, answer, meta, rng, src, avoid):
    """A plausible wrong answer in the shape of `answer` (the right one), or
    None where none can be made.  meta: the row's meta from build(); for
    多轮对话 the wrong answer is to the second question."""
    kind, key = meta[0], meta[1]
    if category == "多轮对话":
        return wrong_answer(SECOND_TURN[key[1][0]], answer, key[1], rng, src, avoid)
    if category in ("知识问答", "定义"):
        return wrong_fact(category, key, rng, src)
    if category == "比较":
        return wrong_compare(answer, meta, rng, src)
    if category == "判断":
        a, b, r = re.match(r"(\d+)和(\d+)：.*问的是(大于|小于)", answer).groups()
        return judge(int(a), int(b), r, turned=True)
    if category == "算术":
        return wrong_arith(answer, rng)
    if category == "字符串":
        return wrong_string(answer, meta, rng, avoid)
    if kind == "parity":
        return parity(key, flip=True)
    return rng.choice(sorted(set(cls for _, cls in src.words) - {answer}))   # 分类 (word)


def pref_row(row, rejected):
    """The pair of one SFT row: its question (for 多轮对话 the messages up to
    the last user turn), its answer as chosen, and the rejected answer."""
    if "messages" in row:
        head = {"messages": row["messages"][:-1]}
    else:
        head = {"prompt": row["instruction"]}
    return dict(head, chosen=row["expected"], rejected=rejected, category=row["category"])


def asked_elsewhere(splits, split):
    """The questions (user turns) of every split but `split`."""
    return set(u for other in SPLITS if other != split for row, _ in splits[other] for u in user_turns(row))


def build_prefs(splits, pools, src):
    """split -> preference pairs, in the split's (shuffled) row order: every
    val/test row, and PREFS_TRAIN train rows sampled per category in
    proportion to the category's share of train.  A row that asks a question
    another split asks too gets no pair: val and test share 3 knowledge
    questions (through the first turns of dialogues), so 3 rows of each go."""
    rng = random.Random("%d-prefs" % SEED)
    avoid = set(s for P in pools.values() for s in P["st"])
    avoid |= set(s[::-1] for s in avoid)
    prefs = {}
    for split in SPLITS:
        rows, elsewhere = splits[split], asked_elsewhere(splits, split)
        keep = range(len(rows))
        if split == "train":
            keep = []
            for cat in CATEGORIES:
                idx = [i for i, (r, _) in enumerate(rows) if r["category"] == cat]
                keep += rng.sample(idx, PREFS_TRAIN * len(idx) // len(rows))
            keep = sorted(keep)
        prefs[split] = []
        for i in keep:
            row, meta = rows[i]
            if any(u in elsewhere for u in user_turns(row)):
                continue
            rejected = wrong_answer(row["category"], row["expected"], meta, rng, src, avoid)
            if rejected is not None:
                prefs[split].append(pref_row(row, rejected))
    return prefs


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------
def row_texts(row):
    if "messages" in row:
        return [m["content"] for m in row["messages"]]
    return [row["instruction"], row["response"]]


def rendered_len(row):
    if "messages" in row:
        n = sum(len(m["content"]) for m in row["messages"])
        if row["messages"][0]["role"] != "system":
            n += len(SYSTEM_PROMPT)
        return n
    return len(SYSTEM_PROMPT) + len(row["instruction"]) + len(row["response"])


def user_turns(row):
    """The questions of an SFT row or a preference pair."""
    if "messages" in row:
        return [m["content"] for m in row["messages"] if m["role"] == "user"]
    return [row["instruction"] if "instruction" in row else row["prompt"]]


def train_charset(splits):
    """Every character of train (and the system prompt): the tokenizer's alphabet."""
    return set(ch for row, _ in splits["train"] for t in row_texts(row) for ch in t) | set(SYSTEM_PROMPT)


def prompt_key(item):
    """The question of an SFT row or a preference pair as one string: the
    instruction, or the messages up to the last user turn."""
    if "messages" not in item:
        return item.get("prompt", item.get("instruction"))
    msgs = item["messages"]
    return json.dumps(msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs, ensure_ascii=False)


def check(splits, corpus):
    # schema + expected
    for split, rows in splits.items():
        for row, _ in rows:
            if row["category"] not in CATEGORIES:
                die("bad category %r" % row["category"])
            if "messages" in row:
                msgs = row["messages"]
                roles = [m["role"] for m in msgs]
                if roles and roles[0] == "system":
                    roles = roles[1:]
                if not roles or len(roles) % 2 or any(
                        r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
                    die("bad role order %r" % roles)
                if row["expected"] != msgs[-1]["content"]:
                    die("expected != last assistant turn")
                resps = [m["content"] for m in msgs if m["role"] == "assistant"]
            else:
                if row["expected"] != row["response"]:
                    die("expected != response")
                resps = [row["response"]]
            for r in resps:
                if not r or len(r) > MAX_RESPONSE:
                    die("response empty or too long: %r" % r)
            if rendered_len(row) > MAX_RENDER:
                die("row too long (%d): %r" % (rendered_len(row), row))
    # no val/test instruction (or any user turn) equals a train one
    train_instr = set(u for row, _ in splits["train"] for u in user_turns(row))
    train_rows = set(json.dumps(r, ensure_ascii=False, sort_keys=True) for r, _ in splits["train"])
    for split in ("val", "test"):
        for row, _ in splits[split]:
            for u in user_turns(row):
                if u in train_instr:
                    die("%s instruction also in train: %r" % (split, u))
            if json.dumps(row, ensure_ascii=False, sort_keys=True) in train_rows:
                die("%s row also in train" % split)
    vt = set(json.dumps(r, ensure_ascii=False, sort_keys=True) for r, _ in splits["val"])
    for row, _ in splits["test"]:
        if json.dumps(row, ensure_ascii=False, sort_keys=True) in vt:
            die("test row also in val")
    # every split instruction unique within the split
    for split, rows in splits.items():
        keys = [json.dumps(r.get("messages", r.get("instruction")), ensure_ascii=False) for r, _ in rows]
        if len(set(keys)) != len(keys):
            die("duplicate rows inside " + split)
    # held-out operands: parsed from the text itself (independent of meta)
    def operands(split):
        """Operands parsed from the question text; the row kind comes from meta."""
        ops = {"num_pairs": set(), "strings": set(), "parity": set(), "cmp": set()}
        for row, meta in splits[split]:
            if meta[0] == "multi":
                turns = [m for m in row["messages"] if m["role"] != "system"]
                qs = [(turns[i]["content"], turns[i + 1]["content"], meta[1][i // 2])
                      for i in (0, 2)]
            else:
                qs = [(row["instruction"], row["response"], meta)]
            for u, ans, m in qs:
                kind = m[0]
                nums = tuple(sorted(int(x) for x in re.findall(r"\d+", u)))
                if kind in ("rev", "len", "cnt", "up"):
                    strs = re.findall(r"[a-z]{3,}", u)
                    assert len(strs) == 1, u
                    ops["strings"].update(strs + re.findall(r"[a-z]{3,}", ans))
                elif kind in ("add", "sub"):
                    assert len(nums) == 2, u
                    ops["num_pairs"].add(("ar",) + nums)
                elif kind == "pair" and isinstance(m[1][0], int):
                    assert len(nums) == 2, u
                    ops["num_pairs"].add(("ju",) + nums)
                elif kind == "parity":
                    assert len(nums) == 1, u
                    ops["parity"].add(nums[0])
                elif kind == "pair":
                    ops["cmp"].add(m[1])
        return ops
    tr = operands("train")
    for split in ("val", "test"):
        o = operands(split)
        for k in o:
            inter = sorted(map(str, o[k] & tr[k]))
            if inter:
                die("%s %s leak into train: %s" % (split, k, inter[:5]))
    ov, ot = operands("val"), operands("test")
    for k in ov:
        if ov[k] & ot[k]:
            die("val/test share %s" % k)
    # strings/number pairs of val/test never in the corpus either
    corpus_text = "\n".join("\n".join(v) for v in corpus.values())
    corpus_strings = set(re.findall(r"[a-z]+", corpus_text))
    corpus_exprs = set(re.findall(r"(?<!\d)(\d+)(加|减|\+|-)(\d+)(?=等于|=)", corpus_text))
    corpus_pairs = set(("ar",) + tuple(sorted((int(a), int(b)))) for a, _, b in corpus_exprs)
    for split in ("val", "test"):
        o = operands(split)
        bad = o["strings"] & corpus_strings
        if bad:
            die("held-out strings in corpus: %s" % sorted(bad)[:5])
        bad = o["num_pairs"] & corpus_pairs
        if bad:
            die("held-out arithmetic pairs in corpus: %s" % sorted(bad)[:5])
    # character coverage: everything in val/test/corpus must appear in train
    train_chars = train_charset(splits)
    for name, texts in (("val", [t for r, _ in splits["val"] for t in row_texts(r)]),
                        ("test", [t for r, _ in splits["test"] for t in row_texts(r)]),
                        ("corpus", [l for v in corpus.values() for l in v])):
        missing = sorted(set(ch for t in texts for ch in t) - train_chars)
        if missing:
            die("chars in %s but not in train: %s" % (name, "".join(missing)))
    return len(train_chars)


def check_prefs(splits, prefs):
    """Every pair asks a question of its own split and of no other (so
    prefs_test never asks a train or val question), chosen is that row's
    answer, and rejected differs from it, is short and uses only train
    characters."""
    chars = train_charset(splits)
    for split, pairs in prefs.items():
        answers = {prompt_key(row): row["expected"] for row, _ in splits[split]}
        elsewhere = asked_elsewhere(splits, split)
        for p in pairs:
            if answers.get(prompt_key(p)) != p["chosen"]:
                die("prefs_%s pair is not a %s row: %r" % (split, split, p))
            if any(u in elsewhere for u in user_turns(p)):
                die("prefs_%s asks a question of another split: %r" % (split, p))
            bad = p["rejected"] == p["chosen"] or not 0 < len(p["rejected"]) <= MAX_RESPONSE
            if bad or set(p["rejected"]) - chars or p["category"] not in CATEGORIES:
                die("bad rejected answer in prefs_%s: %r" % (split, p))


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------
def jsonl(obj):
    """One line of a .jsonl file: UTF-8 text, compact separators."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def subtype(row, meta, group_of):
    cat = row["category"]
    if cat == "算术":
        return "加法" if meta[0] == "add" else "减法"
    if cat == "字符串":
        return {"rev": "反转", "len": "长度", "cnt": "计数", "up": "大写"}[meta[0]]
    if cat == "分类":
        return "词语类别" if meta[0] == "word" else "奇偶"
    if cat == "比较":
        if meta[0] == "single":
            return "单项特点(仅train)"
        cross = len({group_of[n] for n in meta[1]}) == 2
        return "跨组两项(仅train)" if cross else "同组两项"
    if cat == "多轮对话":
        return "含system" if row["messages"][0]["role"] == "system" else "无system"
    return None


def counts_markdown(splits, corpus_sizes, n_chars, src, prefs):
    names = ("train", "val", "test")
    C = {s: Counter(r["category"] for r, _ in splits[s]) for s in names}
    out = ["| 类别 | train | val | test |", "| --- | ---: | ---: | ---: |"]
    for cat in CATEGORIES:
        out.append("| %s | %d | %d | %d |" % ((cat,) + tuple(C[s][cat] for s in names)))
    out.append("| **合计** | %d | %d | %d |" % tuple(len(splits[s]) for s in names))
    out.append("")
    out.append("子类型：")
    out.append("")
    out.append("| 类别 / 子类型 | train | val | test |")
    out.append("| --- | ---: | ---: | ---: |")
    group_of = {n: i for i, g in enumerate(src.groups) for n, _ in g}
    S = {s: Counter((r["category"], subtype(r, m, group_of)) for r, m in splits[s]) for s in names}
    keys = sorted(set(k for s in names for k in S[s] if k[1] is not None),
                  key=lambda k: (CATEGORIES.index(k[0]), k[1]))
    for k in keys:
        out.append("| %s / %s | %d | %d | %d |" % ((k[0], k[1]) + tuple(S[s][k] for s in names)))
    out.append("")
    mt = {s: sum(1 for r, _ in splits[s] if "messages" in r) for s in names}
    out.append("多轮 (messages) 格式占比：" + "，".join(
        "%s %d/%d (%.1f%%)" % (s, mt[s], len(splits[s]), 100.0 * mt[s] / len(splits[s])) for s in names) + "。")
    maxlen = max(rendered_len(r) for s in names for r, _ in splits[s])
    out.append("")
    out.append("其他：知识条目 %d 条；比较条目 %d 组 %d 项；train 字符表 %d 个字符；"
               "最长渲染文本（system+全部轮次，不含标记）%d 字符。" % (
                   len(src.facts), len(src.groups), sum(len(g) for g in src.groups), n_chars, maxlen))
    out.append("")
    out.append("语料 corpus/：" + "，".join("%s %d 行 %d 字节" % (k, v[0], v[1])
                                          for k, v in sorted(corpus_sizes.items()))
               + "，共 %d 字节。" % sum(v[1] for v in corpus_sizes.values()))
    out += ["", "偏好对 prefs_*.jsonl（DPO，见下文“偏好对”）：", "",
            "| 类别 | prefs_train | prefs_val | prefs_test |", "| --- | ---: | ---: | ---: |"]
    P = {s: Counter(p["category"] for p in prefs[s]) for s in names}
    for cat in CATEGORIES:
        out.append("| %s | %d | %d | %d |" % ((cat,) + tuple(P[s][cat] for s in names)))
    out.append("| **合计** | %d | %d | %d |" % tuple(len(prefs[s]) for s in names))
    return "\n".join(out)


def templates_markdown():
    def lst(ts):
        return "；".join("`%s`" % t for t in ts)

    def ops(ts):
        return ["%s (%s)" % t for t in ts]
    out = ["前缀 PREFIX：%s。后缀 SUFFIX：%s（问句不以标点结尾时，后缀前加一个空格）。" % (
        "、".join("`%s`" % p if p else "（无）" for p in PREFIXES),
        "、".join("`%s`" % x if x else "（无）" for x in SUFFIXES)), ""]
    rows = [
        ("知识问答", KNOW_FORMS, KNOW_TRAIN, KNOW_HELD),
        ("定义", DEF_FORMS, DEF_TRAIN, DEF_HELD),
        ("比较", CMP_FORMS, CMP_TRAIN, CMP_HELD),
        ("判断（{r} ∈ 大于/小于）", JUDGE_FORMS, JUDGE_TRAIN, JUDGE_HELD),
        ("算术", ARITH_FORMS, ops(ARITH_TRAIN), ops(ARITH_HELD)),
        ("字符串", ops(STR_FORMS), ops(STR_TRAIN), ops(STR_HELD)),
        ("分类（词语）", CLS_FORMS, CLS_TRAIN, CLS_HELD),
        ("分类（奇偶）", PAR_FORMS, PAR_TRAIN, PAR_HELD),
    ]
    out += ["| 类别 | 问句 FORM | train 模板数 | val/test 模板（held-out 组合，train 中从不出现） |",
            "| --- | --- | ---: | --- |"]
    for name, forms, tr, he in rows:
        out.append("| %s | %s | %d | %s |" % (name, lst(forms), len(tr), lst(he)))
    out.append("")
    out.append("比较的单项模板（仅 train，全部前缀×后缀组合）：%s。" % lst(CMP_SINGLE_FORMS))
    out.append("")
    out.append("多轮对话第二个用户轮的前缀：%s。" % "、".join("`%s`" % p if p else "（无）" for p in MT_PREFIXES))
    return "\n".join(out)


def replace_between(text, tag, body):
    begin, end = "<!-- %s:BEGIN -->" % tag, "<!-- %s:END -->" % tag
    if begin not in text or end not in text:
        die("README.md lacks markers " + begin)
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    return pre + begin + "\n" + body + "\n" + end + post


def main(argv=None):
    """python data/generate.py [--out DIR]: writes next to this script (and
    refreshes README.md), or into DIR (README untouched; used by the tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = HERE
    if argv:
        if len(argv) != 2 or argv[0] != "--out":
            die("usage: python data/generate.py [--out DIR]")
        out = argv[1]
    t0 = time.time()
    src = load_sources()
    rng = random.Random(SEED)
    data = build(rng, src)
    splits = data.splits
    corpus = build_corpus(rng, src, data.pools["train"])
    n_chars = check(splits, corpus)
    prefs = build_prefs(splits, data.pools, src)
    check_prefs(splits, prefs)

    os.makedirs(out, exist_ok=True)
    for split in ("train", "val", "test"):
        write_lines(os.path.join(out, split + ".jsonl"), [jsonl(r) for r, _ in splits[split]])
        write_lines(os.path.join(out, "prefs_%s.jsonl" % split), [jsonl(p) for p in prefs[split]])
    cdir = os.path.join(out, "corpus")
    os.makedirs(cdir, exist_ok=True)
    corpus_sizes = {}
    for name in sorted(corpus):
        path = os.path.join(cdir, name)
        write_lines(path, corpus[name])
        corpus_sizes[name] = (len(corpus[name]), os.path.getsize(path))
    if out != HERE:
        print("all checks passed; wrote %s in %.1fs" % (out, time.time() - t0))
        return

    counts = counts_markdown(splits, corpus_sizes, n_chars, src, prefs)
    readme = os.path.join(HERE, "README.md")
    if os.path.exists(readme):
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        text = replace_between(text, "COUNTS", counts)
        text = replace_between(text, "TEMPLATES", templates_markdown())
        with open(readme, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    print(counts)
    print("\nall checks passed; %.1fs" % (time.time() - t0))


if __name__ == "__main__":
    main()
