"""The row forms people bring, each turned into jaxsft's own: pure functions, dict in, dict out.

    form        a row                                                      becomes
    jaxsft      {"instruction", "response"} or {"messages": [{role, content}]}   itself
    openai      {"messages": [{"role", "content"}, ...]}                   itself (the same form)
    alpaca      {"instruction", "input", "output", "system"?}              user: instruction, a newline
                                                                           and input (when not empty);
                                                                           assistant: output
    sharegpt    {"conversations": [{"from", "value"}, ...], "system"?}     from human/user, gpt/assistant,
                                                                           system -> role; value -> content
    completion  {"prompt", "completion", "system"?}                        user: prompt; assistant: completion

"category" and "expected" pass through every form. In a CSV file, whose cells are text,
messages and conversations are JSON (`json_cells`). `detect` names the form of a row from its keys (a table's
columns); `data.columns` renames fields first ({our name: theirs}), also inside messages
(role, content, from, value). Preference pairs (train.objective: dpo) keep read_pairs'
forms; only the renaming applies to them.
"""
from __future__ import annotations

import json
from typing import Optional

from .config import ROW_FIELDS, ROW_FORMS, UserError

FORMS, FIELDS = ROW_FORMS, ROW_FIELDS  # (config.py checks data.format and data.columns against them)
LISTS = ("messages", "conversations", "chosen", "rejected")  # fields holding messages (renamed inside too)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def rename(obj, columns: dict):
    """obj with its keys, and those of the messages in its list fields, renamed from the user's
    names to ours (`columns` maps ours -> theirs). A non-dict obj is returned as it is."""
    if not columns or not isinstance(obj, dict):
        return obj
    ours = {theirs: mine for mine, theirs in columns.items()}
    out = {ours.get(k, k): v for k, v in obj.items()}
    for k in LISTS:
        if isinstance(out.get(k), list):
            out[k] = [{ours.get(a, a): b for a, b in m.items()} if isinstance(m, dict) else m for m in out[k]]
    return out


def detect(keys) -> str:
    """The form of rows with these keys (after renaming); jaxsft when none fits, so that
    its own messages name what is missing."""
    keys = set(keys)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "jaxsft"
    if {"instruction", "output"} <= keys and "response" not in keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "completion"
    return "jaxsft"


def to_ours(obj, form: str, where: str):
    """A row of `form` (renamed) -> the same row in jaxsft's form, or UserError naming `where`.
    A jaxsft (or openai) row is returned as it is, so jaxsft's own checks speak of it."""
    if not isinstance(obj, dict) or form in ("jaxsft", "openai"):
        return obj
    out = {k: obj[k] for k in ("category", "expected") if k in obj}
    if form == "alpaca":
        ins, extra = _text(obj, "instruction", where), _text(obj, "input", where, optional=True)
        user = ins + "\n" + extra if extra else ins
        turns = [("user", user)] + ([("assistant", _text(obj, "output", where))] if "output" in obj else [])
    elif form == "completion":
        turns = [("user", _text(obj, "prompt", where))]
        if "completion" in obj:
            turns.append(("assistant", _text(obj, "completion", where)))
    elif form == "sharegpt":
        turns = _sharegpt(obj.get("conversations"), where)
    else:
        raise ValueError(f"unknown row form {form!r}")
    system = _text(obj, "system", where, optional=True)
    if system and not (turns and turns[0][0] == "system"):
        turns.insert(0, ("system", system))
    out["messages"] = [{"role": r, "content": c} for r, c in turns]
    return out


def _text(obj: dict, key: str, where: str, optional: bool = False) -> Optional[str]:
    """obj[key], a string; "" when optional and absent; UserError when missing or not a string."""
    if key not in obj:
        if optional:
            return ""
        raise UserError(f"{where}: missing {key!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise UserError(f"{where}: {key!r} must be a string")
    return v


def _sharegpt(conv, where: str) -> list:
    """ShareGPT's conversations -> [(role, content)], each turn checked for its from and value."""
    if not isinstance(conv, list) or not conv:
        raise UserError(f"{where}: 'conversations' must be a non-empty list")
    turns = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise UserError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        if m["from"] not in SHAREGPT_ROLES:
            raise UserError(f"{where}: conversations[{i}] has unknown 'from' {m['from']!r} "
                            f"(expected human, gpt or system)")
        turns.append((SHAREGPT_ROLES[m["from"]], m["value"]))
    return turns


def json_cells(obj: dict) -> dict:
    """A CSV row with its messages or conversations cell read as JSON (when it is JSON)."""
    keys = ("messages", "conversations")
    if not any(isinstance(obj.get(k), str) for k in keys):
        return obj
    out = dict(obj)
    for k in keys:
        if isinstance(out.get(k), str):
            try:
                out[k] = json.loads(out[k])
            except json.JSONDecodeError:
                pass  # left a string: the form's own check says what it must be
    return out
