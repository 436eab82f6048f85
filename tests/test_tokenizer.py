"""Tokenizer: round trips, atomic ChatML markers, <unk>, JSON save/load, extend."""
import json

import pytest

from jaxsft.tokenizer import ASSISTANT, END, SPECIALS, SYSTEM, USER, Tokenizer

TEXTS = ["什么是机器学习？", "Machine learning, 简称 ML!", "1+1=2\n"]


def test_special_ids_are_fixed():
    tok = Tokenizer.build(TEXTS)
    assert tok.itos[:7] == list(SPECIALS)
    assert (tok.pad_id, tok.bos_id, tok.unk_id) == (0, 1, 2)
    assert (tok.system_id, tok.user_id, tok.assistant_id, tok.end_id) == (3, 4, 5, 6)
    # the rest: every distinct character once, sorted, after the specials
    assert tok.itos[7:] == sorted(set("".join(TEXTS)))


def test_round_trip_chinese_and_ascii():
    tok = Tokenizer.build(TEXTS)
    for text in TEXTS + ["学习 ML, 1+1=2"]:
        ids = tok.encode(text)
        assert len(ids) == len(text)  # one id per character, Chinese included
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text


def test_markers_are_atomic_with_specials():
    tok = Tokenizer.build(["hi"])
    ids = tok.encode(f"{SYSTEM}{USER}hi{END}\n{ASSISTANT}", specials=True)
    h, i = tok.stoi["h"], tok.stoi["i"]
    assert ids == [tok.system_id, tok.user_id, h, i, tok.end_id, tok.unk_id, tok.assistant_id]
    # decode drops specials by default and keeps them on request
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == f"{SYSTEM}{USER}hi{END}<unk>{ASSISTANT}"


def test_marker_text_is_plain_characters_without_specials():
    tok = Tokenizer.build(["a <|user|> b"])
    ids = tok.encode("<|user|>")
    assert ids == [tok.stoi[c] for c in "<|user|>"]
    assert len(ids) == 8
    assert all(i >= len(SPECIALS) for i in ids)  # no marker id, no <unk>
    assert tok.decode(ids) == "<|user|>"
    # an incomplete marker is characters even with specials=True
    assert tok.encode("<|user|", specials=True) == [tok.stoi[c] for c in "<|user|"]


def test_unknown_characters():
    tok = Tokenizer.build(["abc"])
    ids = tok.encode("a猫bx")
    assert ids == [tok.stoi["a"], tok.unk_id, tok.stoi["b"], tok.unk_id]
    assert tok.unknown("a猫bx") == ["猫", "x"]
    assert tok.unknown("abc") == []
    assert tok.decode(ids) == "ab"  # <unk> is a special: skipped


def test_save_load_round_trip(tmp_path):
    tok = Tokenizer.build(TEXTS)
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    back = Tokenizer.load(path)
    assert back.itos == tok.itos
    text = f"{USER}什么是 ML?{END}"
    assert back.encode(text, specials=True) == tok.encode(text, specials=True)
    assert json.load(open(path, encoding="utf-8"))["chars"] == tok.itos[7:]


def test_load_rejects_other_specials(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"type": "char", "specials": ["<pad>"], "chars": ["a"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.load(str(path))


def test_extend_keeps_old_ids():
    tok = Tokenizer.build(["机器学习 abc"])
    big = tok.extend(["深度学习 abd", "猫"])
    assert big.itos[: len(tok)] == tok.itos
    assert big.itos[len(tok):] == sorted({"深", "度", "d", "猫"})
    assert big.encode("机器 abc") == tok.encode("机器 abc")
    assert big.unknown("深度猫") == []
    assert tok.extend(["abc"]).itos == tok.itos  # nothing new: same vocabulary
