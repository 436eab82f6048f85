"""ChatML rendering and loss masks: pure functions, numpy in, numpy out.

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

from .tokenizer import Tokenizer


def render(messages: Sequence, tok: Tokenizer, system_prompt: Optional[str],
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


def encode_rows(rows, tok: Tokenizer, system_prompt: Optional[str], max_seq_len: int):
    """Rows -> list of examples, and the number of rows dropped as too long."""
    examples, dropped = [], 0
    for row in rows:
        ex = to_example(*render(row.messages, tok, system_prompt), max_seq_len)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    return examples, dropped


def bucket_length(n: int, buckets: Sequence[int], max_seq_len: int) -> int:
    """Smallest bucket >= n (buckets above max_seq_len are replaced by max_seq_len)."""
    sizes = sorted({min(b, max_seq_len) for b in buckets} | {max_seq_len})
    return next(b for b in sizes if b >= n)


def make_batch(examples: Sequence, batch_size: int, length: int) -> dict:
    """Examples -> right-padded arrays, each (batch_size, length).

    Missing rows (a short last batch) and padding get loss_mask 0, so they
    change neither the loss nor its gradient. Keys: inputs, targets (int32),
    loss_mask (float32).
    """
    inputs = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    loss_mask = np.zeros((batch_size, length), np.float32)
    for i, (x, y, m) in enumerate(examples):
        n = len(x)
        inputs[i, :n], targets[i, :n], loss_mask[i, :n] = x, y, m
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def system_prefix(tok: Tokenizer, system_prompt: Optional[str]) -> Optional[np.ndarray]:
    """The tokens every row rendered with `system_prompt` starts with:
    <bos><|system|>SYSTEM<|endoftext|>\n, (P,) int32; None for no system prompt."""
    if not system_prompt:
        return None
    return np.concatenate([render([], tok, system_prompt)[0], np.asarray(tok.encode("\n"), np.int32)])


def strip_prefix(example, prefix: Optional[np.ndarray]):
    """(example without its first P tokens, True) when its inputs start with `prefix`
    and no loss falls on those P tokens; else (example, False)."""
    x, y, m = example
    P = 0 if prefix is None else len(prefix)
    if P and len(x) > P and np.array_equal(x[:P], prefix) and not m[:P].any():
        return (x[P:], y[P:], m[P:]), True
    return example, False


def pack_batch(examples: Sequence, length: int, multiple: int = 1,
               prefix: Optional[np.ndarray] = None, min_rows: int = 0, answer_slots: int = 0) -> dict:
    """Packs examples into as few rows of `length` tokens as first-fit decreasing
    finds (at least min_rows, rounded up to a multiple of `multiple`), instead of
    one padded row each.

    Each example keeps its own positions (0, 1, ... restarting at its start) and a
    segment id (1, 2, ... within a packed row; 0 for padding), from which the
    model builds a block-diagonal causal mask: packed examples never see each
    other, so the loss equals that of the examples run one by one. Returns
    inputs, targets, positions, segments (int32) and loss_mask (float32), each
    (N, length); every example must be at most `length` tokens.

    prefix (P,) (`system_prefix`): examples that start with it are packed without
    it, their positions starting at P, and flagged in `shared` (N, length) int32;
    `prefix` (N, P) repeats it. The model computes the prefix once per batch and
    every flagged token also attends to it (train.loss_sums): the same loss and
    gradient as packing each example whole, with ~P fewer tokens per example.

    answer_slots (`answer_slots`): when the batch has at most that many tokens
    with loss, under 3/4 of its N * length, it also has answer_at (answer_slots,)
    int32: their flat positions, padded with a position of loss_mask 0, so the
    loss computes the output head there only (train.loss_sums).
    """
    stripped = [strip_prefix(e, prefix) for e in examples]
    examples = [e for e, _ in stripped]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[list[int]] = []  # example indices per packed row
    free: list[int] = []
    for i in order:
        n = len(examples[i][0])
        assert n <= length, f"example of {n} tokens does not fit a packed row of {length}"
        r = next((r for r, f in enumerate(free) if f >= n), None)
        if r is None:
            rows.append([])
            free.append(length)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= n
    N = -(-max(len(rows), min_rows, 1) // multiple) * multiple
    out = {k: np.zeros((N, length), np.int32) for k in ("inputs", "targets", "positions", "segments")}
    out["loss_mask"] = np.zeros((N, length), np.float32)
    if prefix is not None:
        out["shared"] = np.zeros((N, length), np.int32)
        out["prefix"] = np.tile(np.asarray(prefix, np.int32), (N, 1))
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, start=1):
            x, y, m = examples[i]
            n, shared = len(x), stripped[i][1]
            sl = slice(at, at + n)
            out["inputs"][r, sl], out["targets"][r, sl], out["loss_mask"][r, sl] = x, y, m
            out["positions"][r, sl] = np.arange(n) + (len(prefix) if shared else 0)
            out["segments"][r, sl] = seg
            if shared:
                out["shared"][r, sl] = 1
            at += n
    flat = out["loss_mask"].reshape(-1)
    if answer_slots and answer_slots < 0.75 * flat.size:
        at = np.flatnonzero(flat)
        if len(at) <= answer_slots:
            pad = np.full(answer_slots - len(at), np.flatnonzero(flat == 0)[0])
            out["answer_at"] = np.concatenate([at, pad]).astype(np.int32)
    return out


def answer_slots(examples: Sequence, batch_size: int, seed: int, steps: int = 200, quantum: int = 64) -> int:
    """Room for the tokens with loss of a run's batches (`pack_batch`): the most that
    any of the first `steps` batches holds, rounded up to a multiple of `quantum`.
    One fixed size is one compiled shape; a later batch holding more runs the
    output head everywhere instead."""
    counts = np.array([int(np.count_nonzero(m)) for _, _, m in examples])
    most = max(int(counts[batch_indices(len(examples), step, batch_size, seed)].sum()) for step in range(steps))
    return -(-most // quantum) * quantum


def typical_rows(examples: Sequence, batch_size: int, seed: int, buckets: Sequence[int], max_seq_len: int,
                 pack_len: int, multiple: int = 1, prefix: Optional[np.ndarray] = None, steps: int = 200) -> int:
    """The most common row count of the first `steps` packed batches (ties: the
    larger). Packing every batch into at least that many rows leaves a few batch
    shapes, each compiled once, instead of one per row count: the rare smaller
    batches carry an empty row or two."""
    counts: dict = {}
    for step in range(steps):
        n = len(batch_for_step(examples, step, batch_size, seed, buckets, max_seq_len, pack_len, multiple,
                               prefix)["inputs"])
        counts[n] = counts.get(n, 0) + 1
    return max(counts, key=lambda n: (counts[n], n))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled row order of one epoch; a pure function of (seed, epoch), so a
    resumed run sees exactly the rows the interrupted one would have."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The example indices of global step `step` over n examples: epoch = step //
    steps_per_epoch, the next batch_size of that epoch's shuffled order."""
    epoch, i = divmod(step, -(-n // batch_size))
    return epoch_order(n, seed, epoch)[i * batch_size:(i + 1) * batch_size]


def batch_for_step(examples: Sequence, step: int, batch_size: int, seed: int,
                   buckets: Sequence[int], max_seq_len: int, pack_len: int = 0, multiple: int = 1,
                   prefix: Optional[np.ndarray] = None, min_rows: int = 0, answer_slots: int = 0) -> dict:
    """The batch of global step `step`: epoch = step // steps_per_epoch, the next
    batch_size rows of that epoch's shuffled order. pack_len 0: one row per
    example, padded to the bucket of the longest. pack_len > 0: the rows packed
    (`pack_batch`) into rows of max(pack_len, that bucket) tokens, their number
    a multiple of `multiple` and at least min_rows, sharing `prefix` when given,
    with answer_at when answer_slots has room for its tokens with loss."""
    chosen = [examples[j] for j in batch_indices(len(examples), step, batch_size, seed)]
    if pack_len:
        longest = max(len(strip_prefix(e, prefix)[0][0]) for e in chosen)
        length = bucket_length(longest, buckets, max_seq_len)
        return pack_batch(chosen, max(pack_len, length), multiple, prefix, min_rows, answer_slots)
    length = bucket_length(max(len(x) for x, _, _ in chosen), buckets, max_seq_len)
    return make_batch(chosen, batch_size, length)
