"""Batching: padding to buckets, packing, the shared prefix, the data order and the
batch plan (pure functions of the examples, the seed and the step)."""
import dataclasses

import chex
import numpy as np

from jaxsft import batching
from jaxsft.batching import BatchPlan, RunPlan


def batch_for_step(examples, step, **kw):
    return BatchPlan(examples, **kw).batch(step)


def present(batch) -> dict:
    """A batch's fields that are set."""
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None}


def test_bucket_length():
    assert batching.bucket_length(5, (32, 64), 48) == 32
    assert batching.bucket_length(32, (32, 64), 48) == 32
    assert batching.bucket_length(33, (32, 64), 48) == 48  # buckets above max_seq_len become max_seq_len
    assert batching.bucket_length(65, (32, 64), 100) == 100
    assert batching.bucket_length(40, (64, 32), 256) == 64


def assert_batch_contract(batch, n_rows, length, n_prefix=None):
    """Batch's docstring legend: every (N, L) field int32 but loss_mask (float32), prefix (N, P)."""
    fields = present(batch)
    rows = [v for k, v in fields.items() if k not in ("prefix", "answer_at")]
    chex.assert_shape(rows, (n_rows, length))
    chex.assert_type([v for k, v in fields.items() if k != "loss_mask"], np.int32)
    chex.assert_type(batch.loss_mask, np.float32)
    if n_prefix is not None:
        chex.assert_shape(batch.prefix, (n_rows, n_prefix))


def _example(n, value):
    """An example of n tokens all equal to `value`, loss on its last token only."""
    m = np.zeros(n, np.int32)
    m[-1] = 1
    return np.full(n, value, np.int32), np.full(n, value + 100, np.int32), m


def test_make_batch_pads_with_mask_zero():
    batch = batching.make_batch([_example(3, 7), _example(5, 8)], batch_size=4, length=6)
    assert set(present(batch)) == {"inputs", "targets", "loss_mask"}
    assert_batch_contract(batch, 4, 6)
    assert batch.inputs.tolist() == [[7, 7, 7, 0, 0, 0], [8, 8, 8, 8, 8, 0], [0] * 6, [0] * 6]
    assert batch.targets.tolist() == [[107, 107, 107, 0, 0, 0], [108] * 5 + [0], [0] * 6, [0] * 6]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0], [0] * 6, [0] * 6]


def _rows_of(batch):
    """Row identities (the fill value) of the non-empty rows of a batch."""
    return [int(r[0]) for r in batch.inputs if r[0] != 0]


def test_batch_for_step_covers_each_row_once_per_epoch():
    examples = [_example(2 + (v % 5) * 10, v) for v in range(1, 11)]  # 10 rows, lengths 2..42
    kw = dict(batch_size=4, seed=3, buckets=(16, 32), max_seq_len=48)
    per_epoch = 3  # ceil(10 / 4)
    orders = []
    for epoch in range(2):
        seen = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            batch = batch_for_step(examples, step, **kw)
            rows = _rows_of(batch)
            longest = max(len(examples[v - 1][0]) for v in rows)
            assert batch.inputs.shape == (4, batching.bucket_length(longest, (16, 32), 48))
            seen += rows
        assert sorted(seen) == list(range(1, 11))  # each row exactly once
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled each epoch
    # the last batch of an epoch is short: 2 real rows, 2 all-zero rows
    last = batch_for_step(examples, 2, **kw)
    assert len(_rows_of(last)) == 2
    assert not last.inputs[2:].any() and not last.loss_mask[2:].any()


def test_batch_for_step_is_deterministic():
    examples = [_example(3, v) for v in range(1, 8)]
    kw = dict(batch_size=3, buckets=(8,), max_seq_len=8)
    for step in (0, 1, 5, 11):
        a = batch_for_step(examples, step, seed=1, **kw)
        b = batch_for_step(examples, step, seed=1, **kw)
        for key, v in present(a).items():
            np.testing.assert_array_equal(v, present(b)[key])
    orders = {tuple(_rows_of(batch_for_step(examples, 0, seed=sd, **kw))) for sd in range(5)}
    assert len(orders) > 1  # the seed matters


def test_pack_batch_layout():
    # lengths 5, 4, 3, 2 into rows of 8: first-fit decreasing puts 5+3 and 4+2 together
    examples = [_example(5, 1), _example(4, 2), _example(3, 3), _example(2, 4)]
    b = batching.pack_batch(examples, length=8)
    assert set(present(b)) == {"inputs", "targets", "loss_mask", "positions", "segments"}
    assert_batch_contract(b, 2, 8)  # int32 from the examples' int32 loss masks too: float32
    assert b.inputs.tolist() == [[1, 1, 1, 1, 1, 3, 3, 3], [2, 2, 2, 2, 4, 4, 0, 0]]
    assert b.targets.tolist() == [[101] * 5 + [103] * 3, [102] * 4 + [104] * 2 + [0, 0]]
    assert b.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 0]]
    assert b.segments.tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2, 0, 0]]
    assert b.loss_mask.tolist() == [[0, 0, 0, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 1, 0, 0]]
    # the row count is rounded up to a multiple (for micro-batches / devices); extra rows are empty
    b4 = batching.pack_batch(examples, length=8, multiple=4)
    assert b4.inputs.shape == (4, 8) and not b4.segments[2:].any() and not b4.loss_mask[2:].any()
    # at least min_rows rows (the typical count of a run, see typical_rows): the extra ones are empty
    b3 = batching.pack_batch(examples, length=8, min_rows=3)
    assert b3.inputs.shape == (3, 8) and not b3.segments[2].any() and b3.inputs[:2].tolist() == b.inputs.tolist()
    # an example as long as the row gets a row to itself
    assert batching.pack_batch([_example(8, 1), _example(1, 2)], 8).segments.tolist() == [[1] * 8, [1] + [0] * 7]


def test_pack_batch_shares_the_prefix():
    """Examples starting with the prefix are packed without it, positions from P, flagged
    in `shared`; others (no prefix, or loss on a prefix token) are packed whole."""
    pre = np.array([7, 8, 9], np.int32)
    with_pre = (np.array([7, 8, 9, 5, 5], np.int32), np.array([8, 9, 5, 5, 6], np.int32),
                np.array([0, 0, 0, 1, 1], np.int32))
    loss_on_pre = (with_pre[0], with_pre[1], np.array([0, 0, 1, 1, 1], np.int32))
    b = batching.pack_batch([with_pre, _example(3, 1), loss_on_pre], length=8, prefix=pre)
    assert set(present(b)) == {"inputs", "targets", "loss_mask", "positions", "segments", "shared", "prefix"}
    assert_batch_contract(b, 2, 8, n_prefix=3)
    assert b.prefix.tolist() == [[7, 8, 9]] * 2
    assert b.inputs.tolist() == [[7, 8, 9, 5, 5, 1, 1, 1], [5, 5, 0, 0, 0, 0, 0, 0]]
    assert b.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [3, 4, 0, 0, 0, 0, 0, 0]]
    assert b.shared.tolist() == [[0] * 8, [1, 1] + [0] * 6]
    assert b.targets[1, :2].tolist() == [5, 6] and b.loss_mask[1, :2].tolist() == [1, 1]
    assert b.loss_mask.sum() == 2 + 1 + 3


def test_typical_rows_is_the_most_common_row_count():
    examples = [_example(2 + (v % 7) * 2, v) for v in range(1, 41)]  # lengths 2..14
    kw = dict(batch_size=6, seed=0, buckets=(16,), max_seq_len=16, pack_len=16)
    counts = [len(batch_for_step(examples, s, **kw).inputs) for s in range(7)]
    typical = BatchPlan(examples, **kw).settled(steps=7).min_rows
    assert typical == max(set(counts), key=lambda n: (counts.count(n), n)) and len(set(counts)) > 1
    for s in range(7):  # at least `typical` rows, the same examples and answer tokens
        a, b = batch_for_step(examples, s, **kw), batch_for_step(examples, s, **kw, min_rows=typical)
        assert len(b.inputs) == max(len(a.inputs), typical)
        assert b.loss_mask.sum() == a.loss_mask.sum()
        assert sorted(b.inputs[b.inputs > 0]) == sorted(a.inputs[a.inputs > 0])


def test_batch_for_step_packed_has_the_same_rows():
    examples = [_example(2 + (v % 5) * 3, v) for v in range(1, 11)]  # lengths 2..14
    kw = dict(batch_size=4, seed=3, buckets=(8, 16), max_seq_len=16)
    for step in range(6):
        padded = batch_for_step(examples, step, **kw)
        packed = batch_for_step(examples, step, **kw, pack_len=16)
        assert packed.inputs.shape[1] == 16 and packed.inputs.shape[0] <= 4
        assert_batch_contract(padded, 4, padded.inputs.shape[1])
        assert_batch_contract(packed, packed.inputs.shape[0], 16)
        assert sorted(set(packed.inputs.ravel()) - {0}) == sorted(_rows_of(padded))
        assert packed.loss_mask.sum() == padded.loss_mask.sum()
    # pack_len below the longest row's bucket: rows take that bucket's length
    assert batch_for_step(examples, 0, **kw, pack_len=4).inputs.shape[1] in (8, 16)


def test_a_step_budget_goes_on_epoch_after_epoch():
    """epochs None (configs/default.yaml): max_steps steps whatever the data set's size; the
    order still reshuffles at each epoch, and each epoch's end is known (evaluations)."""
    examples = [_example(3, v) for v in range(1, 11)]  # 10 rows: 3 steps an epoch at batch 4
    plan = BatchPlan(examples, batch_size=4, seed=0, buckets=(8,), max_seq_len=8)
    budget = RunPlan(plan, epochs=None, max_steps=10)
    assert budget.total_steps == 10 and RunPlan(plan, epochs=2, max_steps=10).total_steps == 6
    assert [s for s in range(1, 11) if budget.ends_epoch(s)] == [3, 6, 9, 10]
    seen = [v for s in range(9) for v in _rows_of(budget.batch(s))]
    assert sorted(seen) == sorted(list(range(1, 11)) * 3)  # three whole epochs in steps 0..8
