"""Rows and examples from any data source: JSON Lines in memory, everything else through
Hugging Face `datasets`.

data.train / val / test (data.resolve: files, globs, lists, save_to_disk directories) are
read by one of two paths that give the same rows, examples and error messages:

- in memory (data.py): JSON Lines files of at most ARROW_BYTES together, as jaxsft always read
  them; rows are Python objects, examples a list (chatml.encode_rows);
- through `datasets` (Arrow, memory-mapped, cached): every other file type, and JSON Lines above
  ARROW_BYTES. Each source is loaded (datasets' own builders; JSON Lines line by line, so
  errors keep their line), then turned into jaxsft's rows by a map step (`_rows_step`: the
  form's conversion and data.py's checks; a bad row is an `error` cell, and the first one
  found is raised). The training set's examples are a second map step (`_examples_step`:
  chatml.render and to_example) kept in Arrow; `ArrowExamples` reads them as the
  (inputs, targets, loss_mask) arrays a list would hold. Map steps are cached under
  HF_DATASETS_CACHE/jaxsft by the content of what they read and their parameters, so a second
  run on the same data and tokenizer reads them back; over PARALLEL_ROWS rows they use every core.

Validation and test rows (and DPO's pairs) are read through either path and returned as
lists: only the training set is kept in Arrow.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import numpy as np

from . import chatml, templates
from .config import DataConfig, UserError
from . import data as jsonl
from .data import Pair, Row, Source, is_pair, pair_from, resolve, row_form, row_from, row_texts
from .rowforms import LISTS, detect, json_cells, rename
from .tokenizer import AnyTokenizer

ARROW_BYTES = 64 << 20  # JSON Lines files of a split above this, together, are read through datasets
PARALLEL_ROWS = 50_000  # map steps over more rows than this run on every core (num_proc)
PIPELINE = "1"  # part of every cache key: change it when what a step makes changes


# what callers use: rows and pairs as lists, a training set as rows in memory or in Arrow


def read_rows(spec, data: DataConfig = DataConfig(), need_answer: bool = True) -> list[Row]:
    """Every row of data.train / val / test `spec`, validated (UserError naming file and row)."""
    sources = resolve(spec)
    if _in_memory(sources):
        return [r for s in sources for r in jsonl.read_jsonl(s.path, need_answer, data.format, data.columns)]
    return ArrowRows.load(sources, data, need_answer).rows()


def read_pairs(spec, data: DataConfig = DataConfig()) -> list[Pair]:
    """Every preference pair of `spec` (read_pairs' forms, fields renamed by data.columns)."""
    sources = resolve(spec)
    if _in_memory(sources):
        return [p for s in sources for p in jsonl.read_pairs(s.path, data.columns)]
    ds = _validated([_load_source(s, i, data, need_answer=True, pairs=True) for i, s in enumerate(sources)])
    return [Pair(tuple((m["role"], m["content"]) for m in r["prompt"]), r["chosen"], r["rejected"], r["category"],
                 r["line"], sources[r["source"]].where(r["line"])) for r in ds.to_list()]


def holds_pairs(spec, data: DataConfig = DataConfig()) -> bool:
    """Whether `spec`'s first source holds preference pairs (data.is_pair of its first row)."""
    s = resolve(spec)[0]
    if _in_memory((s,)):
        return jsonl.holds_pairs(s.path, data.columns)
    raw = _raw(s)
    if s.kind == "lines":
        return is_pair(rename(_first_json(raw), data.columns))
    return is_pair(rename(dict.fromkeys(raw.column_names, ""), data.columns))


def train_rows(spec, data: DataConfig = DataConfig()):
    """The training rows of `spec`: `MemoryRows` (JSON Lines up to ARROW_BYTES) or `ArrowRows`."""
    sources = resolve(spec)
    if _in_memory(sources):
        return MemoryRows(read_rows(spec, data))
    return ArrowRows.load(sources, data)


@dataclass(frozen=True)
class MemoryRows:
    """Rows as a list: what a training set is made of, the way jaxsft always held it."""
    rows: list

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self) -> list[str]:
        """Texts holding every character of the rows (for the vocabulary)."""
        return row_texts(self.rows)

    def categories(self) -> set:
        return {r.category for r in self.rows}

    def examples(self, tok: AnyTokenizer, system_prompt: Optional[str], max_seq_len: int, where: str = "rows",
                 categories: Optional[tuple] = None):
        """(examples, rows dropped as too long): chatml.encode_rows of the rows (of `categories`)."""
        rows = self.rows if categories is None else [r for r in self.rows if r.category in categories]
        return chatml.encode_rows(rows, tok, system_prompt, max_seq_len, where)


@dataclass(frozen=True)
class ArrowRows:
    """Validated rows in a `datasets.Dataset` (messages, category, expected, line, source) and
    the sources its `source` column indexes."""
    ds: Any
    sources: tuple

    @classmethod
    def load(cls, sources, data: DataConfig, need_answer: bool = True) -> "ArrowRows":
        return cls(_validated([_load_source(s, i, data, need_answer) for i, s in enumerate(sources)]),
                   tuple(sources))

    def __len__(self) -> int:
        return len(self.ds)

    def rows(self) -> list[Row]:
        return [Row(tuple((m["role"], m["content"]) for m in r["messages"]), r["category"], r["expected"], r["line"],
                    self.sources[r["source"]].where(r["line"])) for r in self.ds.to_list()]

    def texts(self) -> list[str]:
        """One text per batch of rows holding each of its characters once (a vocabulary needs no more)."""
        return _map(self.ds, _chars_step, "chars", _features({"chars": "string"}), batch_size=10_000,
                    input_columns=["messages"]).data.column("chars").to_pylist()

    def categories(self) -> set:
        import pyarrow.compute as pc
        return set(pc.unique(self.ds.data.column("category")).to_pylist())

    def examples(self, tok: AnyTokenizer, system_prompt: Optional[str], max_seq_len: int, where: str = "rows",
                 categories: Optional[tuple] = None):
        """(ArrowExamples, rows dropped as too long), as MemoryRows.examples gives them; a row the
        template cannot render is a UserError naming its file and row."""
        step = partial(_examples_step, tok=tok, system_prompt=system_prompt, max_seq_len=max_seq_len,
                       sources=self.sources)
        feats = _features({"ids": "int32[]", "loss": "int8[]", "category": "string", "line": "int64",
                           "source": "int32", "error": "string"})
        ds = _map(self.ds, step, "examples", feats, key=(_tokenizer_key(tok), system_prompt, max_seq_len))
        _raise_first(ds, ("error",))
        index = None
        if categories is not None:
            import pyarrow.compute as pc
            keep = pc.is_in(ds.data.column("category"), value_set=_pa().array(list(categories), _pa().string()))
            index = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
        return ArrowExamples(ds, index), len(self.ds) - len(ds)


class ArrowExamples(Sequence):
    """The examples of a `_examples_step` dataset, read in place (memory-mapped): item j is
    (inputs, targets, loss_mask), int32 arrays as chatml.to_example makes them; `index`
    (optional) picks and orders the rows seen."""

    def __init__(self, ds, index: Optional[np.ndarray] = None):
        self.ds = ds  # kept: it owns the memory map
        table = ds.data.table
        self._starts = np.cumsum([0] + [len(c) for c in table.column("ids").chunks])
        self._chunks = [(c.offsets.to_numpy(), c.values.to_numpy(), m.offsets.to_numpy(), m.values.to_numpy())
                        for c, m in zip(table.column("ids").chunks, table.column("loss").chunks)]
        self.index = index

    def __len__(self) -> int:
        return int(self._starts[-1]) if self.index is None else len(self.index)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if j < 0:
            j += len(self)
        if not 0 <= j < len(self):
            raise IndexError(j)
        row = int(j if self.index is None else self.index[j])
        c = int(np.searchsorted(self._starts, row, side="right")) - 1
        at, ids, loss_at, loss = self._chunks[c]
        k = row - int(self._starts[c])
        x = ids[at[k]:at[k + 1]]
        return x[:-1], x[1:], loss[loss_at[k]:loss_at[k + 1]].astype(np.int32)


# the steps


def _in_memory(sources) -> bool:
    return all(s.kind == "lines" for s in sources) and sum(os.path.getsize(s.path) for s in sources) <= ARROW_BYTES


def _pa():
    import pyarrow
    return pyarrow


def _datasets():
    """The datasets module, quiet: no progress bars, no log lines (errors become one UserError)."""
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def cache_dir() -> str:
    """Where the map steps keep their results: HF_DATASETS_CACHE/jaxsft."""
    return os.path.join(_datasets().config.HF_DATASETS_CACHE, "jaxsft")


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([PIPELINE, *parts], default=str).encode()).hexdigest()[:32]


def _features(spec: dict):
    """{name: "string" | "int64" | "int32" | "int32[]" | "int8[]" | "messages"} -> datasets.Features."""
    ds = _datasets()

    def one(t):
        if t == "messages":
            return ds.List({"role": ds.Value("string"), "content": ds.Value("string")})
        return ds.List(ds.Value(t[:-2])) if t.endswith("[]") else ds.Value(t)
    return ds.Features({k: one(t) for k, t in spec.items()})


ROW_COLUMNS = {"messages": "messages", "category": "string", "expected": "string", "line": "int64",
               "source": "int32", "json_error": "string", "error": "string"}
PAIR_COLUMNS = {"prompt": "messages", "chosen": "string", "rejected": "string", "category": "string",
                "line": "int64", "source": "int32", "json_error": "string", "error": "string"}


def _procs(n: int) -> Optional[int]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 8) if n > PARALLEL_ROWS and cores > 1 else None


def _map(ds, step, name: str, features, key=(), batch_size: int = 1000, input_columns=None,
         with_indices: bool = False):
    """ds.map(step) over Arrow batches, cached as HF_DATASETS_CACHE/jaxsft/<name>-<key>.arrow
    (key: ds's fingerprint, `key`, PIPELINE)."""
    fp = _key(name, ds._fingerprint, key)
    os.makedirs(cache_dir(), exist_ok=True)
    with warnings.catch_warnings():  # the workers run no JAX: its warning about fork does not apply
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        return ds.with_format("arrow").map(
            step, batched=True, batch_size=batch_size, input_columns=input_columns, with_indices=with_indices,
            remove_columns=ds.column_names,
            features=features, num_proc=_procs(len(ds)), new_fingerprint=fp,
            cache_file_name=os.path.join(cache_dir(), f"{name}-{fp}.arrow")).with_format(None)


def _lines(path: str):
    """The non-blank lines of a JSON Lines file, {text, line}, decoded as data.py's reader does."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            raw = raw.removesuffix(b"\n")
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{n}: not valid UTF-8 (byte {raw[e.start]:#04x})") from None
            if text.strip():
                yield {"text": text, "line": n}


def _raw(s: Source):
    """A source as datasets loads it: its own columns, or {text, line} for JSON Lines."""
    ds = _datasets()
    try:
        if s.kind == "lines":
            if not _has_text(s.path):
                raise UserError(f"{s.path}: no rows (the file is empty)")
            st = os.stat(s.path)
            return ds.Dataset.from_generator(_lines, features=_features({"text": "string", "line": "int64"}),
                                             gen_kwargs={"path": s.path},
                                             fingerprint=_key("lines", os.path.abspath(s.path), st.st_size,
                                                              st.st_mtime_ns))
        if s.kind == "disk":
            return ds.load_from_disk(s.path)
        features = None
        if s.kind == "parquet":  # (datasets fails on a file of no rows with a message of its own)
            import pyarrow.parquet as pq
            if pq.ParquetFile(s.path).metadata.num_rows == 0:
                raise UserError(f"{s.path}: no rows (the file is empty)")
        if s.kind == "csv":  # every cell a string: "8" stays the answer "8", not a number
            import csv
            with open(s.path, newline="", encoding="utf-8-sig") as f:
                header = next(csv.reader(f), [])
            features = ds.Features({c: ds.Value("string") for c in header})
        return ds.load_dataset(s.kind, data_files=os.path.abspath(s.path), split="train", features=features)
    except Exception as e:  # datasets wraps what went wrong: ours (a UserError), or the reader's
        inner = e
        while inner.__cause__ is not None or inner.__context__ is not None:
            if isinstance(inner, UserError):
                break
            inner = inner.__cause__ or inner.__context__
        if isinstance(inner, UserError):
            raise inner from None
        what = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
        raise UserError(f"{s.path}: cannot read this {s.kind} file ({what})") from None


def _has_text(path: str) -> bool:
    """Whether a file has a line that is not blank (read up to the first one; a BOM is not text)."""
    with open(path, "rb") as f:
        return any((line.removeprefix(b"\xef\xbb\xbf") if n == 0 else line).decode("utf-8", "replace").strip()
                   for n, line in enumerate(f))


def _first_json(raw) -> Any:
    """The first decoded row of a {text, line} dataset (None when it is not JSON)."""
    try:
        return json.loads(raw[0]["text"])
    except (json.JSONDecodeError, IndexError):
        return None


def _load_source(s: Source, index: int, data: DataConfig, need_answer: bool, pairs: bool = False):
    """One source's rows in jaxsft's form (ROW_COLUMNS or PAIR_COLUMNS), each with its error."""
    raw = _raw(s)
    if len(raw) == 0:
        raise UserError(f"{s.path}: no rows (the file is empty)")
    if pairs:
        form = None
    elif s.kind == "lines":
        form = data.format or row_form(_first_json(raw), data.columns)
    else:
        form = data.format or detect(rename(dict.fromkeys(raw.column_names, ""), data.columns))
    step = partial(_rows_step, source=s, index=index, form=form, columns=data.columns, need_answer=need_answer,
                   pairs=pairs)
    return _map(raw, step, "pairs" if pairs else "rows", _features(PAIR_COLUMNS if pairs else ROW_COLUMNS),
                key=(s, index, form, data.columns, need_answer), with_indices=True)


def _validated(parts):
    """The sources' datasets as one; UserError for the first bad row, source by source (in each, a
    line that is not JSON before any other mistake, as data.py reads them)."""
    for ds in parts:
        _raise_first(ds, ("json_error", "error"))
    return parts[0] if len(parts) == 1 else _datasets().concatenate_datasets(parts)


def _raise_first(ds, columns) -> None:
    """UserError with the first message of the first of `columns` that holds one."""
    import pyarrow.compute as pc
    for col in columns:
        c = ds.data.column(col)
        if c.null_count < len(c):
            raise UserError(c[pc.index(c.is_valid(), True).as_py()].as_py())


def _rows_step(batch, at: list, *, source: Source, index: int, form, columns, need_answer: bool, pairs: bool):
    """A batch of a source (Arrow) -> the same rows in jaxsft's form; a bad row's cells empty and
    its message in json_error (not JSON: JSON Lines only) or error. `at`: the batch's row indices."""
    pa = _pa()
    lines = source.kind == "lines"
    if lines:
        objs, numbers = [], batch.column("line").to_pylist()
        for text, n in zip(batch.column("text").to_pylist(), numbers):
            objs.append(_decode(text, source.where(n)))
    else:
        objs = _plain(batch)
        numbers = [i + 1 for i in at]
        if source.kind == "csv":
            objs = [json_cells(o) for o in objs]
    cols = PAIR_COLUMNS if pairs else ROW_COLUMNS
    turns_col = "prompt" if pairs else "messages"
    out, turns = {k: [] for k in cols if k != turns_col}, []  # turns: each row's messages
    for obj, n in zip(objs, numbers):
        where = source.where(n)
        rec, msgs = dict.fromkeys(out), ()
        rec.update(line=n, source=index)
        if isinstance(obj, _NotJson):
            rec["json_error"] = obj.message
        else:
            try:
                if pairs:
                    p = pair_from(obj, where, columns, n)
                    msgs = p.prompt
                    rec.update(chosen=p.chosen, rejected=p.rejected, category=p.category)
                else:
                    r = row_from(obj, where, form, columns, need_answer, n)
                    msgs = r.messages
                    rec.update(category=r.category, expected=r.expected)
            except UserError as e:
                rec["error"] = str(e)
        turns.append(msgs)
        for k in out:
            out[k].append(rec[k])
    schema = _features(cols).arrow_schema
    return pa.table({turns_col: _message_lists(turns), **{k: pa.array(v, schema.field(k).type) for k, v in out.items()}},
                    schema=schema)


def _message_lists(turns: list):
    """Each row's ((role, content), ...) -> one Arrow list<struct<role, content>> array (built from
    flat columns: much faster than from a dict per message)."""
    pa = _pa()
    at = pa.array(np.cumsum([0] + [len(t) for t in turns]).astype(np.int32))
    flat = pa.StructArray.from_arrays([pa.array([r for t in turns for r, _ in t], pa.string()),
                                       pa.array([c for t in turns for _, c in t], pa.string())], ["role", "content"])
    return pa.ListArray.from_arrays(at, flat)


class _NotJson:
    def __init__(self, message: str):
        self.message = message


def _decode(text: str, where: str):
    """A JSON Lines line -> its object, or _NotJson with data.py's message."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return _NotJson(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
    if "\\u" in text and jsonl._has_lone_surrogate(obj):
        return _NotJson(f"{where}: a \\u escape encodes half a surrogate pair, which is not text")
    return obj


def _plain(batch) -> list[dict]:
    """A batch's rows as dicts, the fields a row does not have (null) left out, also in the
    messages of its list fields (rowforms.LISTS). Only columns holding nulls are looked at."""
    pc = _pa().compute
    rows = batch.to_pylist()
    nulls = [k for k in batch.column_names if batch.column(k).null_count]
    nested = [k for k in LISTS if k in batch.column_names and _pa().types.is_list(batch.schema.field(k).type)
              and _pa().types.is_struct(batch.schema.field(k).type.value_type)
              and any(f.null_count for f in pc.list_flatten(batch.column(k)).combine_chunks().flatten())]
    if not nulls and not nested:
        return rows
    for r in rows:
        for k in nulls:
            if r[k] is None:
                del r[k]
        for k in nested:
            if r.get(k) is not None:
                r[k] = [{a: b for a, b in m.items() if b is not None} if isinstance(m, dict) else m for m in r[k]]
    return rows


def _chars_step(messages):
    """A batch's messages -> one text of its distinct characters."""
    import pyarrow.compute as pc
    contents = pc.struct_field(pc.list_flatten(messages), "content").to_pylist()
    return _pa().table({"chars": ["".join(sorted(set("".join(contents))))]})


def _examples_step(batch, *, tok, system_prompt, max_seq_len: int, sources):
    """Rows -> the examples of the rows that keep an answer token (chatml.render, to_example):
    ids (T <= max_seq_len + 1) and loss (T - 1), each example (ids[:-1], ids[1:], loss), with
    the row's category, line and source. A row the template cannot render keeps its message
    in error."""
    pa, pc = _pa(), _pa().compute
    messages = batch.column("messages").combine_chunks()
    flat = pc.list_flatten(messages)  # every message of the batch, its fields as flat lists (fast)
    roles, contents = pc.struct_field(flat, "role").to_pylist(), pc.struct_field(flat, "content").to_pylist()
    at = np.concatenate([[0], np.cumsum(pc.list_value_length(messages).to_numpy(zero_copy_only=False))])
    ids_all, loss_all, kept, errors = [], [], [], []
    for i in range(len(messages)):
        msgs = tuple(zip(roles[at[i]:at[i + 1]], contents[at[i]:at[i + 1]]))
        try:
            ids, mask = chatml.render(msgs, tok, system_prompt)
        except templates.TemplateError as e:
            where = sources[batch.column("source")[i].as_py()].where(batch.column("line")[i].as_py())
            ids, loss, error = np.zeros(1, np.int32), np.zeros(0, np.int8), f"{where}: {e}"
        else:
            ex = chatml.to_example(ids, mask, max_seq_len)
            if ex is None:
                continue  # dropped: no answer token fits
            ids, loss, error = ids[:max_seq_len + 1], ex[2].astype(np.int8), None
        ids_all.append(ids)
        loss_all.append(loss)
        kept.append(i)
        errors.append(error)
    kept = pa.array(kept, pa.int64())
    return pa.table({"ids": _lists(ids_all, np.int32), "loss": _lists(loss_all, np.int8),
                     **{k: batch.column(k).take(kept) for k in ("category", "line", "source")},
                     "error": pa.array(errors, pa.string())})


def _lists(arrays: list, dtype):
    """numpy arrays -> one Arrow list array of them."""
    pa = _pa()
    offsets = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int32)
    values = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _tokenizer_key(tok: AnyTokenizer) -> str:
    d = tok.to_dict() if hasattr(tok, "to_dict") else {"char": tok.itos}
    return hashlib.sha256(json.dumps(d, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
