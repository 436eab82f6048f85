"""bin/train and bin/chat end to end, in subprocesses: a tiny model memorises a few
answers and bin/chat prints them back; user mistakes exit 2 with one line (in this process
through main(); test_reliability.py has the table of bad inputs and bin/train's in a real
process, test_damaged_checkpoints.py bin/chat's)."""
import json
import math
import os
import re

import pytest

from conftest import TINY_STEPS, one_line_error, run_main, run_script, write_tiny_config


@pytest.mark.slow
def test_train_memorises(trained_run):
    proc, run_dir = trained_run["proc"], trained_run["run_dir"]
    assert "Traceback" not in proc.stderr
    done = proc.stdout.strip().splitlines()[-1]
    assert re.match(rf"done: {TINY_STEPS} steps in \d+ s, best validation loss ", done), done
    best = float(done.split("best validation loss ")[1].split(",")[0])
    assert best < 0.1
    assert {"config.json", "tokenizer.json", "best", "latest", "metrics.jsonl"} <= set(os.listdir(run_dir))
    records = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, TINY_STEPS + 1))
    assert train[0]["loss"] > 2.0 and train[-1]["loss"] < 0.1
    assert val[-1]["step"] == TINY_STEPS and min(r["val_loss"] for r in val) == pytest.approx(best, abs=1e-4)
    # exact match of greedy answers on the 4 val rows, logged at each evaluation (wall time too)
    assert val[-1]["val_exact"] == 1.0
    assert all(r["val_exact"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in val)
    assert [r["elapsed_s"] for r in val] == sorted(r["elapsed_s"] for r in val)
    assert f"step {TINY_STEPS}: val_loss" in proc.stdout and "exact match 100.0% of 4 rows" in proc.stdout


@pytest.mark.slow
def test_logged_learning_rate_is_the_schedule_of_each_update(trained_run):
    """metrics.jsonl's lr at step s is the rate update s used, lr(s - 1) (optax counts updates
    from 0), over the run's real length: make_schedule, and independently the closed form of
    warmup to lr over w updates, then a cosine to 0 at the last."""
    from jaxsft.config import load_config
    from jaxsft.steps import make_schedule
    tc = load_config(trained_run["config"], [f"train.max_steps={TINY_STEPS}"]).train
    total, w = TINY_STEPS, tc.warmup_steps
    with open(os.path.join(trained_run["run_dir"], "metrics.jsonl"), encoding="utf-8") as f:
        logged = {r["step"]: r["lr"] for r in map(json.loads, f) if "lr" in r}
    assert sorted(logged) == list(range(1, total + 1))
    schedule = make_schedule(tc, total)
    for step, lr in logged.items():
        s = step - 1
        closed = tc.lr * s / w if s < w else tc.lr * 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w)))
        assert lr == float(schedule(s)), step
        assert lr == pytest.approx(closed, rel=1e-5, abs=tc.lr * 1e-7), step
    assert logged[1] == 0.0 and logged[w + 1] == pytest.approx(tc.lr)  # warmup from 0, the peak at step w + 1


@pytest.mark.slow
def test_train_scores_the_test_set_with_the_best_checkpoint(trained_run, tmp_path, capsys, monkeypatch):
    """bin/train with data.test prints the per-category table of the best checkpoint and
    writes out_dir/test_report.json; its figures and answers are bin/eval's (main() in this
    process: bin/eval's own process is test_evaluate's)."""
    proc, run_dir = trained_run["proc"], trained_run["run_dir"]
    assert f"best checkpoint on {trained_run['rows']}: 4 rows, greedy" in proc.stdout
    assert re.search(r"^all +4 +100\.0% +1\.000", proc.stdout, re.M), proc.stdout
    with open(os.path.join(run_dir, "test_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["n"] == 4 and report["overall"]["exact_match"] == 1.0
    assert [r["answer"] for r in report["rows"]] == [r["expected"] for r in report["rows"]]
    out = tmp_path / "eval.json"
    code, _, err = run_main("eval", ["--checkpoint", run_dir, "--data", trained_run["rows"], "--json", out], capsys,
                            monkeypatch)
    assert code == 0, err
    with open(out, encoding="utf-8") as f:
        by_eval = json.load(f)
    assert by_eval["rows"] == report["rows"] and by_eval["by_category"] == report["by_category"]


def test_train_checks_the_test_file_before_training(tmp_path, qa, capsys, monkeypatch):
    """A test row without a reference answer stops bin/train before any step, with file:line."""
    config = write_tiny_config(tmp_path, tmp_path / "run")
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps({"instruction": qa[0][0], "response": qa[0][1]}, ensure_ascii=False) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    code, _, err = run_main("train", ["--config", config, "--set", f"data.test={bad}", "--no-progress"], capsys,
                            monkeypatch)
    one_line_error(code, err, f"{bad}:2", "no reference answer")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_chat_prints_the_trained_answer(trained_run, qa):
    question, answer = qa[2]
    proc = run_script("chat", "--checkpoint", trained_run["run_dir"], question)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == answer + "\n"


@pytest.mark.slow
def test_chat_file_writes_one_line_per_row(trained_run, qa, tmp_path, capsys, monkeypatch):
    """bin/chat --file, main() in this process (bin/chat's own process: the test above)."""
    rows = tmp_path / "rows.jsonl"
    with open(rows, "w", encoding="utf-8") as f:
        for q, _ in qa:
            f.write(json.dumps({"instruction": q}, ensure_ascii=False) + "\n")  # no answer needed
        f.write("\n")  # blank lines are skipped
        f.write(json.dumps({"messages": [{"role": "user", "content": qa[0][0]}]}, ensure_ascii=False) + "\n")
    out = tmp_path / "answers.jsonl"
    code, stdout, err = run_main("chat", ["--checkpoint", trained_run["run_dir"], "--file", rows, "--out", out], capsys,
                                 monkeypatch)
    assert code == 0, err
    assert stdout == ""
    got = [json.loads(l) for l in open(out, encoding="utf-8")]
    assert [r["line"] for r in got] == [1, 2, 3, 4, 6]
    assert [r["question"] for r in got] == [q for q, _ in qa] + [qa[0][0]]
    assert [r["answer"] for r in got] == [a for _, a in qa] + [qa[0][1]]


def test_chat_bad_json_line(tmp_path, capsys, monkeypatch):
    """The rows are read before the run: a bad line is named though the run is missing too."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "你好"}\n[1, 2\n', encoding="utf-8")
    code, _, err = run_main("chat", ["--checkpoint", tmp_path / "none", "--file", rows], capsys, monkeypatch)
    one_line_error(code, err, f"{rows}:2", "not valid JSON")
