"""ChatML rendering and loss masks: pure functions, numpy in, numpy out.
(Batching, packing and the data order are in `batching`.)

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

from .tokenizer import AnyTokenizer


def render(messages: Sequence, tok: AnyTokenizer, system_prompt: Optional[str],
           add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(role, content) pairs -> ids (T,) int32 and answer mask (T,) int32.

    A leading ("system", text) message replaces `system_prompt`; an empty or
    None system prompt leaves the system turn out. With add_generation_prompt,
    the text ends with "\\n<|assistant|>" so a model continues with the answer.
    """
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


def to_example(ids: np.ndarray, mask: np.ndarray, max_seq_len: int):
    """ids, mask (T,) -> (inputs, targets, loss_mask), each (min(T-1, max_seq_len),),
    or None when no answer token survives the cut to max_seq_len."""
    ids, mask = ids[: max_seq_len + 1], mask[: max_seq_len + 1]
    loss_mask = mask[1:]
    if loss_mask.sum() == 0:
        return None
    return ids[:-1], ids[1:], loss_mask


def encode_rows(rows, tok: AnyTokenizer, system_prompt: Optional[str], max_seq_len: int):
    """Rows -> list of examples, and the number of rows dropped as too long."""
    examples, dropped = [], 0
    for row in rows:
        ex = to_example(*render(row.messages, tok, system_prompt), max_seq_len)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    return examples, dropped


def system_prefix(tok: AnyTokenizer, system_prompt: Optional[str]) -> Optional[np.ndarray]:
    """The tokens every row rendered with `system_prompt` starts with:
    <bos><|system|>SYSTEM<|endoftext|>\n, (P,) int32; None for no system prompt."""
    if not system_prompt:
        return None
    return np.concatenate([render([], tok, system_prompt)[0], np.asarray(tok.encode("\n"), np.int32)])
