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


def test_system_prefix_is_how_rows_start(qa):
    tok = Tokenizer.build([t for pair in qa for t in pair] + ["你好", "\n"])
    pre = chatml.system_prefix(tok, "你好")
    ids, mask = chatml.render([("user", qa[0][0]), ("assistant", qa[0][1])], tok, "你好")
    assert ids[:len(pre)].tolist() == pre.tolist() and ids[len(pre)] == tok.user_id and not mask[:len(pre)].any()
    assert tok.decode(pre[2:-2].tolist()) == "你好" and chatml.system_prefix(tok, "") is None
