"""Scoring functions on hand-computed cases, the score table, and bin/eval end to end."""
import json
import os

import pytest

from conftest import one_line_error, run_main, run_script
from jaxsft.evaluate import (NO_CATEGORY, aggregate, char_f1, display_width, exact_match, pad, score_row,
                             score_table)


@pytest.mark.parametrize("answer, reference, expected", [
    ("黑洞", "黑洞", 1.0),
    ("  黑洞\n", "黑洞", 1.0),  # outer whitespace is stripped
    ("黑 洞", "黑洞", 0.0),  # inner whitespace counts
    ("Yes", "yes", 0.0),  # case counts
    ("黑洞。", "黑洞", 0.0),  # punctuation counts
    ("", "  ", 1.0),
])
def test_exact_match(answer, reference, expected):
    assert exact_match(answer, reference) == expected


@pytest.mark.parametrize("answer, reference, expected", [
    ("黑洞", "黑洞", 1.0),
    ("栈后进先出", "栈先进后出", 1.0),  # same characters in another order
    ("黑洞", "黑色的洞", 2 / 3),  # overlap 2: P = 2/2, R = 2/4 -> 2PR/(P+R) = 2/3
    ("你好！", "你好！有什么可以帮你？", 6 / 14),  # overlap 3 (你 once, 好, ！): P = 1, R = 3/11
    ("aaa", "a", 0.5),  # multiset: one 'a' in common, P = 1/3, R = 1
    ("aab", "abb", 2 / 3),  # a:1 + b:1 = 2, P = R = 2/3
    ("abc", "xyz", 0.0),
    ("", "x", 0.0),
    ("", "", 1.0),
    (" 26 ", "26", 1.0),
])
def test_char_f1(answer, reference, expected):
    assert char_f1(answer, reference) == pytest.approx(expected)
    assert char_f1(reference, answer) == pytest.approx(expected)  # symmetric


def test_score_row_lengths_are_characters_after_stripping():
    assert score_row(" 黑洞 \n", "黑洞") == {"exact_match": 1.0, "char_f1": 1.0, "answer_len": 2}


def test_aggregate_overall_and_per_category():
    scores = [score_row("26", "26"), score_row("黑洞", "黑色的洞"), score_row("3", "27"), score_row("abc", "abc")]
    report = aggregate(scores, ["算术", "定义", "算术", ""])
    assert report["overall"] == pytest.approx({"n": 4, "exact_match": 0.5, "char_f1": (1 + 2 / 3 + 0 + 1) / 4,
                                               "answer_len": (2 + 2 + 1 + 3) / 4})
    assert list(report["by_category"]) == sorted([NO_CATEGORY, "定义", "算术"])
    assert report["by_category"]["算术"] == pytest.approx({"n": 2, "exact_match": 0.5, "char_f1": 0.5,
                                                          "answer_len": 1.5})
    assert report["by_category"]["定义"] == pytest.approx({"n": 1, "exact_match": 0.0, "char_f1": 2 / 3,
                                                          "answer_len": 2.0})
    assert report["by_category"][NO_CATEGORY]["n"] == 1
    with pytest.raises(ValueError):
        aggregate(scores, ["算术"])  # one category per row


def test_display_width_and_pad_count_cjk_as_two_columns():
    assert display_width("ab你好！") == 2 + 2 * 3
    assert pad("你好", 6) == "你好  "
    assert pad("7", 3, right=True) == "  7"


def test_score_table_layout():
    report = aggregate([score_row("26", "26"), score_row("黑洞", "黑色的洞"), score_row("3", "27")],
                       ["算术", "定义", "算术"])
    assert score_table(report).splitlines() == [
        "category  rows  exact  char-F1  answer len",
        "定义         1   0.0%    0.667         2.0",  # CJK takes two columns: 定义 + 4 spaces = 8
        "算术         2  50.0%    0.500         1.5",
        "all          3  33.3%    0.556         1.7",
    ]


# bin/eval on the tiny model of conftest.trained_run, which has memorised conftest.QA.
# Rows exercise the three reference sources: "response", "expected", a last assistant turn.
EVAL_ROWS = [
    {"instruction": "什么是机器学习？", "response": "让计算机从数据中学习规律。", "category": "知识"},
    {"instruction": "你好", "response": "ignored", "expected": "你好！", "category": "闲聊"},
    {"messages": [{"role": "user", "content": "1+1等于几？"}, {"role": "assistant", "content": "等于2。"}],
     "category": "算术"},
    {"instruction": "天空是什么颜色？", "response": "蓝色。"},
]
# what the memorised model answers, and the hand-computed scores against the references above
ANSWERS = ["让计算机从数据中学习规律。", "你好！有什么可以帮你？", "等于2。", "晴天是蓝色的。"]
EM = [1.0, 0.0, 1.0, 0.0]
F1 = [1.0, 6 / 14, 1.0, 6 / 10]  # 你好！: overlap 3, P 3/11, R 1; 蓝色。: overlap 3, P 3/7, R 1


@pytest.mark.slow
def test_bin_eval_end_to_end(trained_run, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EVAL_ROWS), encoding="utf-8")
    out = tmp_path / "report.json"
    proc = run_script("eval", "--checkpoint", trained_run["run_dir"], "--data", data, "--json", out, "--show", 2)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text(encoding="utf-8"))

    assert report["n"] == 4 and report["unfinished"] == 0 and report["truncated_prompts"] == 0
    rows = report["rows"]
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert [r["expected"] for r in rows] == ["让计算机从数据中学习规律。", "你好！", "等于2。", "蓝色。"]
    assert [r["category"] for r in rows] == ["知识", "闲聊", "算术", ""]
    assert [r["answer"] for r in rows] == ANSWERS
    assert [r["exact_match"] for r in rows] == EM
    assert [r["char_f1"] for r in rows] == pytest.approx(F1)
    assert [r["answer_len"] for r in rows] == [len(a) for a in ANSWERS]

    # the summary figures are the means of the rows' figures, overall and per category
    assert report["overall"] == pytest.approx({"n": 4, "exact_match": 0.5, "char_f1": sum(F1) / 4,
                                               "answer_len": sum(map(len, ANSWERS)) / 4})
    assert set(report["by_category"]) == {"知识", "闲聊", "算术", NO_CATEGORY}
    for i, cat in enumerate(["知识", "闲聊", "算术", NO_CATEGORY]):
        assert report["by_category"][cat] == pytest.approx(
            {"n": 1, "exact_match": EM[i], "char_f1": F1[i], "answer_len": len(ANSWERS[i])})

    # the printed table and the --show rows
    lines = proc.stdout.splitlines()
    assert lines[-1].split() == ["all", "4", "50.0%", f"{sum(F1) / 4:.3f}", f"{sum(map(len, ANSWERS)) / 4:.1f}"]
    assert "instruction: 你好" in lines and "expected:    你好！" in lines and f"answer:      {ANSWERS[1]}" in lines
    assert "instruction: 1+1等于几？" not in lines  # --show 2: only the first two rows


def test_bin_eval_rejects_a_row_without_reference(tmp_path, capsys, monkeypatch):
    """In this process, through main() (test_damaged_checkpoints.py runs bin/eval's error in a real one)."""
    data = tmp_path / "eval.jsonl"
    data.write_text('{"instruction": "你好", "expected": "你好"}\n{"instruction": "天空是什么颜色？"}\n',
                    encoding="utf-8")
    code, _, err = run_main("eval", ["--checkpoint", tmp_path, "--data", data], capsys, monkeypatch)  # rows first
    one_line_error(code, err, f"{data}:2: no reference answer")


def test_exact_by_category_is_what_evaluations_record():
    """The trainer's val_exact and val_exact_category (TensorBoard: val_exact_category/<name>)."""
    from jaxsft.data import Row
    from jaxsft.evaluate import exact_by_category
    rows = [Row(messages=[("user", q), ("assistant", a)], category=c, expected=a)
            for q, a, c in [("1+1", "2", "算术"), ("2+2", "4", "算术"), ("hi", "你好", "问候"), ("x", "y", "")]]
    overall, by = exact_by_category(["2", "5", "你好", "y"], rows)
    assert overall == 0.75 and by == {"算术": 0.5, "问候": 1.0}  # a row without a category counts overall only
    assert exact_by_category(["2"], rows[:1]) == (1.0, {"算术": 1.0})
    assert exact_by_category(["no"], [rows[3]]) == (0.0, {})
