"""ChatML rendering, loss masks, truncation and batching, pinned by hand-written tables."""
import numpy as np

from jaxsft import chatml
from jaxsft.data import Row
from jaxsft.tokenizer import Tokenizer

# toy vocabulary with known ids: specials 0..6, then these characters in this order
TOK = Tokenizer(["\n", "h", "i", "o", "k", "s"])
BOS, SYS, USR, AST, END = 1, 3, 4, 5, 6
NL, h, i, o, k, s = 7, 8, 9, 10, 11, 12


def test_toy_vocabulary_ids():
    assert [TOK.stoi[c] for c in "\nhioks"] == [NL, h, i, o, k, s]
    assert (TOK.bos_id, TOK.system_id, TOK.user_id, TOK.assistant_id, TOK.end_id) == (BOS, SYS, USR, AST, END)


def test_table_without_system_prompt():
    ids, mask = chatml.render([("user", "hi"), ("assistant", "ok")], TOK, None)
    #                 0    1    2  3  4    5   6    7  8  9
    assert ids.tolist() == [BOS, USR, h, i, END, NL, AST, o, k, END]
    assert mask.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    inputs, targets, loss_mask = chatml.to_example(ids, mask, max_seq_len=64)
    assert inputs.tolist() == [BOS, USR, h, i, END, NL, AST, o, k]
    assert targets.tolist() == [USR, h, i, END, NL, AST, o, k, END]
    assert loss_mask.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert ids.dtype == mask.dtype == np.int32


def test_table_with_system_prompt():
    ids, mask = chatml.render([("user", "hi"), ("assistant", "ok")], TOK, "s")
    #                 0    1    2  3    4   5    6  7  8    9   10   11 12  13
    assert ids.tolist() == [BOS, SYS, s, END, NL, USR, h, i, END, NL, AST, o, k, END]
    assert mask.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    inputs, targets, loss_mask = chatml.to_example(ids, mask, max_seq_len=64)
    assert inputs.tolist() == ids[:-1].tolist()
    assert targets.tolist() == [SYS, s, END, NL, USR, h, i, END, NL, AST, o, k, END]
    assert loss_mask.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_system_message_replaces_system_prompt():
    with_msg, _ = chatml.render([("system", "ss"), ("user", "hi"), ("assistant", "ok")], TOK, "s")
    assert with_msg.tolist()[:5] == [BOS, SYS, s, s, END]
    # an empty system prompt leaves the system turn out
    empty, _ = chatml.render([("user", "hi"), ("assistant", "ok")], TOK, "")
    assert empty.tolist()[:2] == [BOS, USR]


def test_generation_prompt():
    ids, mask = chatml.render([("user", "hi")], TOK, None, add_generation_prompt=True)
    assert ids.tolist() == [BOS, USR, h, i, END, NL, AST]
    assert mask.tolist() == [0] * 7


def test_marker_text_in_user_content_is_characters():
    tok = Tokenizer(list("<|user>"))
    ids, _ = chatml.render([("user", "<|user|>"), ("assistant", "<")], tok, None)
    assert ids.tolist().count(tok.user_id) == 1  # only the real marker
    assert ids.tolist()[2:10] == [tok.stoi[c] for c in "<|user|>"]


def test_multi_turn_loss_on_every_answer_only():
    msgs = [("user", "hi"), ("assistant", "ok"), ("user", "ih"), ("assistant", "ko")]
    ids, mask = chatml.render(msgs, TOK, None)
    assert ids.tolist() == [BOS, USR, h, i, END, NL, AST, o, k, END,
                            NL, USR, i, h, END, NL, AST, k, o, END]
    assert np.flatnonzero(mask).tolist() == [7, 8, 9, 17, 18, 19]
    _, targets, loss_mask = chatml.to_example(ids, mask, 64)
    assert targets[loss_mask == 1].tolist() == [o, k, END, k, o, END]


def test_truncation_keeps_answer_tokens_that_fit():
    ids, mask = chatml.render([("user", "hi"), ("assistant", "ok")], TOK, None)  # 10 tokens
    # exact fit: 10 tokens = max_seq_len + 1
    inputs, targets, loss_mask = chatml.to_example(ids, mask, 9)
    assert len(inputs) == 9 and loss_mask.sum() == 3
    # cut on the right: <|endoftext|> is lost, "o" and "k" stay in the loss
    inputs, targets, loss_mask = chatml.to_example(ids, mask, 8)
    assert inputs.tolist() == [BOS, USR, h, i, END, NL, AST, o]
    assert targets.tolist() == [USR, h, i, END, NL, AST, o, k]
    assert loss_mask.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    # one answer token fits
    _, targets, loss_mask = chatml.to_example(ids, mask, 7)
    assert targets[loss_mask == 1].tolist() == [o]
    # no answer token fits: dropped
    assert chatml.to_example(ids, mask, 6) is None


def test_encode_rows_counts_dropped():
    short = Row((("user", "h"), ("assistant", "o")))
    long = Row((("user", "hihihihihi"), ("assistant", "ok")))
    examples, dropped = chatml.encode_rows([short, long, short], TOK, None, max_seq_len=8)
    assert dropped == 1
    assert len(examples) == 2
    assert examples[0][1].tolist() == [USR, h, END, NL, AST, o, END]


def test_bucket_length():
    assert chatml.bucket_length(5, (32, 64), 48) == 32
    assert chatml.bucket_length(32, (32, 64), 48) == 32
    assert chatml.bucket_length(33, (32, 64), 48) == 48  # buckets above max_seq_len become max_seq_len
    assert chatml.bucket_length(65, (32, 64), 100) == 100
    assert chatml.bucket_length(40, (64, 32), 256) == 64


def _example(n, value):
    """An example of n tokens all equal to `value`, loss on its last token only."""
    m = np.zeros(n, np.int32)
    m[-1] = 1
    return np.full(n, value, np.int32), np.full(n, value + 100, np.int32), m


def test_make_batch_pads_with_mask_zero():
    batch = chatml.make_batch([_example(3, 7), _example(5, 8)], batch_size=4, length=6)
    assert set(batch) == {"inputs", "targets", "loss_mask"}
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    for key in batch:
        assert batch[key].shape == (4, 6)
    assert batch["inputs"].tolist() == [[7, 7, 7, 0, 0, 0], [8, 8, 8, 8, 8, 0], [0] * 6, [0] * 6]
    assert batch["targets"].tolist() == [[107, 107, 107, 0, 0, 0], [108] * 5 + [0], [0] * 6, [0] * 6]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0], [0] * 6, [0] * 6]


def _rows_of(batch):
    """Row identities (the fill value) of the non-empty rows of a batch."""
    return [int(r[0]) for r in batch["inputs"] if r[0] != 0]


def test_batch_for_step_covers_each_row_once_per_epoch():
    examples = [_example(2 + (v % 5) * 10, v) for v in range(1, 11)]  # 10 rows, lengths 2..42
    kw = dict(batch_size=4, seed=3, buckets=(16, 32), max_seq_len=48)
    per_epoch = 3  # ceil(10 / 4)
    orders = []
    for epoch in range(2):
        seen = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            batch = chatml.batch_for_step(examples, step, **kw)
            rows = _rows_of(batch)
            longest = max(len(examples[v - 1][0]) for v in rows)
            assert batch["inputs"].shape == (4, chatml.bucket_length(longest, (16, 32), 48))
            seen += rows
        assert sorted(seen) == list(range(1, 11))  # each row exactly once
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled each epoch
    # the last batch of an epoch is short: 2 real rows, 2 all-zero rows
    last = chatml.batch_for_step(examples, 2, **kw)
    assert len(_rows_of(last)) == 2
    assert not last["inputs"][2:].any() and not last["loss_mask"][2:].any()


def test_batch_for_step_is_deterministic():
    examples = [_example(3, v) for v in range(1, 8)]
    kw = dict(batch_size=3, buckets=(8,), max_seq_len=8)
    for step in (0, 1, 5, 11):
        a = chatml.batch_for_step(examples, step, seed=1, **kw)
        b = chatml.batch_for_step(examples, step, seed=1, **kw)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    orders = {tuple(_rows_of(chatml.batch_for_step(examples, 0, seed=sd, **kw))) for sd in range(5)}
    assert len(orders) > 1  # the seed matters


def test_pack_batch_layout():
    # lengths 5, 4, 3, 2 into rows of 8: first-fit decreasing puts 5+3 and 4+2 together
    examples = [_example(5, 1), _example(4, 2), _example(3, 3), _example(2, 4)]
    b = chatml.pack_batch(examples, length=8)
    assert set(b) == {"inputs", "targets", "loss_mask", "positions", "segments"}
    for key in b:
        assert b[key].shape == (2, 8)
    assert b["inputs"].tolist() == [[1, 1, 1, 1, 1, 3, 3, 3], [2, 2, 2, 2, 4, 4, 0, 0]]
    assert b["targets"].tolist() == [[101] * 5 + [103] * 3, [102] * 4 + [104] * 2 + [0, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 0]]
    assert b["segments"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 0, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 1, 0, 0]]
    assert b["segments"].dtype == b["positions"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    # the row count is rounded up to a multiple (for micro-batches / devices); extra rows are empty
    b4 = chatml.pack_batch(examples, length=8, multiple=4)
    assert b4["inputs"].shape == (4, 8) and not b4["segments"][2:].any() and not b4["loss_mask"][2:].any()
    # at least min_rows rows (the typical count of a run, see typical_rows): the extra ones are empty
    b3 = chatml.pack_batch(examples, length=8, min_rows=3)
    assert b3["inputs"].shape == (3, 8) and not b3["segments"][2].any() and b3["inputs"][:2].tolist() == b["inputs"].tolist()
    # an example as long as the row gets a row to itself
    assert chatml.pack_batch([_example(8, 1), _example(1, 2)], 8)["segments"].tolist() == [[1] * 8, [1] + [0] * 7]


def test_pack_batch_shares_the_prefix():
    """Examples starting with the prefix are packed without it, positions from P, flagged
    in `shared`; others (no prefix, or loss on a prefix token) are packed whole."""
    pre = np.array([7, 8, 9], np.int32)
    with_pre = (np.array([7, 8, 9, 5, 5], np.int32), np.array([8, 9, 5, 5, 6], np.int32),
                np.array([0, 0, 0, 1, 1], np.int32))
    loss_on_pre = (with_pre[0], with_pre[1], np.array([0, 0, 1, 1, 1], np.int32))
    b = chatml.pack_batch([with_pre, _example(3, 1), loss_on_pre], length=8, prefix=pre)
    assert set(b) == {"inputs", "targets", "loss_mask", "positions", "segments", "shared", "prefix"}
    assert b["prefix"].tolist() == [[7, 8, 9]] * 2
    assert b["inputs"].tolist() == [[7, 8, 9, 5, 5, 1, 1, 1], [5, 5, 0, 0, 0, 0, 0, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [3, 4, 0, 0, 0, 0, 0, 0]]
    assert b["shared"].tolist() == [[0] * 8, [1, 1] + [0] * 6]
    assert b["targets"][1, :2].tolist() == [5, 6] and b["loss_mask"][1, :2].tolist() == [1, 1]
    assert b["loss_mask"].sum() == 2 + 1 + 3


def test_system_prefix_is_how_rows_start(qa):
    tok = Tokenizer.build([t for pair in qa for t in pair] + ["你好", "\n"])
    pre = chatml.system_prefix(tok, "你好")
    ids, mask = chatml.render([("user", qa[0][0]), ("assistant", qa[0][1])], tok, "你好")
    assert ids[:len(pre)].tolist() == pre.tolist() and ids[len(pre)] == tok.user_id and not mask[:len(pre)].any()
    assert tok.decode(pre[2:-2].tolist()) == "你好" and chatml.system_prefix(tok, "") is None


def test_typical_rows_is_the_most_common_row_count():
    examples = [_example(2 + (v % 7) * 2, v) for v in range(1, 41)]  # lengths 2..14
    kw = dict(batch_size=6, seed=0, buckets=(16,), max_seq_len=16, pack_len=16)
    counts = [len(chatml.batch_for_step(examples, s, **kw)["inputs"]) for s in range(7)]
    typical = chatml.typical_rows(examples, steps=7, **kw)
    assert typical == max(set(counts), key=lambda n: (counts.count(n), n)) and len(set(counts)) > 1
    for s in range(7):  # at least `typical` rows, the same examples and answer tokens
        a, b = chatml.batch_for_step(examples, s, **kw), chatml.batch_for_step(examples, s, **kw, min_rows=typical)
        assert len(b["inputs"]) == max(len(a["inputs"]), typical)
        assert b["loss_mask"].sum() == a["loss_mask"].sum()
        assert sorted(b["inputs"][b["inputs"] > 0]) == sorted(a["inputs"][a["inputs"] > 0])


def test_batch_for_step_packed_has_the_same_rows():
    examples = [_example(2 + (v % 5) * 3, v) for v in range(1, 11)]  # lengths 2..14
    kw = dict(batch_size=4, seed=3, buckets=(8, 16), max_seq_len=16)
    for step in range(6):
        padded = chatml.batch_for_step(examples, step, **kw)
        packed = chatml.batch_for_step(examples, step, **kw, pack_len=16)
        assert packed["inputs"].shape[1] == 16 and packed["inputs"].shape[0] <= 4
        assert sorted(set(packed["inputs"].ravel()) - {0}) == sorted(_rows_of(padded))
        assert packed["loss_mask"].sum() == padded["loss_mask"].sum()
    # pack_len below the longest row's bucket: rows take that bucket's length
    assert chatml.batch_for_step(examples, 0, **kw, pack_len=4)["inputs"].shape[1] in (8, 16)
