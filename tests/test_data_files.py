"""The committed data/ set: answers are right, val/test are really held out,
and data/generate.py reproduces the committed files byte for byte."""
import filecmp
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
sys.path.insert(0, DATA)
import generate as G  # noqa: E402  (data/generate.py: templates and answer rules)


def _rows(split):
    with open(os.path.join(DATA, split + ".jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _qa(row):
    """(question, answer) pairs of a row: one, or every user/assistant turn pair."""
    if "messages" not in row:
        return [(row["instruction"], row["response"])]
    turns = [m["content"] for m in row["messages"] if m["role"] != "system"]
    return list(zip(turns[0::2], turns[1::2]))


SPLITS = {s: _rows(s) for s in ("train", "val", "test")}


def _all_qa():
    """Every (question, answer) pair of every split."""
    return [qa for rows in SPLITS.values() for row in rows for qa in _qa(row)]
PAIR = re.compile(r"^\D*?(\d+)(\+|-|加|减)(\d+)\D*$")


def _template(question, templates, **slots):
    """The template that renders `question` with these slot values, or None."""
    for t in templates:
        text = t[0] if isinstance(t, tuple) else t
        if text.format(**slots) == question:
            return t
    return None


def test_arithmetic_answers_are_right():
    n = 0
    for q, a in _all_qa():
        m = PAIR.match(q)
        if not m or "得" not in a:
            continue
        x, op, y = int(m.group(1)), m.group(2), int(m.group(3))
        want = x + y if op in "+加" else x - y
        assert a.startswith("%d%s%d：" % (x, "+" if op in "+加" else "-", y)), (q, a)  # operands restated
        assert a.endswith("得%d。" % want), (q, a)
        # each step of the working is a true one-digit fact
        for l, o, r, rest in re.findall(r"(\d+)([+-])(\d+)((?:[+-]\d+)?)=", a):
            left = int(l) + int(r) if o == "+" else int(l) - int(r)
            if rest:
                left = left + int(rest[1:]) if rest[0] == "+" else left - int(rest[1:])
            tail = a.split("%s%s%s%s=" % (l, o, r, rest), 1)[1]
            assert int(re.match(r"\d+", tail).group()) == left, (q, a)
        n += 1
    assert n > 4000


def test_judgement_verdict_matches_the_numbers():
    n = 0
    for q, a in _all_qa():
        m = re.search(r"(\d+)(?:是否)?(大于|小于)(\d+)", q)
        if not m or not a.endswith("对。"):
            continue
        x, rel, y = int(m.group(1)), m.group(2), int(m.group(3))
        holds = x > y if rel == "大于" else x < y
        assert a.startswith("%d和%d：" % (x, y)), (q, a)  # operands restated
        assert a.endswith("，对。") == holds and a.endswith("不对。") != holds, (q, a)
        truth = "大于" if x > y else ("小于" if x < y else "等于")
        assert "所以%d%s%d；问的是%s，" % (x, truth, y, rel) in a, (q, a)
        n += 1
    assert n > 2000


def test_string_answers_are_right():
    """The operand is quoted in the question; the answer restates it and gives the result."""
    n = 0
    for rows in SPLITS.values():
        for row in rows:
            if row["category"] != "字符串":
                continue
            q, a = _qa(row)[0]
            s = re.search(r"“([a-z]{3,6})”", q).group(1)
            c = (re.findall(r"(?<![a-z“])[a-z](?![a-z”])", q) or [""])[0]
            t = _template(q, G.STR_TRAIN + G.STR_HELD, s=s, c=c)
            assert t is not None, q
            assert a == {"rev": "“%s”倒过来是“%s”。" % (s, s[::-1]), "len": "“%s”有%d个字母。" % (s, len(s)),
                         "cnt": "“%s”中有%d个%s。" % (s, s.count(c), c),
                         "up": "“%s”的大写是“%s”。" % (s, s.upper())}[t[1]], (q, a)
            n += 1
    assert n == len([r for rows in SPLITS.values() for r in rows if r["category"] == "字符串"]) == 3780


def test_parity_answers_are_right():
    """A parity answer restates the number, reads its units digit, gives the verdict."""
    n = 0
    for q, a in _all_qa():
        m = re.search(r"\d+", q)
        if "奇" not in q or not m:  # not a parity question ("什么是奇数？" is knowledge)
            continue
        x = int(m.group())
        assert a == "%d的个位是%d，是%s。" % (x, x % 10, "偶数" if x % 2 == 0 else "奇数"), (q, a)
        n += 1
    assert n > 800


def test_val_and_test_templates_never_occur_in_train():
    train_q = {q for row in SPLITS["train"] for q, _ in _qa(row)}
    held = set(G.KNOW_HELD)
    assert not held & set(G.KNOW_TRAIN)
    checked = 0
    for split in ("val", "test"):
        for row in SPLITS[split]:
            for q, _ in _qa(row):
                assert q not in train_q
            if row["category"] == "知识问答":
                term = row["response"].split("是", 1)[0]
                t = _template(row["instruction"], G.KNOW_TRAIN + G.KNOW_HELD, x=term)
                assert t in held, row["instruction"]
                checked += 1
    assert checked == 180
    for tr, he in ((G.DEF_TRAIN, G.DEF_HELD), (G.CMP_TRAIN, G.CMP_HELD), (G.JUDGE_TRAIN, G.JUDGE_HELD),
                   (G.ARITH_TRAIN, G.ARITH_HELD), (G.STR_TRAIN, G.STR_HELD),
                   (G.CLS_TRAIN, G.CLS_HELD), (G.PAR_TRAIN, G.PAR_HELD)):
        assert he and not set(he) & set(tr)


def test_held_out_number_pairs_and_strings_never_occur_in_train():
    def operands(split):
        pairs, strings = set(), set()
        for row in SPLITS[split]:
            for q, a in _qa(row):
                m = PAIR.match(q)
                if m and "得" in a:
                    pairs.add(tuple(sorted((int(m.group(1)), int(m.group(3))))))
                strings.update(re.findall(r"(?<![A-Za-z])[a-z]{3,}(?![A-Za-z])", q))
        return pairs, strings
    tr_p, tr_s = operands("train")
    for split in ("val", "test"):
        p, s = operands(split)
        assert p and s
        assert not p & tr_p
        assert not s & tr_s and not {x[::-1] for x in s} & tr_s


@pytest.mark.slow  # runs the whole generator (2 s); the committed files' own checks stay quick
def test_generate_reproduces_the_committed_files(tmp_path):
    subprocess.run([sys.executable, os.path.join(DATA, "generate.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    names = ["train.jsonl", "val.jsonl", "test.jsonl"] + ["prefs_%s.jsonl" % s for s in SPLITS] + [
        os.path.join("corpus", f) for f in sorted(os.listdir(os.path.join(DATA, "corpus")))]
    match, mismatch, errors = filecmp.cmpfiles(DATA, tmp_path, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names)


PREFS = {s: _rows("prefs_" + s) for s in SPLITS}


def _prompt_turns(pair):
    """The user turns of a preference pair's prompt."""
    if "messages" in pair:
        return [m["content"] for m in pair["messages"] if m["role"] == "user"]
    return [pair["prompt"]]


def _prompt_key(item):
    """A question as one string: an instruction / prompt, or the messages up
    to the last user turn (an SFT row's without its last answer)."""
    if "messages" not in item:
        return item.get("prompt", item.get("instruction"))
    msgs = item["messages"][:-1] if item["messages"][-1]["role"] == "assistant" else item["messages"]
    return json.dumps(msgs, ensure_ascii=False)


def test_prefs_rows_are_well_formed_and_rejected_differs():
    for split, pairs in PREFS.items():
        assert pairs
        for p in pairs:
            assert set(p) in ({"prompt", "chosen", "rejected", "category"},
                              {"messages", "chosen", "rejected", "category"}), p
            assert p["category"] in G.CATEGORIES, p
            assert p["rejected"] and p["rejected"] != p["chosen"], p
            if "messages" in p:
                assert p["category"] == "多轮对话" and p["messages"][-1]["role"] == "user", p
    # every val/test row has a pair but the 3 in each that share a question
    # with the other split; train a 20% per-category sample
    assert (len(PREFS["val"]), len(PREFS["test"])) == (len(SPLITS["val"]) - 3, len(SPLITS["test"]) - 3)
    assert len(PREFS["train"]) == G.PREFS_TRAIN


def test_prefs_prompts_are_held_out_like_their_split():
    """prefs_test asks only test questions, never a train or val one; prefs_val
    only val questions, prefs_train only train ones (and neither a question of
    another split either)."""
    user = {s: {q for row in rows for q, _ in _qa(row)} for s, rows in SPLITS.items()}
    for split, pairs in PREFS.items():
        for p in pairs:
            for q in _prompt_turns(p):
                assert q in user[split], (split, q)
                assert not any(q in user[o] for o in SPLITS if o != split), (split, q)


def test_prefs_chosen_is_the_sft_answer():
    for split, pairs in PREFS.items():
        answers = {_prompt_key(row): row["expected"] for row in SPLITS[split]}
        for p in pairs:
            assert answers[_prompt_key(p)] == p["chosen"], (split, p)


def test_prefs_rejected_answers_are_wrong_the_planned_way():
    """Arithmetic: the same operands, worked steps consistent with a wrong
    result; judgement and parity: the verdict flipped; counts off by one."""
    n = 0
    for p in (p for pairs in PREFS.values() for p in pairs):
        c, r = p["chosen"], p["rejected"]
        if re.match(r"\d+[+-]\d+：", c):
            m = re.match(r"(\d+)([+-])(\d+)：个位\d+[+-]\d+=(\d+)，十位\d+[+-]\d+[+-]\d+=(\d+)，得(\d+)。$", r)
            assert m and c.startswith("%s%s%s：" % m.group(1, 2, 3)), p
            units, tens, result = int(m.group(4)), int(m.group(5)), int(m.group(6))
            assert result == 10 * tens + units % 10 and not c.endswith("得%d。" % result), p
            n += 1
        elif c.endswith("对。"):
            assert r.split("：")[0] == c.split("：")[0] and r.endswith("不对。") != c.endswith("不对。"), p
            n += 1
        elif "的个位是" in c:
            assert r[:-3] == c[:-3] and {r[-3:], c[-3:]} == {"奇数。", "偶数。"}, p
            n += 1
        elif re.match(r"“[a-z]+”(有|中有)\d+个", c):
            nc, nr = (int(re.search(r"有(\d+)个", x).group(1)) for x in (c, r))
            assert abs(nc - nr) == 1, p
            n += 1
    assert n > 2000
