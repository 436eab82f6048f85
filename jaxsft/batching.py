"""Examples into batches: padding to length buckets, packing several examples to
a row, the shared system prompt, the data order, and the plan of a whole run.

Every function is pure (numpy in, numpy out). The batch of global step s is a
pure function of (examples, seed, s) (`BatchPlan.batch`), so a resumed run sees
exactly the rows an uninterrupted one would have.

An example is (inputs, targets, loss_mask), each (T,) (`chatml.to_example`).
A `Batch` holds (N, L) arrays; its optional fields switch on packing, the shared
prefix and the answer-only output head (`steps.loss_sums`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import jax
import numpy as np
from flax import struct


@struct.dataclass
class Batch:
    """One step's rows. N rows of L tokens; P prefix tokens; A answer slots.

    inputs, targets  (N, L) int32
    loss_mask        (N, L) float32: 1 where the target is an answer token
    positions        (N, L) int32: packed only: each example's own positions
    segments         (N, L) int32: packed only: example number in its row, 0 for padding
    shared           (N, L) int32: with a prefix: 1 where the token also sees the prefix
    prefix           (N, P) int32: the shared system prompt, repeated per row
    answer_at        (A,) int32: flat positions holding every loss token (padded with
                     loss-free ones): the output head runs there only
    """
    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: Optional[np.ndarray] = None
    segments: Optional[np.ndarray] = None
    shared: Optional[np.ndarray] = None
    prefix: Optional[np.ndarray] = None
    answer_at: Optional[np.ndarray] = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.inputs.shape

    def rows(self, lo: int, hi: int) -> "Batch":
        """Rows [lo, hi) (answer_at, a position list, cannot be split: it must be None)."""
        assert self.answer_at is None, "a batch with answer_at cannot be split by rows"
        return jax.tree.map(lambda a: a[lo:hi], self)


@struct.dataclass
class PairBatch(Batch):
    """A step's preference pairs: both answers of each of its K pairs as examples of a `Batch`
    (packed or padded as any), and per token (N, L), 0 off the answers:

    pair       int32: the pair (0..K-1) of the answer this token belongs to
    sign       float32: +1 on the chosen answer's loss tokens, -1 on the rejected one's
    reference  float32: the reference model's log-probability of the whole answer, on the
               answer's first loss token (so a sum over a pair's tokens gives its sum)
    """
    pair: Optional[np.ndarray] = None
    sign: Optional[np.ndarray] = None
    reference: Optional[np.ndarray] = None


def bucket_length(n: int, buckets: Sequence[int], max_seq_len: int) -> int:
    """Smallest bucket >= n (buckets above max_seq_len are replaced by max_seq_len)."""
    sizes = sorted({min(b, max_seq_len) for b in buckets} | {max_seq_len})
    return next(b for b in sizes if b >= n)


def make_batch(examples: Sequence, batch_size: int, length: int) -> Batch:
    """Examples -> right-padded arrays, each (batch_size, length).

    Missing rows (a short last batch) and padding get loss_mask 0, so they
    change neither the loss nor its gradient.
    """
    return _padded(examples, batch_size, length)[0]


def _padded(examples: Sequence, batch_size: int, length: int) -> tuple[Batch, np.ndarray]:
    """(make_batch's batch, source (batch_size, length) int32: the index in `examples` of each
    token's example, -1 on padding)."""
    inputs = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    loss_mask = np.zeros((batch_size, length), np.float32)
    source = np.full((batch_size, length), -1, np.int32)
    for i, (x, y, m) in enumerate(examples):
        n = len(x)
        inputs[i, :n], targets[i, :n], loss_mask[i, :n], source[i, :n] = x, y, m, i
    return Batch(inputs, targets, loss_mask), source


def strip_prefix(example, prefix: Optional[np.ndarray]):
    """(example without its first P tokens, True) when its inputs start with `prefix`
    and no loss falls on those P tokens; else (example, False)."""
    x, y, m = example
    P = 0 if prefix is None else len(prefix)
    if P and len(x) > P and np.array_equal(x[:P], prefix) and not m[:P].any():
        return (x[P:], y[P:], m[P:]), True
    return example, False


def pack_batch(examples: Sequence, length: int, multiple: int = 1,
               prefix: Optional[np.ndarray] = None, min_rows: int = 0, answer_slots: int = 0) -> Batch:
    """Packs examples into as few rows of `length` tokens as first-fit decreasing
    finds (at least min_rows, rounded up to a multiple of `multiple`), instead of
    one padded row each.

    Each example keeps its own positions (0, 1, ... restarting at its start) and a
    segment id (1, 2, ... within a packed row; 0 for padding), from which the
    model builds a block-diagonal causal mask (`masks.segment_causal`): packed
    examples never see each other, so the loss equals that of the examples run
    one by one. Every example must be at most `length` tokens.

    prefix (P,) (`chatml.system_prefix`): examples that start with it are packed
    without it, their positions starting at P, and flagged in `shared`. The model
    computes the prefix once per batch and every flagged token also attends to it
    (`steps.loss_sums`): the same loss and gradient as packing each example whole,
    with ~P fewer tokens per example.

    answer_slots (`answer_slots`): when the batch has at most that many tokens
    with loss, under 3/4 of its N * length, it also has answer_at.
    """
    return _packed(examples, length, multiple, prefix, min_rows, answer_slots)[0]


def _packed(examples: Sequence, length: int, multiple: int = 1, prefix: Optional[np.ndarray] = None,
            min_rows: int = 0, answer_slots: int = 0) -> tuple[Batch, np.ndarray]:
    """(pack_batch's batch, source (N, length) int32: the index in `examples` of each token's
    example, -1 on padding)."""
    stripped = [strip_prefix(e, prefix) for e in examples]
    examples = [e for e, _ in stripped]
    rows = _first_fit_decreasing([len(x) for x, _, _ in examples], length)
    N = -(-max(len(rows), min_rows, 1) // multiple) * multiple
    inputs, targets, positions, segments = (np.zeros((N, length), np.int32) for _ in range(4))
    loss_mask = np.zeros((N, length), np.float32)
    source = np.full((N, length), -1, np.int32)
    shared = pre = None
    if prefix is not None:
        shared = np.zeros((N, length), np.int32)
        pre = np.tile(np.asarray(prefix, np.int32), (N, 1))
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, start=1):
            x, y, m = examples[i]
            n, is_shared = len(x), stripped[i][1]
            sl = slice(at, at + n)
            inputs[r, sl], targets[r, sl], loss_mask[r, sl] = x, y, m
            positions[r, sl] = np.arange(n) + (len(prefix) if is_shared else 0)
            segments[r, sl], source[r, sl] = seg, i
            if is_shared:
                shared[r, sl] = 1
            at += n
    answer_at = _answer_positions(loss_mask, answer_slots)
    return Batch(inputs, targets, loss_mask, positions, segments, shared, pre, answer_at), source


def _first_fit_decreasing(sizes: Sequence[int], length: int) -> list[list[int]]:
    """Item sizes -> rows of item indices, each row's sizes summing to at most `length`:
    items in decreasing size (ties in index order), each into the first row with room."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    rows: list[list[int]] = []  # item indices per row
    free: list[int] = []
    for i in order:
        n = sizes[i]
        assert n <= length, f"example of {n} tokens does not fit a packed row of {length}"
        r = next((r for r, f in enumerate(free) if f >= n), None)
        if r is None:
            rows.append([])
            free.append(length)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= n
    return rows


def _answer_positions(loss_mask: np.ndarray, answer_slots: int) -> Optional[np.ndarray]:
    """loss_mask (N, L) -> answer_at (answer_slots,) int32: the flat positions with loss, padded
    with the first loss-free one; None when answer_slots is 0, not under 3/4 of N * L, or
    too few for the positions with loss."""
    flat = loss_mask.reshape(-1)
    if not answer_slots or answer_slots >= 0.75 * flat.size:
        return None
    at = np.flatnonzero(flat)
    if len(at) > answer_slots:
        return None
    pad = np.full(answer_slots - len(at), np.flatnonzero(flat == 0)[0])
    return np.concatenate([at, pad]).astype(np.int32)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled row order of one epoch; a pure function of (seed, epoch), so a
    resumed run sees exactly the rows the interrupted one would have. (Kept for the next
    batches, read-only: drawing it anew for each batch costs ~10 ms at a million rows.)"""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The example indices of step `step` over n examples: epoch = step //
    steps_per_epoch, the next batch_size of that epoch's shuffled order."""
    epoch, i = divmod(step, -(-n // batch_size))
    return epoch_order(n, seed, epoch)[i * batch_size:(i + 1) * batch_size]


@dataclass(frozen=True)
class BatchPlan:
    """How the steps of one example set become batches.

    pack_len 0: one row per example, padded to the bucket of the longest.
    pack_len > 0: the rows packed (`pack_batch`) into rows of max(pack_len, that
    bucket) tokens, their number a multiple of `multiple` (devices x micro-batches)
    and at least min_rows, sharing `prefix` when given, with answer_at when
    answer_slots has room for the batch's tokens with loss.
    """
    examples: Sequence
    batch_size: int
    seed: int
    buckets: tuple
    max_seq_len: int
    pack_len: int = 0
    multiple: int = 1
    prefix: Optional[np.ndarray] = None
    min_rows: int = 0
    answer_slots: int = 0

    pairs: bool = False  # examples are (chosen, rejected) example pairs, batches PairBatch (batch_size pairs)
    reference: Optional[np.ndarray] = None  # pairs: (len(examples), 2) float32, the reference's log-prob sums

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def batch(self, step: int) -> Batch:
        """The batch of step `step` (counted from this plan's first step)."""
        return self.batch_of(batch_indices(len(self.examples), step, self.batch_size, self.seed))

    def batch_of(self, indices: np.ndarray) -> Batch:
        """The batch of examples[indices] (at most batch_size of them; pairs: a PairBatch of
        their 2 x batch_size answers, chosen then rejected, pair by pair)."""
        items = [self.examples[j] for j in indices]
        chosen = [e for pair in items for e in pair] if self.pairs else items
        if self.pack_len:
            longest = max(len(strip_prefix(e, self.prefix)[0][0]) for e in chosen)
            length = bucket_length(longest, self.buckets, self.max_seq_len)
            batch, source = _packed(chosen, max(self.pack_len, length), self.multiple, self.prefix, self.min_rows,
                                    self.answer_slots)
        else:
            length = bucket_length(max(len(x) for x, _, _ in chosen), self.buckets, self.max_seq_len)
            batch, source = _padded(chosen, self.batch_size * (2 if self.pairs else 1), length)
        if not self.pairs:
            return batch
        return pair_batch(batch, source, None if self.reference is None else self.reference[indices].reshape(-1))

    def settled(self, steps: int = 200, head_only_at_answers: bool = True) -> "BatchPlan":
        """This plan with the packing geometry of its first `steps` batches fixed: at
        least the typical row count, and room for the loss tokens (`answer_slots`)
        unless the head must run everywhere (several devices or micro-batches split
        a batch). Unpacked plans are returned as they are."""
        if not self.pack_len:
            return self
        counts: dict = {}
        for step in range(steps):
            n = self.batch(step).inputs.shape[0]
            counts[n] = counts.get(n, 0) + 1
        typical = max(counts, key=lambda n: (counts[n], n))  # the most common row count (ties: the larger)
        slots = answer_slots(self.examples, self.batch_size, self.seed, steps) if head_only_at_answers else 0
        return replace(self, min_rows=typical, answer_slots=slots)


def pair_batch(batch: Batch, source: np.ndarray, reference: Optional[np.ndarray] = None) -> PairBatch:
    """A batch of answers 2k (chosen) and 2k + 1 (rejected) of pair k (source (N, L): each token's
    answer, -1 on padding) -> PairBatch; reference (2K,): each answer's reference log-prob sum
    (None: zeros, as when the reference itself is being computed)."""
    on = source >= 0
    pair = np.where(on, source // 2, 0).astype(np.int32)
    sign = (np.where(on, 1 - 2 * (source % 2), 0) * batch.loss_mask).astype(np.float32)
    ref = np.zeros(source.shape, np.float32)
    if reference is not None:
        flat = np.flatnonzero(batch.loss_mask.reshape(-1) > 0)  # every loss token, in order
        answers, first = np.unique(source.reshape(-1)[flat], return_index=True)
        ref.reshape(-1)[flat[first]] = reference[answers]  # on each answer's first loss token
    fields = {f: getattr(batch, f) for f in Batch.__dataclass_fields__}
    return PairBatch(**fields, pair=pair, sign=sign, reference=ref)


def _loss_tokens(item) -> int:
    """Tokens with loss of an example, or of both answers of a pair."""
    return sum(_loss_tokens(e) for e in item) if len(item) == 2 else int(np.count_nonzero(item[2]))


def answer_slots(examples: Sequence, batch_size: int, seed: int, steps: int = 200, quantum: int = 64) -> int:
    """Room for the tokens with loss of a run's batches (`pack_batch`): the most that
    any of the first `steps` batches holds, rounded up to a multiple of `quantum`.
    One fixed size is one compiled shape; a later batch holding more runs the
    output head everywhere instead."""
    counts: dict = {}  # example -> its loss tokens, for the examples these batches hold only

    def count(j):
        if j not in counts:
            counts[j] = _loss_tokens(examples[j])
        return counts[j]
    most = max(sum(count(int(j)) for j in batch_indices(len(examples), step, batch_size, seed))
               for step in range(steps))
    return -(-most // quantum) * quantum


@dataclass(frozen=True)
class RunPlan:
    """The batches of a whole run: an optional curriculum (`focus`, its first
    focus_steps steps), then the whole training set epoch after epoch.

    Step s < focus_steps is focus's batch s; step s >= focus_steps is main's batch
    s - focus_steps. total_steps = focus_steps + epochs x main's steps per epoch,
    capped by max_steps; epochs None: max_steps (the data order goes on epoch after epoch).
    """
    main: BatchPlan
    epochs: Optional[int]
    max_steps: Optional[int] = None
    focus: Optional[BatchPlan] = None
    focus_steps: int = 0

    @property
    def total_steps(self) -> int:
        if self.epochs is None:
            return self.max_steps
        total = self.focus_steps + self.main.steps_per_epoch * self.epochs
        return total if self.max_steps is None else min(total, self.max_steps)

    def batch(self, step: int) -> Batch:
        if step < self.focus_steps:
            return self.focus.batch(step)
        return self.main.batch(step - self.focus_steps)

    def ends_epoch(self, done: int) -> bool:
        """True when `done` steps complete an epoch of the whole set, or the run."""
        after = done - self.focus_steps
        return (after > 0 and after % self.main.steps_per_epoch == 0) or done == self.total_steps
