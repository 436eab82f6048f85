"""Pretraining on a text corpus (bin/pretrain, data.corpus) and SFT from a pretrained run
(model.init_from): the corpus examples token by token, corpus mistakes, a tiny pretraining
run, and a fine-tuning run that starts from it with the base's weights and ids intact."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QA, REPO, TINY_YAML, one_line_error, run_main, run_script, write_tiny_config
from jaxsft import model, parallel, runs, setup
from jaxsft.config import UserError, load_config
from jaxsft.data import corpus_examples, read_corpus, split_corpus
from jaxsft.tokenizer import Tokenizer

# the tiny model of conftest, trained on a corpus instead of rows
PRETRAIN_YAML = TINY_YAML.replace("  train: {train}\n  val: {val}\n", "  corpus: {corpus}\n")
assert PRETRAIN_YAML != TINY_YAML
PRETRAIN_STEPS = 45
# the base never sees the last pair: its characters (天空颜色晴蓝的...) are new to fine-tuning
CORPUS = [q + a for q, a in QA[:3]] * 130


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def write_pretrain_config(tmp, corpus, out_dir) -> str:
    path = os.path.join(tmp, "pretrain.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(PRETRAIN_YAML.format(corpus=json.dumps(str(corpus)), out=json.dumps(str(out_dir))))
    return path


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(l) for l in f]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


# corpus -> examples (pure)


def test_corpus_examples_exact_tokens():
    tok = Tokenizer.build(["ab", "c"])  # ids: 7 specials, then a=7 b=8 c=9
    bos, end = tok.bos_id, tok.end_id
    stream = [bos, 7, 8, end, bos, 9, end]  # "ab", "c" as <bos>ab<|endoftext|><bos>c<|endoftext|>
    # windows of max_seq_len + 1 = 4 tokens every 3: the second starts on the first one's last token
    ex = corpus_examples(["ab", "c"], tok, max_seq_len=3)
    assert [(x.tolist(), y.tolist(), m.tolist()) for x, y, m in ex] == [
        ([bos, 7, 8], [7, 8, end], [1, 1, 1]),
        ([end, bos, 9], [bos, 9, end], [1, 1, 1])]
    assert all(a.dtype == np.int32 for e in ex for a in e)
    # windows of 5 every 4: the last is shorter; every token after the first is a target exactly once
    ex = corpus_examples(["ab", "c"], tok, max_seq_len=4)
    assert [(x.tolist(), y.tolist(), m.tolist()) for x, y, m in ex] == [
        ([bos, 7, 8, end], [7, 8, end, bos], [1, 1, 1, 1]),
        ([bos, 9], [9, end], [1, 1])]
    for L in (1, 2, 5, 6, 7, 50):
        ex = corpus_examples(["ab", "c"], tok, max_seq_len=L)
        assert all(len(x) <= L for x, _, _ in ex)
        assert np.concatenate([y for _, y, _ in ex]).tolist() == stream[1:]
        assert np.concatenate([x for x, _, _ in ex]).tolist() == stream[:-1]


def test_read_and_split_corpus(tmp_path):
    (tmp_path / "b.txt").write_text("第三段\n\n  第四段  \r\n", encoding="utf-8")
    (tmp_path / "a.txt").write_bytes("\ufeff第一段\r\n第二段\n".encode("utf-8"))  # BOM and CRLF
    (tmp_path / "notes.md").write_text("不是语料\n", encoding="utf-8")  # only *.txt is read
    assert read_corpus(str(tmp_path)) == ["第一段", "第二段", "第三段", "第四段"]
    assert read_corpus(str(tmp_path / "b.txt")) == ["第三段", "第四段"]
    # every 20th paragraph is held out, the same way every time
    paragraphs = [f"p{i}" for i in range(45)]
    train_p, val_p = split_corpus(paragraphs)
    assert val_p == ["p19", "p39"] and train_p == [p for p in paragraphs if p not in val_p]
    assert split_corpus(list(paragraphs)) == (train_p, val_p)
    assert split_corpus(["x", "y", "z"]) == (["x", "y"], ["z"])  # fewer than 20: the last one


def _bad_corpus(tmp_path, case):
    if case == "missing":
        return tmp_path / "nowhere", [f"{tmp_path / 'nowhere'}: no such file or directory"]
    d = tmp_path / "corpus"
    d.mkdir()
    if case == "no-txt":
        (d / "readme.md").write_text("文字\n", encoding="utf-8")
        return d, [f"{d}: no .txt files in this directory"]
    if case == "blank":
        (d / "a.txt").write_text("\n  \n", encoding="utf-8")
        return d, [f"{d}: no text"]
    (d / "a.txt").write_text("第一段\n第二段\n", encoding="utf-8")
    (d / "b.txt").write_bytes("好的\n第二行\n坏".encode("utf-8") + b"\xff" + "的一行\n".encode("utf-8"))
    return d, [f"{d / 'b.txt'}:3: not valid UTF-8 (byte 0xff)"]


@pytest.mark.parametrize("case", ["missing", "no-txt", "blank", "bad-utf8"])
def test_bad_corpus_is_one_line_error(tmp_path, case, capsys, monkeypatch):
    corpus, fragments = _bad_corpus(tmp_path, case)
    config = write_pretrain_config(tmp_path, corpus, tmp_path / "run")
    one_line_error(*run_main("pretrain", ["--config", config], capsys, monkeypatch)[::2], *fragments)
    assert not os.path.exists(tmp_path / "run")


def test_pretrain_needs_a_corpus(tmp_path, capsys, monkeypatch):
    config = write_tiny_config(tmp_path, tmp_path / "run")  # an SFT config
    one_line_error(*run_main("pretrain", ["--config", config, "--set", "data.corpus=''"], capsys, monkeypatch)[::2],
                   "--set data.corpus: must not be empty")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_pretrain_needs_a_corpus_in_a_real_process(tmp_path):
    """bin/pretrain's error contract end to end: exit status 2, one line, no traceback."""
    config = write_tiny_config(tmp_path, tmp_path / "run")  # an SFT config
    _one_line_error(run_script("pretrain", "--config", config), str(config), "data.corpus is not set")
    assert not os.path.exists(tmp_path / "run")


# a tiny pretraining run, and fine-tuning from it


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "text.txt").write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    run_dir = tmp / "run"
    config = write_pretrain_config(tmp, tmp / "corpus", run_dir)
    proc = run_script("pretrain", "--config", config, "--set", f"train.max_steps={PRETRAIN_STEPS}",
                      "--no-progress", timeout=300)
    assert proc.returncode == 0, f"bin/pretrain failed:\n{proc.stdout}\n{proc.stderr}"
    return {"run_dir": str(run_dir), "proc": proc}


@pytest.mark.slow
def test_pretrain_run_learns_and_writes_checkpoints(pretrained):
    run_dir, proc = pretrained["run_dir"], pretrained["proc"]
    assert "Traceback" not in proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert re.match(rf"done: {PRETRAIN_STEPS} steps in \d+ s, best validation loss ", last), last
    assert {"config.json", "tokenizer.json", "best", "latest", "metrics.jsonl"} <= set(os.listdir(run_dir))
    train_r, val_r = _records(run_dir)
    assert [r["step"] for r in train_r] == list(range(1, PRETRAIN_STEPS + 1))
    assert train_r[0]["loss"] > 2.5 and train_r[-1]["loss"] < train_r[0]["loss"] / 3
    assert val_r[-1]["step"] == PRETRAIN_STEPS and min(r["val_loss"] for r in val_r) < 1.0
    assert max(r["tokens"] for r in train_r) == 8 * 64  # full windows: every position counts
    params, model_cfg, tok = runs.restore(run_dir)  # usable as a base
    assert set("".join(CORPUS)) <= set(tok.itos) and "\n" in tok.stoi and model_cfg.vocab_size == len(tok)


def _sft_config(tmp, pretrained):
    config = write_tiny_config(tmp, os.path.join(tmp, "sft"))
    with open(config, encoding="utf-8") as f:
        text = f.read()
    with open(config, "w", encoding="utf-8") as f:
        f.write(text.replace("  dropout: 0.0\n", f"  dropout: 0.0\n  init_from: {json.dumps(pretrained['run_dir'])}\n"))
    return config


@pytest.mark.slow
def test_init_from_keeps_the_base_weights_and_ids(pretrained, tmp_path):
    cfg = load_config(_sft_config(tmp_path, pretrained))
    prepared = setup.prepare(cfg, parallel.one_device_mesh(), log=lambda *a, **k: None)
    model_cfg, tok = prepared.model_cfg, prepared.tok
    graphdef, params = prepared.init_params()
    base_params, base_cfg, base_tok = runs.restore(pretrained["run_dir"])
    n_old = len(base_tok)
    # the vocabulary is the base's, then the new characters in sorted order
    sft_text = "".join(q + a for q, a in QA) + prepared.cfg.data.system_prompt  # (resolved: ChatML's default)
    new = sorted(set(sft_text) - set(base_tok.itos))
    assert new and set("天空颜色晴蓝") <= set(new)
    assert tok.itos == base_tok.itos + new and model_cfg.vocab_size == n_old + len(new)
    # every weight is the base's; the embedding only gained rows
    emb = np.asarray(params["embed"]["embedding"][...])
    assert emb.shape == (n_old + len(new), base_cfg.d_model)
    np.testing.assert_array_equal(emb[:n_old], np.asarray(base_params["embed"]["embedding"][...]))
    base_flat, sft_flat = _non_embedding(base_params), _non_embedding(params)
    assert base_flat.keys() == sft_flat.keys() and len(base_flat) > 1
    for k in base_flat:
        np.testing.assert_array_equal(sft_flat[k], base_flat[k], err_msg=k)
    # so before any update, on a prompt of old tokens the old logits are the base model's: equal
    # up to float32 rounding only, since the tied output head is a matmul of another width (V), which
    # XLA sums in another order (the weights themselves are equal bit for bit, above)
    prompt = jnp.asarray([[base_tok.bos_id] + base_tok.encode(QA[0][0] + QA[0][1])], jnp.int32)
    assert int(prompt.max()) < n_old
    base_graphdef, _ = model.abstract(base_cfg)
    base_logits, _ = model.apply(base_graphdef, base_params, prompt)
    logits, _ = model.apply(graphdef, params, prompt)
    assert logits.shape[-1] == n_old + len(new)
    np.testing.assert_allclose(np.asarray(logits[..., :n_old]), np.asarray(base_logits), rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.argmax(logits[..., :n_old], -1), np.argmax(base_logits, -1))


def _non_embedding(params) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)
            if "embed" not in jax.tree_util.keystr(k)}


@pytest.mark.slow
def test_sft_from_pretrained_trains_resumes_and_restores(pretrained, tmp_path, capsys, monkeypatch):
    config = _sft_config(tmp_path, pretrained)
    run_dir = os.path.join(tmp_path, "sft")
    code, _, err = run_main("train", ["--config", config, "--set", "train.max_steps=16", "--set", "train.eval_every=8",
                                      "--no-progress"], capsys, monkeypatch)  # in this process
    assert code == 0, err
    # resumed in a process of its own: the extended vocabulary is rebuilt identically, and training goes on from step 16
    proc = run_script("train", "--config", config, "--set", "train.max_steps=24", "--set", "train.eval_every=8",
                      "--no-progress", "--resume", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed {run_dir} at step 16" in proc.stdout
    train_r, val_r = _records(run_dir)
    assert [r["step"] for r in train_r] == list(range(1, 25)) and [r["step"] for r in val_r] == [8, 16, 24]
    assert train_r[-1]["loss"] < train_r[0]["loss"] / 2
    _, _, base_tok = runs.restore(pretrained["run_dir"])
    params, model_cfg, tok = runs.restore(run_dir)
    assert tok.itos[:len(base_tok)] == base_tok.itos and len(tok) > len(base_tok)
    assert model_cfg.init_from == pretrained["run_dir"] and params["embed"]["embedding"][...].shape[0] == len(tok)


@pytest.mark.slow
def test_init_from_with_another_model_shape_is_refused(pretrained, tmp_path, capsys, monkeypatch):
    config = _sft_config(tmp_path, pretrained)
    code, _, err = run_main("train", ["--config", config, "--set", "model.d_model=32"], capsys, monkeypatch)
    one_line_error(code, err, f"model.init_from: {pretrained['run_dir']} has d_model=64, this config has 32")
    assert not os.path.exists(tmp_path / "sft")


# run in a fresh process: the vocabulary and every example, hashed
PREPARE_DIGEST = """
import hashlib, json, sys
from jaxsft import parallel, setup
from jaxsft.config import load_config
s = setup.prepare(load_config(sys.argv[1]), parallel.one_device_mesh(), log=lambda *a, **k: None)
h = hashlib.sha256(json.dumps(s.tok.itos).encode())
for example in s.train_examples + s.val_examples:
    for a in example:
        h.update(a.tobytes())
print(len(s.train_examples), len(s.val_examples), len(s.val_rows), h.hexdigest())
"""


@pytest.mark.slow
def test_prepare_corpus_is_the_same_in_every_process(tmp_path):
    """A resumed pretraining run rebuilds the same vocabulary and examples in a new process,
    whose str hash salt (PYTHONHASHSEED) differs: the corpus's characters are a set, iterated
    in hash order."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "text.txt").write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    config = write_pretrain_config(tmp_path, tmp_path / "corpus", tmp_path / "run")
    out = []
    for seed in ("1", "2"):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONHASHSEED=seed, PYTHONPATH=REPO)
        proc = subprocess.run([sys.executable, "-c", PREPARE_DIGEST, config], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out.append(proc.stdout.split())
    assert out[0] == out[1]
    n_train, n_val, n_val_rows = map(int, out[0][:3])
    assert n_train > 0 and n_val > 0 and n_val_rows == 0  # pretraining validates on held-out windows, not rows
