"""bin/eval --pairs (preference accuracy against a run's reference), the comparison of several
runs, and a DPO run's report on its test pairs: figures checked against log-probs computed here
by hand (model.apply on each rendered answer alone, log-softmax summed at its tokens, numpy)."""
import contextlib
import functools
import importlib
import io
import json
import os
import sys

import jax
import numpy as np
import pytest

from conftest import one_line_error, run_main, write_tiny_config
from jaxsft import chatml, model, runs
from jaxsft.evaluate import NO_CATEGORY, comparison_table, distinct_n, preference_table
from jaxsft.preference import SELF, figures
from test_evaluate import ANSWERS, EVAL_ROWS

# pairs on conftest.QA, which the tiny SFT run has memorised: its chosen answers mostly, but the
# last pair's rejected answer is the memorised one. 吃, 3, 红, 计, 器 are characters that run has
# never seen (a DPO run from it gives them new embedding rows, drawn from its train.seed).
PAIRS = [
    {"prompt": "什么是机器学习？", "chosen": "让计算机从数据中学习规律。", "rejected": "让计算机从数据中学习颜色。",
     "category": "知识"},
    {"prompt": "你好", "chosen": "你好！有什么可以帮你？", "rejected": "你好！有什么可以吃？", "category": "闲聊"},
    {"prompt": "1+1等于几？", "chosen": "等于2。", "rejected": "等于3。", "category": "算术"},
    {"prompt": "天空是什么颜色？", "chosen": "晴天是蓝色的。", "rejected": "晴天是红色的。", "category": "知识"},
    {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
                  {"role": "user", "content": "1+1等于几？"}], "chosen": "等于2。", "rejected": "等于11。",
     "category": "算术"},
    {"prompt": "1+1等于几？", "system": "你是一个计算器。", "chosen": "2", "rejected": "等于2。"},
]
CATEGORIES = [p.get("category") or NO_CATEGORY for p in PAIRS]
DPO_SEED = 7  # not the SFT run's seed (0) nor the default (42): the new rows' start depends on it


def write_pairs(path, pairs) -> str:
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return str(path)


def context(p) -> tuple:
    """A pair's conversation before its answer, as (role, content)."""
    msgs = [(m["role"], m["content"]) for m in p["messages"]] if "messages" in p else [("user", p["prompt"])]
    return ((("system", p["system"]),) if "system" in p else ()) + tuple(msgs)


@functools.lru_cache(maxsize=None)
def _apply(mc):
    """The model's logits, jitted once per model config (one padded shape)."""
    graphdef = model.abstract(mc)[0]
    return jax.jit(lambda p, x: model.apply(graphdef, p, x)[0])


def hand_logp(params, mc, tok, system, messages, answer) -> float:
    """log p(answer | messages): the conversation rendered with the answer, model.apply over it once,
    log-softmax in float64, summed at the answer's tokens and its closing <|endoftext|> (the last
    len(answer) + 1 tokens: a character vocabulary)."""
    ids, _ = chatml.render(tuple(messages) + (("assistant", answer),), tok, system)
    assert ids[-1] == tok.end_id and len(ids) <= mc.max_seq_len + 1
    x = np.zeros((1, mc.max_seq_len), np.int32)  # right-padded: a causal model's logits before the padding are its own
    x[0, :len(ids) - 1] = ids[:-1]
    logits = np.asarray(_apply(mc)(params, x)[0], np.float64)[:len(ids) - 1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    n = len(answer) + 1
    return float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1 - n, len(ids) - 1)))


def hand_logps(run_dir) -> np.ndarray:
    """(len(PAIRS), 2): every pair's chosen and rejected log-probs under the run's best parameters."""
    params, mc, tok = runs.restore(run_dir)
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        system = json.load(f)["data"]["system_prompt"]
    return np.array([[hand_logp(params, mc, tok, system, context(p), p[k]) for k in ("chosen", "rejected")]
                     for p in PAIRS])


def hand_figures(diff, beta=0.1) -> dict:
    """Accuracy and margin overall and per category from each pair's reward difference."""
    per = {c: {"n": int(sum(1 for x in CATEGORIES if x == c)),
               "preference_accuracy": np.mean([d > 0 for d, x in zip(diff, CATEGORIES) if x == c]),
               "margin": beta * np.mean([d for d, x in zip(diff, CATEGORIES) if x == c])} for c in set(CATEGORIES)}
    return {"n": len(diff), "preference_accuracy": np.mean(diff > 0), "margin": beta * np.mean(diff),
            "per_category": per}


def assert_figures(report, expected):
    for key in ("n", "preference_accuracy", "margin"):
        assert report[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key
    assert set(report["per_category"]) == set(expected["per_category"])
    for c, f in expected["per_category"].items():
        for key in ("n", "preference_accuracy", "margin"):
            assert report["per_category"][c][key] == pytest.approx(f[key], rel=1e-4, abs=1e-5), (c, key)


# pure parts


def test_figures_by_hand():
    policy = np.array([[-1.0, -3.0], [-2.0, -1.0], [-5.0, -4.0], [-1.0, -1.5]], np.float32)
    reference = np.array([[-1.0, -2.0], [-3.0, -1.0], [-4.0, -5.0], [-1.0, -1.0]], np.float32)
    # rewards (policy - reference): chosen 0, 1, -1, 0; rejected -1, 0, 1, -0.5: differences 1, 1, -2, 0.5
    rep = figures(policy, reference, ["a", "b", "a", ""], beta=0.5)
    assert rep["n"] == 4 and rep["preference_accuracy"] == 0.75
    assert rep["margin"] == pytest.approx(0.5 * (1 + 1 - 2 + 0.5) / 4)
    assert rep["per_category"] == {"a": {"n": 2, "preference_accuracy": 0.5, "margin": pytest.approx(-0.25)},
                                   "b": {"n": 1, "preference_accuracy": 1.0, "margin": 0.5},
                                   NO_CATEGORY: {"n": 1, "preference_accuracy": 1.0, "margin": 0.25}}
    # no reference (an SFT run): the raw log-probs decide: differences 2, -1, -1, 0.5
    raw = figures(policy, None, ["a", "b", "a", ""], beta=0.5)
    assert raw["preference_accuracy"] == 0.5 and raw["margin"] == pytest.approx(0.5 * 0.5 / 4)
    # a tie ranks nothing right
    assert figures(np.array([[-1.0, -1.0]]), None, ["a"], 0.1)["preference_accuracy"] == 0.0


def test_distinct_n_by_hand():
    assert distinct_n(["abab", "ab"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["abab", "ab"], 2) == pytest.approx(2 / 4)  # ab ba ab | ab: none across the two answers
    assert distinct_n(["黑洞", "黑色的洞"], 2) == pytest.approx(4 / 4)
    assert distinct_n(["a", ""], 2) == 0.0  # no bigram at all
    assert distinct_n([[5, 6, 5], [6]], 1) == pytest.approx(2 / 4)  # token ids as units


def test_preference_and_comparison_tables():
    rep = figures(np.array([[-1.0, -2.0], [-2.0, -1.0], [-1.0, -3.0]]), None, ["算术", "算术", "多轮对话问答"], 0.1)
    assert preference_table(rep).splitlines() == [
        "category      pairs  accuracy  margin",
        "多轮对话问答      1    100.0%   0.200",  # CJK takes two columns: the widest cell is 12 wide
        "算术              2     50.0%   0.000",
        "all               3     66.7%   0.067",
    ]
    base = {"overall": {"n": 3, "exact_match": 0.0}, "perplexity": 31.2, "distinct_1": 0.5, "distinct_2": 0.75,
            "by_category": {"定义": {"n": 1, "exact_match": 0.0}, "算术": {"n": 2, "exact_match": 0.0}},
            "preference": {**rep, "raw": True}}
    dpo = {**base, "overall": {"n": 3, "exact_match": 1 / 3}, "perplexity": 1.5,
           "by_category": {"定义": {"n": 1, "exact_match": 0.0}, "算术": {"n": 2, "exact_match": 0.5}},
           "preference": {**rep, "preference_accuracy": 1.0, "margin": 1.25, "raw": False}}
    assert comparison_table(["runs/base", "runs/dpo"], [base, dpo]).splitlines() == [
        "figure                runs/base  runs/dpo",
        "exact 定义 (1)             0.0%      0.0%",  # CJK takes two columns
        "exact 算术 (2)             0.0%     50.0%",
        "exact all (3)              0.0%     33.3%",
        "perplexity               31.200     1.500",
        "distinct-1                0.500     0.500",
        "distinct-2                0.750     0.750",
        "preference (3 pairs)     66.7%*   100.0%",  # * raw log-probs; the others' digits stay aligned
        "margin                   0.067*    1.250",
    ]


# mistakes in a pairs file: one line, before any model is read


def test_bin_eval_bad_pairs_line(tmp_path, capsys, monkeypatch):
    bad = write_pairs(tmp_path / "pairs.jsonl", [PAIRS[0], {"prompt": "你好", "chosen": "你好！"}])
    code, _, err = run_main("eval", ["--checkpoint", tmp_path, "--pairs", bad], capsys, monkeypatch)
    one_line_error(code, err, f"{bad}:2: missing 'rejected'")


def test_dpo_run_reads_its_test_pairs_before_training(tmp_path, capsys, monkeypatch):
    """A bad data.test stops a DPO run before anything else is read (the base, here missing, included)."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    bad = write_pairs(tmp_path / "test.jsonl", [PAIRS[1], {**PAIRS[2], "rejected": PAIRS[2]["chosen"]}])
    config = write_tiny_config(str(tmp_path), tmp_path / "run")
    code, _, err = run_main("train", ["--config", config, "--set", "train.objective=dpo", "--set",
                                      f"model.init_from={tmp_path / 'missing'}", "--set", f"data.train={pairs}",
                                      "--set", f"data.val={pairs}", "--set", f"data.test={bad}"], capsys, monkeypatch)
    one_line_error(code, err, f"{bad}:2: 'chosen' and 'rejected' are the same answer")
    assert not (tmp_path / "run").exists()


# on trained runs


def train_dpo(tmp, init_from: str, *sets) -> dict:
    """A tiny DPO run from `init_from`: 10 steps on PAIRS x 10, validated on PAIRS (whose reference
    log-probs it keeps in reference.npz), with seed DPO_SEED and the further --set `sets`."""
    pairs = write_pairs(tmp / "pairs.jsonl", PAIRS)
    train = write_pairs(tmp / "pairs_train.jsonl", PAIRS * 10)  # (write_tiny_config writes train.jsonl)
    config = write_tiny_config(str(tmp), tmp / "run")
    args = ["train.objective=dpo", f"model.init_from={init_from}", f"data.train={train}", f"data.val={pairs}",
            "train.max_steps=10", f"train.seed={DPO_SEED}", *sets]
    argv = ["train", "--config", config, *[a for kv in args for a in ("--set", kv)], "--no-progress"]
    out = io.StringIO()  # bin/train's main in this process (its own process is tested in test_dpo.py)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(sys, "argv", argv)
        importlib.import_module("jaxsft.cli.train").main()
    return {"run_dir": str(tmp / "run"), "pairs": pairs, "stdout": out.getvalue()}


@pytest.fixture(scope="module")
def dpo_run(trained_run, tmp_path_factory):
    """A tiny DPO run from the tiny SFT run, ending with its report on data.test = PAIRS."""
    tmp = tmp_path_factory.mktemp("dpo")
    return train_dpo(tmp, trained_run["run_dir"], f"data.test={tmp / 'pairs.jsonl'}")


def check_against_start(run, tmp_path, capsys, monkeypatch) -> tuple[dict, str]:
    """bin/eval --pairs on a DPO run: its figures are those of hand-computed log-probs against the
    reference log-probs the run computed before its first step (reference.npz: data.val is PAIRS,
    in order); returns (the JSON report, stdout)."""
    out = tmp_path / "prefs.json"
    code, stdout, err = run_main("eval", ["--checkpoint", run["run_dir"], "--pairs", run["pairs"], "--json", out],
                                 capsys, monkeypatch)
    assert code == 0, err
    report = json.loads(out.read_text(encoding="utf-8"))
    with np.load(os.path.join(run["run_dir"], "reference.npz")) as f:
        reference = f["val"]
    logps = hand_logps(run["run_dir"])
    diff = (logps[:, 0] - reference[:, 0]) - (logps[:, 1] - reference[:, 1])
    assert np.abs(diff).min() > 1e-3  # no near-tie for the float noise of batching to turn over
    assert_figures(report, hand_figures(diff))
    assert report["reference"].startswith("start (model.init_from ") and not report["raw"]
    assert "raw log-probs" not in stdout and "reward = log p(answer) - log p_ref(answer)" in stdout
    return report, stdout


@pytest.mark.slow
def test_bin_eval_pairs_on_an_sft_run_compares_raw_logps(trained_run, tmp_path, capsys, monkeypatch):
    pairs, out = write_pairs(tmp_path / "pairs.jsonl", PAIRS), tmp_path / "prefs.json"
    code, stdout, err = run_main("eval", ["--checkpoint", trained_run["run_dir"], "--pairs", pairs, "--json", out],
                                 capsys, monkeypatch)
    assert code == 0, err
    report = json.loads(out.read_text(encoding="utf-8"))
    logps = hand_logps(trained_run["run_dir"])
    expected = hand_figures(logps[:, 0] - logps[:, 1])
    assert expected["preference_accuracy"] == 5 / 6  # the memorised answers win; the last pair's is the rejected
    assert_figures(report, expected)
    assert report["reference"] == SELF and report["dropped"] == 0
    said = [line for line in stdout.splitlines() if "raw log-probs" in line]
    assert len(said) == 1 and said[0].startswith("reference: ") and "log p(chosen) > log p(rejected)" in said[0]
    assert stdout.splitlines()[-1].split() == ["all", "6", "83.3%", f"{expected['margin']:.3f}"]


@pytest.mark.slow
def test_bin_eval_pairs_on_a_dpo_run_measures_rewards_against_its_start(dpo_run, tmp_path, capsys, monkeypatch):
    """The reference is rebuilt from model.init_from as training began (new characters' rows from the
    run's seed): its log-probs are those the run computed before its first step."""
    report, _ = check_against_start(dpo_run, tmp_path, capsys, monkeypatch)

    # the run's report on data.test (the same pairs) at the end of training: the same figures, 3 greedy answers
    test_report = json.loads(open(os.path.join(dpo_run["run_dir"], "test_report.json"), encoding="utf-8").read())
    assert test_report["preference_accuracy"] == report["preference_accuracy"]
    assert test_report["margin"] == pytest.approx(report["margin"], rel=1e-5)
    lines = dpo_run["stdout"].splitlines()
    at = lines.index("greedy answers:")
    assert lines[at - 1].split()[:2] == ["all", "6"] and lines[at + 4].startswith("done: ")
    assert [line.split(" -> ")[0].strip() for line in lines[at + 1:at + 4]] == ["什么是机器学习？", "你好", "1+1等于几？"]


@pytest.mark.slow
def test_bin_eval_pairs_on_a_lora_dpo_run_measures_rewards_against_its_base(trained_run, tmp_path, capsys,
                                                                              monkeypatch):
    """With LoRA the reference is the same base with the adapters off (and the new characters' rows
    as they started)."""
    run = train_dpo(tmp_path, trained_run["run_dir"], "lora.rank=4")
    check_against_start(run, tmp_path, capsys, monkeypatch)


@pytest.mark.slow
def test_bin_eval_compares_runs_in_one_table(trained_run, dpo_run, tmp_path, capsys, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EVAL_ROWS), encoding="utf-8")
    sft, dpo, out = trained_run["run_dir"], dpo_run["run_dir"], tmp_path / "compare.json"
    code, stdout, err = run_main("eval", ["--checkpoint", sft, dpo, "--data", data, "--pairs", dpo_run["pairs"],
                                          "--json", out], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [r["checkpoint"] for r in report["runs"]] == [sft, dpo]
    table = stdout.splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("figure"))
    assert table[head].split() == ["figure", sft, dpo]  # a column per run
    cells = {line.rsplit(None, 2)[0].strip(): line.split()[-2:] for line in table[head + 1:] if line[:1] != "*"}
    first = report["runs"][0]

    # the SFT run (test_evaluate.py's answers): exact match per category, distinct-n of its answers in characters
    assert cells["exact 算术 (1)"][0] == "100.0%" and cells["exact 闲聊 (1)"][0] == "0.0%"
    assert cells["exact all (4)"][0] == "50.0%" and first["overall"]["exact_match"] == 0.5
    for n in (1, 2):
        assert first[f"distinct_{n}"] == pytest.approx(distinct_n([list(a) for a in ANSWERS], n))
        assert cells[f"distinct-{n}"][0] == f"{first[f'distinct_{n}']:.3f}"

    # perplexity: exp of the token-weighted mean of the reference answers' negative log-probs
    params, mc, tok = runs.restore(sft)
    system = json.loads(open(os.path.join(sft, "config.json"), encoding="utf-8").read())["data"]["system_prompt"]
    references = ["让计算机从数据中学习规律。", "你好！", "等于2。", "蓝色。"]  # "expected" over "response"
    contexts = [[("user", "什么是机器学习？")], [("user", "你好")], [("user", "1+1等于几？")], [("user", "天空是什么颜色？")]]
    nll = -sum(hand_logp(params, mc, tok, system, c, a) for c, a in zip(contexts, references))
    assert first["perplexity"] == pytest.approx(np.exp(nll / sum(len(a) + 1 for a in references)), rel=1e-4)

    # preference: the SFT run by raw log-probs (marked *), the DPO run by rewards
    assert [r["preference"]["raw"] for r in report["runs"]] == [True, False]
    dpo_accuracy = report["runs"][1]["preference"]["preference_accuracy"]
    assert cells["preference (6 pairs)"] == ["83.3%*", f"{100 * dpo_accuracy:.1f}%"]
    assert sum("raw log-probs" in line for line in table) == 1
