"""Data files of every type and row form (datasets_io.py, rowforms.py): the same rows give
the same examples and batches whichever way they come; data.columns renames fields; a bad
row is one line naming the file and the row, exit 2; the map steps are cached by content.

The reference is jaxsft's own JSONL read in memory, as it always was."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import one_line_error, run_main

from jaxsft import data, datasets_io, parallel
from jaxsft.config import DataConfig, UserError, load_config
from jaxsft.setup import prepare
from jaxsft.tokenizer import Tokenizer

# (conversation, category, expected): single-turn rows every form can hold (one with an Alpaca input)
SINGLE = [
    ((("user", "1+1等于几？"), ("assistant", "等于2。")), "算术", "等于2。"),
    ((("user", "把“cat”倒过来\nabc"), ("assistant", "“tac”。")), "字符串", None),
    ((("user", "天空是什么颜色？"), ("assistant", "8")), "", None),  # a numeric answer stays text in CSV
]
# multi-turn rows with a system turn: messages and conversations hold them
MULTI = [
    ((("system", "简短回答。"), ("user", "你好"), ("assistant", "你好！"), ("user", "再见"), ("assistant", "再见。")),
     "多轮", "再见。"),
    ((("user", "红色加黄色？"), ("assistant", "橙色。")), "颜色", "橙色。"),
]
ROLE_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


def as_form(conv, category, expected, form) -> dict:
    """One row of `form` holding this conversation."""
    extra = {"category": category, **({"expected": expected} if expected is not None else {})}
    if form == "jaxsft":
        return {"instruction": conv[0][1], "response": conv[1][1], **extra}
    if form == "openai":
        return {"messages": [{"role": r, "content": c} for r, c in conv], **extra}
    if form == "sharegpt":
        return {"conversations": [{"from": ROLE_FROM[r], "value": c} for r, c in conv], **extra}
    if form == "alpaca":  # a question with a line break: its instruction, then its input
        ins, _, inp = conv[0][1].partition("\n")
        return {"instruction": ins, "input": inp, "output": conv[1][1], **extra}
    if form == "completion":
        return {"prompt": conv[0][1], "completion": conv[1][1], **extra}
    raise ValueError(form)


def write(path, rows: list, kind: str) -> str:
    """rows (dicts) as a file of `kind`; returns the path given to data.train."""
    import pyarrow as pa
    path = str(path)
    if kind in ("jsonl", "big-jsonl"):
        with open(path + ".jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return path + ".jsonl"
    if kind == "json":
        with open(path + ".json", "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False)
        return path + ".json"
    if kind == "csv":  # cells are text: messages and conversations as JSON
        import csv
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with open(path + ".csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in rows:
                w.writerow([json.dumps(r[c], ensure_ascii=False) if isinstance(r.get(c), list) else r.get(c, "")
                            for c in cols])
        return path + ".csv"
    table = pa.Table.from_struct_array(pa.array(rows))  # the columns of every row (from_pylist: the first's)
    if kind == "parquet":
        import pyarrow.parquet as pq
        pq.write_table(table, path + ".parquet")
        return path + ".parquet"
    if kind == "arrow":
        with pa.OSFile(path + ".arrow", "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
        return path + ".arrow"
    if kind == "disk":
        import datasets
        datasets.Dataset(table).save_to_disk(path)
        return path
    raise ValueError(kind)


def reference(tmp_path, convs):
    """(rows, tokenizer, examples) of jaxsft's own JSONL (messages) read in memory."""
    path = write(tmp_path / "reference", [as_form(*c, "openai") for c in convs], "jsonl")
    rows = datasets_io.MemoryRows(data.read_jsonl(path))
    tok = Tokenizer.build(rows.texts() + ["系统", "\n"])
    return rows.rows, tok, rows.examples(tok, "系统", 40)


def same_examples(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert u.dtype == v.dtype == np.int32 and u.tolist() == v.tolist()


KINDS = ["jsonl", "big-jsonl", "json", "parquet", "csv", "arrow", "disk"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_type_and_row_form_gives_the_same_rows_and_examples(kind, tmp_path, monkeypatch):
    """Each row form in each file type: the rows, the vocabulary's characters, and the token
    arrays and loss masks of the examples are the reference's (one row too long is dropped
    alike). big-jsonl: JSON Lines above ARROW_BYTES, read through datasets."""
    if kind == "big-jsonl":
        monkeypatch.setattr(datasets_io, "ARROW_BYTES", 0)
    long = ((("user", "长" * 50), ("assistant", "答")), "", None)  # no answer token within 40: dropped
    cases = [(SINGLE + [long], form) for form in ("jaxsft", "openai", "alpaca", "sharegpt", "completion")]
    cases += [(MULTI, form) for form in ("openai", "sharegpt")]
    for convs, form in cases:
        ref_rows, tok, (ref_ex, ref_dropped) = reference(tmp_path, convs)
        path = write(tmp_path / f"{form}-{len(convs)}", [as_form(*c, form) for c in convs], kind)
        rows = datasets_io.train_rows(path)
        assert isinstance(rows, datasets_io.MemoryRows if kind == "jsonl" else datasets_io.ArrowRows), kind
        got = rows.rows if kind == "jsonl" else rows.rows()
        assert [(r.messages, r.category, r.expected) for r in got] == \
            [(r.messages, r.category, r.expected) for r in ref_rows], (kind, form)
        assert set("".join(rows.texts())) == set("".join(ref_rows_texts(ref_rows))), (kind, form)
        ex, dropped = rows.examples(tok, "系统", 40)
        assert dropped == ref_dropped, (kind, form)
        same_examples(ex, ref_ex)


def ref_rows_texts(rows):
    return data.row_texts(rows)


def test_a_training_set_in_arrow_gives_the_batches_of_the_jsonl_one(tmp_path, monkeypatch):
    """prepare() on a ShareGPT Parquet copy of a JSONL training set (its examples kept in Arrow):
    the same vocabulary, and bitwise the same batches at every step, curriculum, packing and
    the shared system prompt included, so training and --resume go exactly as on the JSONL."""
    convs = [((("user", f"{a}加{b}等于多少？"), ("assistant", f"{a}加{b}等于{a + b}。")), "算术" if a % 3 else "其他",
              None) for a, b in ((i % 17, 3 * i % 23) for i in range(60))]
    jsonl = write(tmp_path / "train", [as_form(*c, "jaxsft") for c in convs], "jsonl")
    parquet = write(tmp_path / "train", [as_form(*c, "sharegpt") for c in convs], "parquet")
    val = write(tmp_path / "val", [as_form(*c, "jaxsft") for c in convs[:8]], "jsonl")
    mesh = parallel.one_device_mesh()
    sets = ["model.max_seq_len=64", "model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64",
            f"data.val={val}", "data.test=null", "train.batch_size=8", "train.max_steps=40", "train.epochs=null",
            "train.focus_categories=[算术]", "train.focus_steps=5", "train.pack_len=64", "train.buckets=[64]"]
    a = prepare(load_config(None, sets + [f"data.train={jsonl}"]), mesh, log=lambda *a, **k: None)
    b = prepare(load_config(None, sets + [f"data.train={parquet}"]), mesh, log=lambda *a, **k: None)
    assert isinstance(b.train_examples, datasets_io.ArrowExamples) and isinstance(a.train_examples, list)
    assert a.tok.itos == b.tok.itos and a.plan.total_steps == b.plan.total_steps == 40
    assert a.plan.focus_steps == b.plan.focus_steps == 5
    for step in range(a.plan.total_steps):
        x, y = a.plan.batch(step), b.plan.batch(step)
        for f in x.__dataclass_fields__:
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None and v is None) or np.array_equal(u, v), (step, f)


def test_columns_rename_fields_also_inside_messages(tmp_path, monkeypatch):
    """data.columns {our name: theirs}: top-level fields and the keys inside conversations; in
    memory and through datasets alike. Without it the row is a one-line error."""
    ref_rows, tok, (ref_ex, _) = reference(tmp_path, MULTI)
    rows = [{"dialog": [{"speaker": ROLE_FROM[r], "text": c} for r, c in conv], "topic": cat,
             **({"expected": exp} if exp else {})} for conv, cat, exp in MULTI]
    cfg = DataConfig(columns={"conversations": "dialog", "from": "speaker", "value": "text", "category": "topic"})
    for kind in ("jsonl", "parquet"):
        path = write(tmp_path / "renamed", rows, kind)
        got = datasets_io.read_rows(path, cfg)
        assert [(r.messages, r.category, r.expected) for r in got] == \
            [(r.messages, r.category, r.expected) for r in ref_rows]
        same_examples(datasets_io.train_rows(path, cfg).examples(tok, "系统", 40)[0], ref_ex)
        with pytest.raises(UserError, match=r"renamed\.(jsonl:1|parquet row 1): missing 'instruction'"):
            datasets_io.read_rows(path)
    flat = [{"question": conv[0][1], "answer": conv[1][1]} for conv, _, _ in SINGLE]
    path = write(tmp_path / "flat", flat, "csv")
    got = datasets_io.read_rows(path, DataConfig(columns={"instruction": "question", "response": "answer"}))
    assert [r.messages for r in got] == [c for c, _, _ in SINGLE]
    # a CSV column of numbers only is still text ("12", not 12)
    path = write(tmp_path / "numbers", [{"instruction": "5+7?", "response": "12"}, {"instruction": "1+1?",
                                                                                  "response": "2"}], "csv")
    assert [r.messages[1][1] for r in datasets_io.read_rows(path)] == ["12", "2"]


def test_lists_globs_and_preference_pairs(tmp_path):
    """A list and a glob read their files in order (a glob in name order); preference pairs
    read from Parquet are those of the JSONL."""
    one = write(tmp_path / "a", [as_form(*c, "sharegpt") for c in MULTI], "parquet")
    two = write(tmp_path / "b", [as_form(*c, "jaxsft") for c in SINGLE], "jsonl")
    convs = [c for c, _, _ in MULTI + SINGLE]
    assert [r.messages for r in datasets_io.read_rows([one, two])] == convs
    assert [r.messages for r in datasets_io.read_rows([two, one])] == convs[2:] + convs[:2]
    assert [r.messages for r in datasets_io.read_rows(str(tmp_path / "[ab].*"))] == convs
    pairs = [{"prompt": "1+1=?", "chosen": "2", "rejected": "3", "category": "算术"},
             {"messages": [{"role": "user", "content": "你好"}], "chosen": "你好！", "rejected": "嗯", "system": "简短"}]
    ref = data.read_pairs(write(tmp_path / "pairs", pairs, "jsonl"))
    got = datasets_io.read_pairs(write(tmp_path / "pairs", pairs, "parquet"))
    assert [(p.prompt, p.chosen, p.rejected, p.category) for p in got] == \
        [(p.prompt, p.chosen, p.rejected, p.category) for p in ref]
    assert datasets_io.holds_pairs(str(tmp_path / "pairs.parquet"))
    assert not datasets_io.holds_pairs(one)


def test_map_steps_are_cached_by_content(tmp_path, monkeypatch):
    """A second read of the same file with the same tokenizer runs no map step; a changed file
    or tokenizer does."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = write(tmp_path / "t", [as_form(*c, "sharegpt") for c in MULTI], "parquet")
    tok = Tokenizer.build(datasets_io.train_rows(path).texts() + ["\n"])
    first = datasets_io.train_rows(path).examples(tok, "", 40)[0]
    calls = []
    for step in ("_rows_step", "_chars_step", "_examples_step"):
        real = getattr(datasets_io, step)
        monkeypatch.setattr(datasets_io, step, lambda *a, _real=real, _s=step, **k: calls.append(_s) or _real(*a, **k))
    rows = datasets_io.train_rows(path)
    rows.texts()
    same_examples(rows.examples(tok, "", 40)[0], first)
    assert calls == []
    rows.examples(Tokenizer.build(rows.texts() + ["\n", "新"]), "", 40)
    assert calls == ["_examples_step"]
    write(tmp_path / "t", [as_form(*c, "sharegpt") for c in MULTI[:1]], "parquet")
    assert len(datasets_io.train_rows(path)) == 1 and "_rows_step" in calls


# bad rows in other files: one line naming the file and the row, exit 2, nothing written

YAML = """\
model: {max_seq_len: 64, d_model: 32, n_heads: 2, n_layers: 1, d_ff: 64}
data: {train: train.parquet, val: val.jsonl, test: null}
train: {batch_size: 4, epochs: 1, sample_questions: 0, buckets: [64]}
out_dir: run
"""
GOOD = [as_form(*c, "sharegpt") for c in MULTI]
T = ["--config", "tiny.yaml", "--no-progress"]
BAD_FILES = [
    # (id, files {name: (rows, kind)} or raw bytes, extra args, the error line's fragments)
    ("parquet-missing-answer", {"train": (GOOD + [{"conversations": [{"from": "human", "value": "问"}]}], "parquet")},
     [], ["train.parquet row 3: messages has no assistant answer"]),
    ("parquet-unknown-from", {"train": (GOOD + [{"conversations": [{"from": "bot", "value": "答"}]}], "parquet")},
     [], ["train.parquet row 3: conversations[0] has unknown 'from' 'bot'"]),
    ("parquet-empty-answer", {"train": ([{"conversations": [{"from": "human", "value": "问"}, {"from": "gpt",
                                                                                             "value": " "}]}], "parquet")},
     [], ["train.parquet row 1: messages[1] has an empty assistant answer"]),
    ("alpaca-not-string", {"train": ([{"instruction": "问", "output": 3}], "parquet")}, [],
     ["train.parquet row 1: 'output' must be a string"]),
    ("csv-missing-response", {"train": ([{"instruction": "问", "response": "答"}, {"instruction": "问"}], "csv")},
     ["--set", "data.train=train.csv"], ["train.csv row 2: missing 'response'"]),
    ("json-not-alternating", {"train": ([{"messages": [{"role": "user", "content": "a"},
                                                       {"role": "user", "content": "b"}]}], "json")},
     ["--set", "data.train=train.json"], ["train.json row 1: messages must alternate user/assistant"]),
    ("disk-pair-in-sft", {"train": ([{"prompt": "p", "chosen": "a", "rejected": "b"}], "disk")},
     ["--set", "data.train=train"], ["train row 1: a preference pair (chosen/rejected)"]),
    ("val-parquet-bad", {"val": ([{"prompt": "p", "completion": 5}], "parquet")}, ["--set", "data.val=val.parquet"],
     ["val.parquet row 1: 'completion' must be a string"]),
    ("not-parquet", {"train.parquet": b"not parquet at all"}, [], ["train.parquet: cannot read this parquet file"]),
    ("empty-parquet", {"train": ([], "parquet")}, [], ["train.parquet: no rows"]),
    ("glob-no-match", {}, ["--set", "data.train=nope/*.parquet"], ["nope/*.parquet: no file matches"]),
    ("plain-directory", {"dir/x.txt": b"x"}, ["--set", "data.train=dir"], ["dir: a directory, and not one"]),
    ("unknown-format", {}, ["--set", "data.format=chatgpt"], ["data.format: expected one of jaxsft"]),
    ("unknown-column", {}, ["--set", "data.columns={question: q}"], ["data.columns: unknown field 'question'"]),
    ("empty-list", {}, ["--set", "data.train=[]"], ["data.train: expected a path or a non-empty list"]),
]


@pytest.mark.parametrize("case", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_rows_of_other_files_are_one_line_and_exit_2(case, tmp_path, capsys, monkeypatch):
    from test_reliability import snapshot
    _, files, args, fragments = case
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(YAML, encoding="utf-8")
    write(tmp_path / "train", GOOD, "parquet")
    write(tmp_path / "val", [as_form(*c, "jaxsft") for c in SINGLE], "jsonl")
    for name, content in files.items():
        if isinstance(content, bytes):
            os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
            (tmp_path / name).write_bytes(content)
        else:
            rows, kind = content
            if kind == "parquet" and not rows:
                import pyarrow as pa
                import pyarrow.parquet as pq
                pq.write_table(pa.table({"conversations": pa.array([], pa.string())}), tmp_path / f"{name}.parquet")
            else:
                write(tmp_path / name, rows, kind)
    before = snapshot(tmp_path)
    code, _, err = run_main("train", T + args, capsys, monkeypatch)
    one_line_error(code, err, *fragments)
    assert snapshot(tmp_path) == before


def test_large_jsonl_read_through_datasets_errs_as_in_memory(tmp_path, monkeypatch):
    """Every bad-row case of test_reliability's JSONL files, read through datasets (a file
    above ARROW_BYTES): the same message as the in-memory reader's."""
    from test_reliability import BAD_INPUTS, TRAIN, VAL
    cases = [(name, files) for name, prog, args, files, setup, _ in BAD_INPUTS
             if prog == "train" and not args[3:] and set(files) & {"train.jsonl", "val.jsonl"}]
    assert len(cases) >= 12
    # a row mistake before a line that is not JSON: data.py reads every line before any row
    cases.append(("row-then-json", {"train.jsonl": '{"instruction": "问"}\n\n{"instruction": "问", "response"\n'}))
    for name, files in cases:
        for split, text in {"train.jsonl": TRAIN, "val.jsonl": VAL, **files}.items():
            (tmp_path / split).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        messages = []
        for limit in (1 << 40, 0):
            monkeypatch.setattr(datasets_io, "ARROW_BYTES", limit)
            with pytest.raises(UserError) as e:
                for split in ("train.jsonl", "val.jsonl"):
                    datasets_io.read_rows(str(tmp_path / split))
            messages.append(str(e.value))
        assert messages[0] == messages[1], name


@pytest.mark.slow
def test_training_from_parquet_sharegpt_logs_the_jsonl_losses_bit_for_bit(tmp_path, capsys, monkeypatch):
    """bin/train (in this process) on the JSONL and on a ShareGPT Parquet copy of it: the same
    metrics.jsonl losses, learning rates, gradient norms and validation losses, bit for bit."""
    convs = [((("user", f"{a}加{b}等于多少？"), ("assistant", f"{a}加{b}等于{a + b}。")), "算术", None)
             for a, b in ((i % 17, 3 * i % 23) for i in range(48))]
    jsonl = write(tmp_path / "train", [as_form(*c, "jaxsft") for c in convs], "jsonl")
    parquet = write(tmp_path / "train", [as_form(*c, "sharegpt") for c in convs], "parquet")
    val = write(tmp_path / "val", [as_form(*c, "openai") for c in convs[:8]], "parquet")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(YAML, encoding="utf-8")
    logs = []
    for train in (jsonl, parquet):
        out = f"run-{os.path.basename(train)}"
        code, _, err = run_main("train", T + ["--set", f"data.train={train}", "--set", f"data.val={val}",
                                              "--set", "train.max_steps=8", "--set", "train.pack_len=64",
                                              "--set", f"out_dir={out}"], capsys, monkeypatch)
        assert code == 0, err
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            logs.append([{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s",)} for line in f])
    assert [r for r in logs[0] if "loss" in r] and logs[0] == logs[1]
