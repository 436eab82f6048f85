"""Data files, JSONL reading and row validation.

jaxsft's own two row forms, one JSON object per line (blank lines and a UTF-8 BOM are fine):

    {"instruction": "...", "response": "...", "category": "...", "expected": "..."}
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], ...}

and the forms other tools use (Alpaca, ShareGPT, OpenAI messages, prompt/completion:
rowforms.py), detected from a file's first row or named (data.format), their fields
renamed by data.columns. Every row becomes a `Row`: a list of messages (user/assistant
alternating, an optional leading system turn) plus its category and expected answer. A
mistake raises UserError naming the file, the line and the problem.

`resolve` turns data.train / val / test (a file, a glob, a list of them, a `save_to_disk`
directory) into typed `Source`s; this module reads JSON Lines in memory, datasets_io.py
reads the rest (and large JSON Lines) through Hugging Face `datasets`.

Preference pairs (train.objective: dpo) are read by `read_pairs`, one object per line:

    {"prompt": "...", "chosen": "...", "rejected": "...", "system": "...", "category": "..."}
    {"messages": [...the context, ending with a user turn...], "chosen": ..., "rejected": ...}

chosen and rejected are answer strings, or an assistant message ({"role": "assistant",
"content": ...}, alone or as a list of one). Each becomes a `Pair`.

A pretraining corpus (data.corpus) is plain UTF-8 text, one paragraph per line:
`read_corpus`, `split_corpus` and `corpus_examples` turn it into the same
(inputs, targets, loss_mask) examples that chatml makes of rows.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .config import UserError, read_text
from .rowforms import detect, rename, to_ours

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Row:
    messages: tuple  # ((role, content), ...)
    category: str = ""
    expected: Optional[str] = None  # reference answer for scoring (last assistant turn by default)
    line: int = 0  # its line in a JSON Lines file, its row (from 1) in another
    where: str = dataclasses.field(default="", compare=False)  # "file:line" or "file row N", for messages

    @property
    def prompt_messages(self) -> tuple:
        """The conversation up to (not including) the last assistant answer."""
        if self.messages and self.messages[-1][0] == "assistant":
            return self.messages[:-1]
        return self.messages

    @property
    def question(self) -> str:
        """The last user turn."""
        return next(c for r, c in reversed(self.messages) if r == "user")


def parse_row(obj, where: str, need_answer: bool = True) -> Row:
    """One decoded JSON value -> Row, or UserError mentioning `where` ("file:line")."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    category = obj.get("category", "")
    if not isinstance(category, str):
        raise UserError(f"{where}: 'category' must be a string")
    expected = obj.get("expected")
    if expected is not None and not isinstance(expected, str):
        raise UserError(f"{where}: 'expected' must be a string")
    if "messages" in obj:
        msgs = _conversation(obj["messages"], where, need_answer)
        if expected is None and msgs[-1][0] == "assistant":
            expected = msgs[-1][1]
        return Row(msgs, category, expected)
    msgs = _instruction(obj, where, need_answer)
    if expected is None and len(msgs) == 2:
        expected = msgs[1][1]
    return Row(msgs, category, expected)


def _message(m, i: int, where: str) -> tuple:
    """messages[i] -> (role, content), or UserError."""
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise UserError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
    role, content = m["role"], m["content"]
    if role not in ROLES:
        raise UserError(f"{where}: messages[{i}] has unknown role {role!r} (expected system, user or assistant)")
    if not isinstance(content, str):
        raise UserError(f"{where}: messages[{i}] 'content' must be a string")
    if role == "system" and i != 0:
        raise UserError(f"{where}: messages[{i}] a system turn may only come first")
    if role == "assistant" and not content.strip():
        raise UserError(f"{where}: messages[{i}] has an empty assistant answer")
    if role == "user" and not content.strip():
        raise UserError(f"{where}: messages[{i}] has an empty user turn")
    return role, content


def _conversation(msgs, where: str, need_answer: bool) -> tuple:
    """A row's "messages" -> ((role, content), ...): each message valid, user/assistant
    alternating after an optional system turn, ending in an answer if need_answer."""
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    out = tuple(_message(m, i, where) for i, m in enumerate(msgs))
    turns = [r for r, _ in out if r != "system"]
    for i, r in enumerate(turns):
        if r != ("user" if i % 2 == 0 else "assistant"):
            raise UserError(f"{where}: messages must alternate user/assistant after an optional system turn")
    if not turns:
        raise UserError(f"{where}: messages has no user turn")
    if need_answer and turns[-1] != "assistant":
        raise UserError(f"{where}: messages has no assistant answer at the end")
    return out


def _instruction(obj: dict, where: str, need_answer: bool) -> tuple:
    """An instruction/response row -> (("user", instruction),) plus ("assistant", response)
    when it has one (required if need_answer)."""
    if "instruction" not in obj:
        raise UserError(f"{where}: missing 'instruction' (or 'messages')")
    ins = obj["instruction"]
    if not isinstance(ins, str):
        raise UserError(f"{where}: 'instruction' must be a string")
    if not ins.strip():
        raise UserError(f"{where}: empty 'instruction'")
    if "response" not in obj:
        if need_answer:
            raise UserError(f"{where}: missing 'response'")
        return (("user", ins),)
    resp = obj["response"]
    if not isinstance(resp, str):
        raise UserError(f"{where}: 'response' must be a string")
    if not resp.strip():
        raise UserError(f"{where}: empty 'response'")
    return ("user", ins), ("assistant", resp)


@dataclass(frozen=True)
class Pair:
    """A preference pair: two answers to one conversation, the first preferred."""
    prompt: tuple  # ((role, content), ...): an optional system turn, then user/assistant, ending with user
    chosen: str
    rejected: str
    category: str = ""
    line: int = 0
    where: str = dataclasses.field(default="", compare=False)

    @property
    def question(self) -> str:
        return self.prompt[-1][1]


def _completion(obj: dict, key: str, where: str) -> str:
    """A pair's `chosen` or `rejected`: a string, or one assistant message -> its text."""
    if key not in obj:
        raise UserError(f"{where}: missing {key!r}")
    v = obj[key]
    if isinstance(v, list):
        if len(v) != 1:
            raise UserError(f"{where}: {key!r} must be one assistant message, got a list of {len(v)}")
        v = v[0]
    if isinstance(v, dict):
        if v.get("role") != "assistant" or "content" not in v:
            raise UserError(f"{where}: {key!r} must be an answer string or an assistant message "
                            f"{{\"role\": \"assistant\", \"content\": ...}}")
        v = v["content"]
    if not isinstance(v, str):
        raise UserError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise UserError(f"{where}: empty {key!r}")
    return v


def parse_pair(obj, where: str) -> Pair:
    """One decoded JSON value -> Pair, or UserError mentioning `where` ("file:line")."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    category = obj.get("category", "")
    if not isinstance(category, str):
        raise UserError(f"{where}: 'category' must be a string")
    if "messages" in obj:
        if "prompt" in obj:
            raise UserError(f"{where}: give the context as 'prompt' or as 'messages', not both")
        prompt = _conversation(obj["messages"], where, need_answer=False)
        if prompt[-1][0] != "user":
            raise UserError(f"{where}: 'messages' must end with a user turn (the answers are 'chosen' and 'rejected')")
    elif "prompt" in obj:
        q = obj["prompt"]
        if not isinstance(q, str):
            raise UserError(f"{where}: 'prompt' must be a string")
        if not q.strip():
            raise UserError(f"{where}: empty 'prompt'")
        prompt = (("user", q),)
    else:
        raise UserError(f"{where}: missing 'prompt' (or 'messages'); a preference pair is "
                        f"{{\"prompt\", \"chosen\", \"rejected\"}}")
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise UserError(f"{where}: 'system' must be a string")
        if prompt[0][0] == "system":
            raise UserError(f"{where}: a system turn in 'messages' and a 'system' key: give one")
        prompt = (("system", system),) + prompt
    chosen, rejected = _completion(obj, "chosen", where), _completion(obj, "rejected", where)
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same answer")
    return Pair(prompt, chosen, rejected, category)


def read_pairs(path: str, columns: Optional[dict] = None) -> list[Pair]:
    """Reads and validates every preference pair of a JSONL file (fields renamed by `columns`)."""
    return [pair_from(obj, where, columns, n) for n, where, obj in _json_lines(path)]


def pair_from(obj, where: str, columns: Optional[dict], line: int) -> Pair:
    """One decoded row, its fields renamed by `columns` -> Pair (at `line`), or UserError."""
    return dataclasses.replace(parse_pair(rename(obj, columns), where), line=line, where=where)


def is_pair(obj) -> bool:
    """Whether a row (renamed) is a preference pair: it has 'prompt', 'chosen' or 'rejected',
    and no 'completion' (prompt/completion is a row form of its own)."""
    return isinstance(obj, dict) and any(k in obj for k in ("prompt", "chosen", "rejected")) \
        and "completion" not in obj


def holds_pairs(path: str, columns: Optional[dict] = None) -> bool:
    """Whether a JSONL file holds preference pairs (`is_pair` of its first row) rather than
    rows; UserError for a file that is missing, empty or not JSON."""
    return is_pair(rename(_json_lines(path)[0][2], columns))


def _has_lone_surrogate(obj) -> bool:
    """True when a string in obj holds an unpaired UTF-16 surrogate (e.g. from "\\ud800")."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _json_lines(path: str):
    """(line number, "file:line", decoded object) of every non-blank line of a JSONL file;
    UserError for a missing or empty file, a line that is not JSON, or half a surrogate pair."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    text = read_text(path)
    out = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if "\\u" in line and _has_lone_surrogate(obj):
            raise UserError(f"{where}: a \\u escape encodes half a surrogate pair, which is not text")
        out.append((n, where, obj))
    if not out:
        raise UserError(f"{path}: no rows (the file is empty)")
    return out


def read_jsonl(path: str, need_answer: bool = True, form: Optional[str] = None,
               columns: Optional[dict] = None) -> list[Row]:
    """Reads and validates every row of a JSONL file: of `form`, or the form of its first row
    (rowforms.detect), fields renamed by `columns`."""
    lines = _json_lines(path)
    form = form or row_form(lines[0][2], columns)
    return [row_from(obj, where, form, columns, need_answer, n) for n, where, obj in lines]


def row_form(first, columns: Optional[dict] = None) -> str:
    """The form of a file whose first row is `first` (jaxsft when it is not an object)."""
    first = rename(first, columns)
    return detect(first) if isinstance(first, dict) else "jaxsft"


def row_from(obj, where: str, form: str, columns: Optional[dict], need_answer: bool, line: int) -> Row:
    """One decoded row of `form`, its fields renamed by `columns` -> Row (at `line`), or UserError."""
    obj = rename(obj, columns)
    if isinstance(obj, dict) and "chosen" in obj and "rejected" in obj:
        raise UserError(f"{where}: a preference pair (chosen/rejected); train on pairs with train.objective: dpo")
    row = parse_row(to_ours(obj, form, where), where, need_answer)
    return Row(row.messages, row.category, row.expected, line, where)


# data files: what data.train / val / test name

KINDS = {".jsonl": "lines", ".ndjson": "lines", ".json": "json", ".parquet": "parquet", ".csv": "csv",
         ".tsv": "csv", ".arrow": "arrow"}


@dataclass(frozen=True)
class Source:
    """One data file, or a datasets `save_to_disk` directory.
    kind: lines (JSON Lines; any unknown file type too, as before), json (one JSON array),
    parquet, csv, arrow (an Arrow IPC file or stream), disk (a save_to_disk directory)."""
    path: str
    kind: str

    def where(self, n: int) -> str:
        """Row n's place in messages: "file:line" in JSON Lines, "file row n" elsewhere."""
        return f"{self.path}:{n}" if self.kind == "lines" else f"{self.path} row {n}"


def resolve(spec) -> tuple[Source, ...]:
    """data.train / val / test -> its sources, in order: a file, a glob (its matches in name
    order), a save_to_disk directory, or a list of these; UserError for what is not there."""
    out = []
    for s in [spec] if isinstance(spec, str) else list(spec):
        if os.path.isdir(s):
            out.append(_directory(s))
        elif os.path.isfile(s):
            out.append(Source(s, _kind(s)))
        elif any(c in s for c in "*?["):
            found = sorted(glob.glob(s))
            if not found:
                raise UserError(f"{s}: no file matches")
            out += [_directory(f) if os.path.isdir(f) else Source(f, _kind(f)) for f in found]
        else:
            raise UserError(f"{s}: file not found")
    if not out:
        raise UserError("no data files given (an empty list)")
    return tuple(out)


def describe(spec) -> str:
    """data.train / val / test as messages name it."""
    return spec if isinstance(spec, str) else ", ".join(spec)


def _kind(path: str) -> str:
    kind = KINDS.get(os.path.splitext(path)[1].lower(), "lines")
    if kind == "json":  # a .json file holds one array, or JSON Lines as datasets also reads it
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
        kind = "json" if head.startswith(b"[") else "lines"
    return kind


def _directory(path: str) -> Source:
    if os.path.isfile(os.path.join(path, "state.json")):
        return Source(path, "disk")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        raise UserError(f"{path}: a saved DatasetDict of splits {', '.join(splits)}; name one, e.g. "
                        f"{os.path.join(path, splits[0] if splits else 'train')}")
    raise UserError(f"{path}: a directory, and not one datasets' save_to_disk wrote (no state.json); "
                    f"give its files, or a glob")


def row_texts(rows: list[Row]) -> list[str]:
    """All message contents, for building a vocabulary."""
    return [c for r in rows for _, c in r.messages]


def pair_texts(pairs: list[Pair]) -> list[str]:
    """Every text of preference pairs (prompts and both answers), for building a vocabulary."""
    return [t for p in pairs for t in [c for _, c in p.prompt] + [p.chosen, p.rejected]]


VAL_EVERY = 20  # split_corpus holds out every 20th paragraph for the validation loss


def read_corpus(path: str) -> list[str]:
    """The paragraphs of a corpus: every non-blank line (stripped) of `path`, a .txt file,
    or of each *.txt file directly in the directory `path`, files in name order.

    Raises UserError for a missing path, a directory without .txt files, a corpus of fewer
    than 2 paragraphs (split_corpus holds one out), or a line that is not UTF-8 (naming file:line).
    """
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*.txt")))
        if not files:
            raise UserError(f"{path}: no .txt files in this directory")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UserError(f"{path}: no such file or directory")
    paragraphs = [line.strip() for f in files for line in read_text(f).split("\n") if line.strip()]
    if len(paragraphs) < 2:
        raise UserError(f"{path}: {'no text (every line is blank)' if not paragraphs else 'a single paragraph'}; "
                        f"a corpus needs at least 2 lines of text (one is held out for validation)")
    return paragraphs


def split_corpus(paragraphs: list[str], every: int = VAL_EVERY) -> tuple[list[str], list[str]]:
    """(train, val): paragraphs every, 2*every, ... (counted from 1) are held out for
    validation; with fewer than `every` paragraphs, the last one is. Deterministic: the
    same corpus always gives the same split."""
    if len(paragraphs) < 2:
        raise ValueError("split_corpus needs at least 2 paragraphs")
    held = set(range(every - 1, len(paragraphs), every)) or {len(paragraphs) - 1}
    return ([p for i, p in enumerate(paragraphs) if i not in held],
            [p for i, p in enumerate(paragraphs) if i in held])


def corpus_examples(paragraphs: list[str], tok, max_seq_len: int) -> list[tuple]:
    """Paragraphs -> next-token examples (inputs, targets, loss_mask), int32 arrays of
    length <= max_seq_len, as chatml.to_example makes them.

    Each paragraph becomes <bos> + its characters + <|endoftext|>; the paragraphs are
    concatenated into one token stream, which is cut into windows of max_seq_len + 1
    tokens starting every max_seq_len tokens (consecutive windows share one token), so
    every token after the first is a target exactly once. A window may span paragraphs
    (the markers separate them); only the last window is shorter. The loss counts every
    position: inputs = window[:-1], targets = window[1:], loss_mask = 1. (A base with
    no bos token, as Qwen's, starts paragraphs with nothing.)
    """
    bos = [] if tok.bos_id is None else [tok.bos_id]
    stream = np.asarray([i for p in paragraphs for i in [*bos, *tok.encode(p), tok.end_id]], np.int32)
    examples = []
    for start in range(0, len(stream) - 1, max_seq_len):
        w = stream[start:start + max_seq_len + 1]
        examples.append((w[:-1], w[1:], np.ones(len(w) - 1, np.int32)))
    return examples
