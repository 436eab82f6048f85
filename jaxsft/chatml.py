"""ChatML rendering and loss masks: pure functions, numpy in, numpy out.
(Batching, packing and the data order are in `batching`.) A tokenizer with a base
model's own chat template (`tok.template`) renders with it instead (`render_template`:
the template's text, its answer spans from templates.py mapped to tokens).

A conversation is rendered as (markers are single tokens, "\\n" is a character):

    <bos><|system|>SYSTEM<|endoftext|>\\n<|user|>Q<|endoftext|>\\n<|assistant|>A<|endoftext|>

and multi-turn rows repeat the user/assistant pair. `render` returns the token
ids and a mask that is 1 on every assistant answer token and its closing
<|endoftext|>, 0 elsewhere. `to_example` shifts them into model inputs, targets
and the loss mask. For a toy vocabulary, a row {"instruction": "hi",
"response": "ok"} with no system prompt gives

    position   0      1       2  3  4       5   6            7  8  9
    ids        <bos>  <|user|> h  i  <|end|> \\n  <|assistant|> o  k  <|end|>
    mask       0      0       0  0  0       0   0            1  1  1

    inputs     <bos>  <|user|> h  i  <|end|> \\n  <|assistant|> o  k
    targets    <|user|> h      i  <|end|> \\n <|asst|>      o    k  <|end|>
    loss_mask  0      0       0  0  0       0   1            1  1

so the model is trained to write "o", "k" and then to stop, and nowhere else.

A row longer than max_seq_len + 1 tokens is cut on the right: the loss still
covers the part of the answer that fits. If no answer token fits, the row is
dropped (the caller counts and reports it); an answer is never silently cut to
nothing.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import templates
from .config import DEFAULT_SYSTEM_PROMPT, UserError
from .tokenizer import AnyTokenizer


def default_system_prompt(tok: AnyTokenizer, system_prompt: Optional[str]) -> str:
    """data.system_prompt as set, or the format's default when it is null: ChatML's
    DEFAULT_SYSTEM_PROMPT; with a base's own template none ("": the template does what it
    does without one)."""
    if system_prompt is not None:
        return system_prompt
    return "" if tok.template is not None else DEFAULT_SYSTEM_PROMPT


def render(messages: Sequence, tok: AnyTokenizer, system_prompt: Optional[str],
           add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(role, content) pairs -> ids (T,) int32 and answer mask (T,) int32.

    A leading ("system", text) message replaces `system_prompt`; an empty or
    None system prompt leaves the system turn out. With add_generation_prompt,
    the text ends with "\\n<|assistant|>" so a model continues with the answer.
    A tokenizer with a template renders with it (`render_template`).
    """
    if tok.template is not None:
        return render_template(messages, tok, system_prompt, add_generation_prompt)
    ids, mask = [tok.bos_id], [0]

    def add(new, m):
        ids.extend(new)
        mask.extend([m] * len(new))

    messages = list(messages)
    if messages and messages[0][0] == "system":
        system_prompt = messages.pop(0)[1]
    if system_prompt:
        add([tok.system_id] + tok.encode(system_prompt) + [tok.end_id], 0)
    role_id = {"user": tok.user_id, "assistant": tok.assistant_id}
    for role, content in messages:
        if len(ids) > 1:
            add(tok.encode("\n"), 0)
        add([role_id[role]], 0)
        add(tok.encode(content) + [tok.end_id], int(role == "assistant"))
    if add_generation_prompt:
        add(tok.encode("\n") + [tok.assistant_id], 0)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def render_template(messages: Sequence, tok: AnyTokenizer, system_prompt: Optional[str],
                    add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """render() with the base's own chat template: the ids of the whole rendered text, as
    apply_chat_template(tokenize=True) gives them, and 1 on every token that overlaps an
    answer span (the answer and its end of turn), as transformers' assistant mask is made:

        text     ...<|im_start|>assistant\\nHello world<|im_end|>\\n
        ids      ... <|im_start|> assistant \\n Hello " world" <|im_end|> \\n
        mask     ...  0            0         0  1       1       1          0
    """
    r = templates.render(tok.template, messages, system_prompt, add_generation_prompt)
    ids, offsets = tok.encode_offsets(r.text)
    at = np.asarray(offsets, np.int64).reshape(-1, 2)  # (T, 2) character start, end
    mask = np.zeros(len(ids), np.int32)
    for start, end in r.spans:
        mask |= (at[:, 1] > start) & (at[:, 0] < end)
    return np.asarray(ids, np.int32), mask


def to_example(ids: np.ndarray, mask: np.ndarray, max_seq_len: int):
    """ids, mask (T,) -> (inputs, targets, loss_mask), each (min(T-1, max_seq_len),),
    or None when no answer token survives the cut to max_seq_len."""
    ids, mask = ids[: max_seq_len + 1], mask[: max_seq_len + 1]
    loss_mask = mask[1:]
    if loss_mask.sum() == 0:
        return None
    return ids[:-1], ids[1:], loss_mask


def encode_rows(rows, tok: AnyTokenizer, system_prompt: Optional[str], max_seq_len: int, where: str = "rows"):
    """Rows -> list of examples, and the number of rows dropped as too long. A row the
    chat template cannot render or mask is a UserError naming its place (row.where, else
    `where`, its file, and its line)."""
    examples, dropped = [], 0
    for row in rows:
        try:
            ids, mask = render(row.messages, tok, system_prompt)
        except templates.TemplateError as e:
            raise UserError(f"{row.where or f'{where}:{row.line}'}: {e}") from None
        ex = to_example(ids, mask, max_seq_len)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    return examples, dropped


def last_answer_only(mask: np.ndarray) -> np.ndarray:
    """An answer mask (T,) with every answer but the last zeroed (its last run of ones kept):
    a preference pair's loss is on its own answer, not on earlier turns of the context."""
    at = np.flatnonzero(mask)
    if not len(at):
        return mask
    breaks = np.flatnonzero(np.diff(at) > 1)
    start = at[breaks[-1] + 1] if len(breaks) else at[0]
    out = np.zeros_like(mask)
    out[start:] = mask[start:]
    return out


def encode_pairs(pairs, tok: AnyTokenizer, system_prompt: Optional[str], max_seq_len: int, where: str = "pairs"):
    """Preference pairs -> list of (chosen example, rejected example), each the pair's context
    followed by that answer (`to_example`, the loss on the answer and its end of turn only),
    and the number of pairs dropped because an answer does not fit max_seq_len."""
    examples, dropped = [], 0
    for pair in pairs:
        two = []
        for answer in (pair.chosen, pair.rejected):
            try:
                ids, mask = render(pair.prompt + (("assistant", answer),), tok, system_prompt)
            except templates.TemplateError as e:
                raise UserError(f"{pair.where or f'{where}:{pair.line}'}: {e}") from None
            two.append(to_example(ids, last_answer_only(mask), max_seq_len))
        if None in two:
            dropped += 1
        else:
            examples.append(tuple(two))
    return examples, dropped


# user texts unlike one another, so a template's shared start ends where theirs begin
_PROBES = ("Hi", "你好", "1+1=?", "\n- x")


def system_prefix(tok: AnyTokenizer, system_prompt: Optional[str]) -> Optional[np.ndarray]:
    """The tokens every row rendered with `system_prompt` starts with:
    <bos><|system|>SYSTEM<|endoftext|>\n, (P,) int32; None for no system prompt. With a
    template: the ids its renderings of a few different user turns share (its system turn,
    its own default one or none), None when they share none. Packing and the engine use it
    only for rows that do start with it."""
    if tok.template is not None:
        rows = [render([("user", q)], tok, system_prompt)[0] for q in _PROBES]
        n = min(map(len, rows))
        same = np.all([r[:n] == rows[0][:n] for r in rows], axis=0)
        n = int(np.argmin(same)) if not same.all() else n
        return rows[0][:n] if n else None
    if not system_prompt:
        return None
    return np.concatenate([render([], tok, system_prompt)[0], np.asarray(tok.encode("\n"), np.int32)])
