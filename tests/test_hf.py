"""Llama-format interop (hf.py) against a real client, transformers:

- export: a run trained on data/ rows, exported with bin/export and loaded by
  AutoModelForCausalLM / AutoTokenizer, gives jaxsft's logits (f32, within 1e-4), the chat
  template gives jaxsft's prompt ids, and model.generate(do_sample=False) gives bin/chat's
  answers on 50 rows of data/test.jsonl;
- import: a tiny Llama built by transformers (grouped-query attention, untied head,
  rope_theta 500000, its own byte-level BPE tokenizer trained here on data/ text) gives
  transformers' logits in jaxsft; bin/train fine-tunes it, resumes it bit for bit, bin/eval
  scores it and bin/chat answers as transformers does after bin/export;
- round trip: a native run exported and imported back has bitwise-identical parameters;
- bad input: one-line errors naming the file and key, exit 2, nothing written.

The other families (Mistral, Qwen2, Qwen3, rope scaling) have tests/test_families.py, which
reuses this file's builders. Nothing is downloaded: every model and tokenizer is built here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, lazy_import, run_main, run_script

torch, transformers = lazy_import("torch"), lazy_import("transformers")  # at first use (conftest.TOGETHER)

from jaxsft import chatml, evaluate, hf, model, runs, setup  # noqa: E402
from jaxsft.data import read_jsonl, row_texts  # noqa: E402
from jaxsft.config import Config, DataConfig, ModelConfig, load_config  # noqa: E402
from jaxsft.tokenizer import HFTokenizer, Tokenizer, load, stream_text  # noqa: E402

DATA = os.path.join(REPO, "data")
TOL = 1e-4


def raw_rows(name, n):
    """The first n JSON lines of data/<name>, as they are."""
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [f.readline() for _ in range(n)]


def read_rows(name, n):
    """The first n rows of data/<name> (jaxsft Rows: messages, question, expected)."""
    return read_jsonl(os.path.join(DATA, name))[:n]


def write_rows(path, name, n):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(raw_rows(name, n))
    return str(path)


def torch_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(ids, np.int64)[None])).logits[0].numpy()


_apply = jax.jit(lambda graphdef, params, tokens: model.apply(graphdef, params, tokens)[0][0], static_argnums=0)


def jax_logits(graphdef, params, ids, length=128):
    """Logits (T, V) of a causal model on ids, right-padded to `length` (which the model
    cannot see) so that every prompt runs one compiled program."""
    tokens = np.zeros((1, max(length, len(ids))), np.int32)
    tokens[0, :len(ids)] = ids
    return np.asarray(_apply(graphdef, params, jnp.asarray(tokens)))[:len(ids)]


def load_export(path):
    m, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return m.eval(), transformers.AutoTokenizer.from_pretrained(path)


def template_ids(hf_tok, messages):
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def hf_greedy(hf_model, hf_tok, conversations, max_new_tokens):
    """transformers' greedy answers, as a client gets them: the chat template's ids, left-padded
    into one batch, model.generate(do_sample=False), the new tokens decoded."""
    prompts = [template_ids(hf_tok, [{"role": r, "content": c} for r, c in conv]) for conv in conversations]
    P = max(map(len, prompts))
    ids = torch.tensor([[hf_tok.pad_token_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens)
    return [hf_tok.decode(row[P:], skip_special_tokens=True) for row in out]


# ---------------------------------------------------------------- a tiny Llama built by transformers


def bpe_backend(vocab_size=400):
    """A byte-level BPE tokenizer trained on data/ text, with the model's own <s> and </s>
    (none of our ChatML markers). Small, so many Chinese characters stay split into bytes."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(row_texts(read_rows("train.jsonl", 3000)), trainer)
    return backend


def build_llama(path, tie=False, theta=500000.0, seed=0, **over):
    """transformers' LlamaForCausalLM with random weights and the BPE tokenizer, saved to `path`
    the way a downloaded model directory looks."""
    backend = bpe_backend()
    backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}, f)
    kw = dict(vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=tie,
              bos_token_id=0, eos_token_id=1, initializer_range=0.1)
    kw.update(over)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    m.save_pretrained(path)
    return m.eval(), backend


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    m, backend = build_llama(path)
    return {"path": path, "model": m, "backend": backend}


def base_cfg(src, max_seq_len=128):
    return Config(model=ModelConfig(init_from=src, max_seq_len=max_seq_len, dropout=0.0), data=DataConfig())


def imported(src):
    """What a run with model.init_from: src starts from: (model config, tokenizer, params)."""
    cfg = runs.with_base_architecture(base_cfg(src))
    tok, base = setup._vocabulary(cfg, [], log=lambda *a, **k: None)
    mc = dataclasses.replace(cfg.model, vocab_size=len(tok))
    graphdef, params = runs.init_params_from(mc, 0, base)
    return mc, tok, graphdef, params, base


@pytest.mark.slow
def test_import_parity_gqa_untied_rope_theta_bpe(llama_dir):
    """transformers' own tiny Llama (4 query / 2 key-value heads, untied head, rope_theta
    500000, rms eps 1e-6, byte-level BPE) gives the same logits in jaxsft on 24 prompts."""
    mc, tok, graphdef, params, (base_params, rows) = imported(llama_dir["path"])
    assert (mc.n_heads, mc.kv_heads, mc.tie_embeddings, mc.rope_theta, mc.norm_eps) == (4, 2, False, 500000.0, 1e-6)
    assert isinstance(tok, HFTokenizer) and rows == llama_dir["backend"].get_vocab_size()
    # our four markers were absent: appended, the embedding and head grew, the old rows kept bitwise
    assert len(tok) == rows + 4 and (tok.bos_id, tok.pad_id) == (0, tok.end_id)
    assert [tok.system_id, tok.user_id, tok.assistant_id, tok.end_id] == list(range(rows, rows + 4))
    sd = {k: v.numpy() for k, v in llama_dir["model"].state_dict().items()}
    emb = np.asarray(params["embed"]["embedding"][...])
    np.testing.assert_array_equal(emb[:rows], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"][...])[:, :rows], sd["lm_head.weight"].T)
    worst = 0.0
    for r in read_rows("test.jsonl", 24):
        ids = [tok.bos_id] + tok.encode(r.question + "\n" + r.expected)
        assert tok.encode(r.question) == llama_dir["backend"].encode(r.question).ids
        expected = torch_logits(llama_dir["model"], ids)
        got = jax_logits(graphdef, params, ids)[:, :rows]
        assert np.abs(expected).max() > 1.0  # large enough weights that a wrong convention shows
        worst = max(worst, float(np.abs(got - expected).max()))
    print(f"import parity: max |logit difference| {worst:.2e} over 24 prompts")
    assert worst < TOL


def test_import_parity_is_not_trivial(llama_dir):
    """The comparison above sees the conventions: another rope_theta moves the logits far beyond TOL."""
    mc, tok, graphdef, params, _ = imported(llama_dir["path"])
    wrong = model.abstract(dataclasses.replace(mc, rope_theta=10000.0))[0]
    ids = [tok.bos_id] + tok.encode(read_rows("test.jsonl", 1)[0].question)
    assert np.abs(jax_logits(wrong, params, ids)[:, :-4] - torch_logits(llama_dir["model"], ids)).max() > 100 * TOL


def test_import_tied_bf16_sharded(tmp_path):
    """A tied model stored as bf16 in two shards with an index reads as transformers reads it."""
    m, backend = build_llama(str(tmp_path), tie=True, theta=10000.0, num_key_value_heads=4, seed=1)
    os.remove(tmp_path / "model.safetensors")
    m.to(torch.bfloat16).save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    mc, tok, graphdef, params, _ = imported(str(tmp_path))
    assert mc.tie_embeddings and mc.kv_heads == 4 and "lm_head" not in params
    ids = [tok.bos_id] + tok.encode("什么是过拟合？")
    # the bf16 weights computed in f32, as transformers loads them (.to() would round rope's buffer too)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    expected = torch_logits(m, ids)
    assert np.abs(jax_logits(graphdef, params, ids)[:, :-4] - expected).max() < TOL


def test_byte_level_streaming_never_splits_a_character(llama_dir):
    tok = HFTokenizer.wrap(bpe_backend())
    text = "K近邻是按最近邻居的多数类别做预测的方法。鳄梨🥑"
    ids = tok.encode(text)
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))  # tokens do split characters
    pieces = list(stream_text(tok, ids))
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    # the character vocabulary streams one character per token
    ctok = Tokenizer.build([text])
    assert list(stream_text(ctok, ctok.encode(text))) == list(text)


def test_hf_token_bytes_join_into_the_text_and_bound_its_characters():
    """token_bytes (the logprobs' "bytes"): a byte-level token's own bytes, part of a character
    or not, joined give the text; a marker adds nothing. No token covers more characters
    of a text than max_token_chars (the server's bound on a request's characters)."""
    tok = HFTokenizer.wrap(bpe_backend())
    text = "K近邻是按最近邻居的多数类别做预测的方法。鳄梨🥑 the end"
    ids = tok.encode(text)
    assert any(len(tok.token_bytes(i).decode("utf-8", errors="ignore")) == 0 for i in ids)  # parts of characters
    assert b"".join(tok.token_bytes(i) for i in ids).decode() == text
    assert tok.token_bytes(tok.end_id) == tok.token_bytes(tok.user_id) == b""
    ends = [len(tok.decode(ids[:n])) for n in range(len(ids) + 1)]
    assert max(b - a for a, b in zip(ends, ends[1:])) <= tok.max_token_chars < 40


def test_hf_tokenizer_saves_and_loads_with_its_kind(tmp_path):
    tok = HFTokenizer.wrap(bpe_backend(), bos="<s>", size=500)
    tok.save(str(tmp_path / "tokenizer.json"))
    back = load(str(tmp_path / "tokenizer.json"))
    assert isinstance(back, HFTokenizer) and len(back) == 500 and back.itos == tok.itos
    assert (back.bos_id, back.end_id, back.user_id) == (tok.bos_id, tok.end_id, tok.user_id)
    text = "请回答：用一句话解释K近邻。"
    assert back.encode(text) == tok.encode(text) and back.decode(tok.encode(text)) == text
    c = Tokenizer.build(["abc"])
    c.save(str(tmp_path / "char.json"))
    assert isinstance(load(str(tmp_path / "char.json")), Tokenizer)


# ---------------------------------------------------------------- export of a run trained on data/ rows

RUN_YAML = """\
model:
  max_seq_len: 192
  d_model: 64
  n_heads: 4
  n_layers: 2
  d_ff: 128
  dropout: 0.0
{model_extra}data:
  train: {train}
  val: {val}
  test: null
train:
  batch_size: 8
  lr: 3.0e-3
  warmup_steps: 5
  max_steps: {steps}
  eval_every: {eval_every}
  save_every: {save_every}
  seed: 0
  sample_questions: 0
  pack_len: 192
  buckets: [64, 128, 192]
out_dir: {out}
"""


def write_config(d, out, steps, model_extra="", n_train=400, eval_every=0, save_every=0):
    train = write_rows(os.path.join(d, "train.jsonl"), "train.jsonl", n_train)
    val = write_rows(os.path.join(d, "val.jsonl"), "val.jsonl", 16)
    path = os.path.join(d, "run.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(RUN_YAML.format(train=json.dumps(train), val=json.dumps(val), out=json.dumps(str(out)), steps=steps,
                                model_extra=model_extra, eval_every=eval_every, save_every=save_every))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A native run (character vocabulary, tied head) trained briefly on data/ rows with
    bin/train, and its bin/export directory."""
    d = tmp_path_factory.mktemp("native")
    run, out = d / "run", d / "exported"
    proc = run_script("train", "--config", write_config(str(d), run, steps=30), "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stderr
    proc = run_script("export", "--checkpoint", run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return {"run": str(run), "out": str(out), "dir": d}


@pytest.mark.slow
def test_export_files_config_and_tensor_names(exported, capsys, monkeypatch):
    from safetensors import safe_open
    out = exported["out"]
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    # every key we write is one the installed transformers' LlamaConfig has, with our value
    known = transformers.LlamaConfig().to_dict()
    assert set(written) <= set(known), set(written) - set(known)
    cfg = transformers.AutoConfig.from_pretrained(out)
    assert type(cfg).__name__ == "LlamaConfig" and cfg.rope_parameters["rope_theta"] == 10000.0
    for k, v in written.items():
        assert cfg.to_dict()[k] == v, k
    params, mc, tok = runs.restore(exported["run"])
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{n}.{w}.weight" for n in range(mc.n_layers) for w in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    with safe_open(os.path.join(out, "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == expected  # tied: no lm_head.weight
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").shape == (mc.d_model, mc.d_model)
        np.testing.assert_array_equal(f.get_tensor("model.layers.1.mlp.down_proj.weight"),
                                      np.asarray(params["blocks"][1]["mlp"]["w2"]["kernel"][...]).T)
    gen_cfg = transformers.GenerationConfig.from_pretrained(out)
    assert gen_cfg.eos_token_id == tok.end_id == tok.itos.index("<|endoftext|>")
    # a second export into the same directory is refused, and writes nothing
    code, _, err = run_main("export", ["--checkpoint", exported["run"], "--out", out], capsys, monkeypatch)
    assert code == 2 and err.strip().splitlines() == [f"error: {out}: already exists and is not an empty directory"]


@pytest.mark.slow
def test_export_logits_and_chat_template_parity(exported):
    """transformers' logits on 24 prompts with their answers equal jaxsft's (f32, < 1e-4), and
    apply_chat_template(messages, add_generation_prompt=True) gives jaxsft's prompt ids for 50
    test rows and for multi-turn, system-prompt and no-system-prompt conversations."""
    from jaxsft.decode import Generator
    hf_model, hf_tok = load_export(exported["out"])
    gen = Generator.from_run(exported["run"])
    system = gen.system_prompt
    worst = 0.0
    rows = read_rows("test.jsonl", 50)
    for r in rows[:24]:
        ids, _ = chatml.render(list(r.prompt_messages) + [("assistant", r.expected)], gen.tok, system)
        diff = jax_logits(gen.graphdef, gen.params, ids, 192) - torch_logits(hf_model, ids)
        worst = max(worst, float(np.abs(diff).max()))
    print(f"export parity: max |logit difference| {worst:.2e} over 24 prompts")
    assert worst < TOL
    convs = [r.prompt_messages for r in rows] + [
        (("system", "你是数学老师。"), ("user", "1+1等于几？")),
        (("system", ""), ("user", "你好")),
        (("user", "你好"), ("assistant", "你好！"), ("user", "什么是过拟合？")),
    ]
    for conv in convs:
        ids, truncated = gen.prompt_ids(conv)
        assert not truncated
        assert template_ids(hf_tok, [{"role": r, "content": c} for r, c in conv]) == list(ids), conv


@pytest.mark.slow
def test_export_generate_gives_bin_chat_answers(exported, capsys, monkeypatch):
    """model.generate(do_sample=False) on the chat template's ids answers 50 rows of
    data/test.jsonl exactly as bin/chat --file does (main() in this process: bin/chat's own
    process is test_cli's)."""
    d = exported["dir"]
    rows_path = write_rows(os.path.join(d, "test50.jsonl"), "test.jsonl", 50)
    code, _, err = run_main("chat", ["--checkpoint", exported["run"], "--file", rows_path, "--out", d / "answers.jsonl",
                                     "--max-new-tokens", 48], capsys, monkeypatch)
    assert code == 0, err
    with open(d / "answers.jsonl", encoding="utf-8") as f:
        ours = [json.loads(line)["answer"] for line in f]
    hf_model, hf_tok = load_export(exported["out"])
    theirs = hf_greedy(hf_model, hf_tok, [r.prompt_messages for r in read_rows("test.jsonl", 50)], 48)
    assert len(ours) == 50 and sum(len(a) >= 5 for a in ours) >= 25  # answers, not empty strings
    assert theirs == ours


@pytest.mark.slow
def test_round_trip_is_bitwise(exported):
    """An exported native run imported back: the same parameters bit for bit, and a
    tokenizer that encodes as the character vocabulary did."""
    params, mc, tok = runs.restore(exported["run"])
    back_cfg = runs.with_base_architecture(base_cfg(exported["out"], max_seq_len=mc.max_seq_len))
    back_tok = setup.tokenizer_for(back_cfg, [])
    assert len(back_tok) == len(tok) and back_tok.itos == tok.itos
    for attr in ("bos_id", "pad_id", "system_id", "user_id", "assistant_id", "end_id"):
        assert getattr(back_tok, attr) == getattr(tok, attr), attr
    text = read_rows("test.jsonl", 1)[0].question + "\n"
    assert back_tok.encode(text) == tok.encode(text)
    fields = {k: getattr(back_cfg.model, k) for k in runs.ARCHITECTURE}
    assert fields == {k: getattr(mc, k) for k in runs.ARCHITECTURE}
    back = hf.read_params(exported["out"], mc)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, params)  # the run's own tree: paths, shapes, f32
    a, b = jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(back)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype == np.float32 and x.tobytes() == y.tobytes(), path


# ---------------------------------------------------------------- bad Llama-format input


def _broken(src, dst, edit_config=None, drop=None, reshape=None, remove=None):
    """A copy of the Llama directory `src` with one thing wrong."""
    import shutil
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    if edit_config:
        with open(os.path.join(dst, "config.json")) as f:
            c = json.load(f)
        edit_config(c)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(c, f)
    if drop or reshape:
        path = os.path.join(dst, "model.safetensors")
        t = load_file(path)
        t.pop(drop, None)
        if reshape:
            t[reshape[0]] = np.zeros(reshape[1], np.float32)
        save_file(t, path, metadata={"format": "pt"})
    if remove:
        os.remove(os.path.join(dst, remove))
    return str(dst)


BAD = {
    "no-config": (dict(remove="config.json"),
                  "model.init_from: {d}/config.json: not found (expected a jaxsft run or a Llama-format directory: "
                  "config.json, model.safetensors, tokenizer.json)"),
    "missing-tensor": (dict(drop="model.layers.1.mlp.up_proj.weight"),
                       "{d}/model.safetensors: missing tensor model.layers.1.mlp.up_proj.weight"),
    "wrong-shape": (dict(reshape=("model.layers.0.self_attn.k_proj.weight", (64, 64))),
                    "{d}/model.safetensors: model.layers.0.self_attn.k_proj.weight has shape [64, 64], "
                    "config.json needs [32, 64]"),
    "model-type": (dict(edit_config=lambda c: c.update(model_type="gpt2")),
                   "{d}/config.json: model_type 'gpt2' is not supported (supported: llama, mistral, qwen2, qwen3)"),
    "rope-scaling": (dict(edit_config=lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                                          "rope_theta": 10000.0})),
                     "{d}/config.json: rope_parameters.rope_type 'yarn' is not supported (supported: default, "
                     "linear, llama3)"),
    "rope-scaling-legacy": (dict(edit_config=lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0})),
                            "{d}/config.json: rope_scaling.type 'dynamic' is not supported (supported: default, "
                            "linear, llama3)"),
    "rope-extra-key": (dict(edit_config=lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                            "rope_theta": 10000.0, "beta": 1.0})),
                       "{d}/config.json: rope_parameters.beta is not supported (rope_type 'linear' takes "
                       "rope_theta, factor)"),
    "attention-bias": (dict(edit_config=lambda c: c.update(attention_bias=True)),
                       "{d}/config.json: attention_bias=true is not supported (attention biases)"),
    "no-tokenizer": (dict(remove="tokenizer.json"),
                     "{d}/tokenizer.json: not found (jaxsft reads a Llama-format model's tokenizer from "
                     "tokenizer.json)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_llama_directory_is_one_line_exit_2_nothing_written(case, llama_dir, tmp_path, capsys, monkeypatch):
    import importlib
    change, message = BAD[case]
    d = _broken(llama_dir["path"], tmp_path / "bad", **change)
    out = tmp_path / "run"
    cfg = write_config(str(tmp_path), out, steps=2, model_extra=f"  init_from: {json.dumps(d)}\n", n_train=16)
    monkeypatch.setattr(sys, "argv", ["train", "--config", cfg, "--no-progress"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        importlib.import_module("jaxsft.cli.train").main()
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.strip().splitlines()[-1] == "error: " + message.replace("{d}", d)
    assert not [line for line in err.splitlines() if line.startswith(("error", "Traceback"))][:-1]
    assert not os.path.exists(out)


# ---------------------------------------------------------------- SFT of an imported Llama


DRIVER = r'''
import os, runpy, signal, sys
repo, at = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, repo)
from jaxsft import batching
plan_batch = batching.RunPlan.batch
def hooked(self, step):  # Ctrl-C while step `at` runs
    if step == at:
        os.kill(os.getpid(), signal.SIGINT)
    return plan_batch(self, step)
if at:
    batching.RunPlan.batch = hooked
sys.argv = [os.path.join(repo, "bin", "train")] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def train(d, config, *args, interrupt_at=0):
    import subprocess
    driver = os.path.join(d, "driver.py")
    with open(driver, "w") as f:
        f.write(DRIVER)
    # the session's compilation cache comes with os.environ (conftest.share_compilation_cache)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONIOENCODING="utf-8", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, driver, REPO, str(interrupt_at), "--config", config, "--no-progress", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def load_tree(d, step) -> dict:
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(os.path.join(d, str(step), "default"))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


SFT_STEPS = 8


@pytest.fixture(scope="module")
def sft(llama_dir, tmp_path_factory):
    """bin/train fine-tuning the transformers-built tiny Llama on data/ rows."""
    d = tmp_path_factory.mktemp("sft")
    run = d / "run"
    config = write_config(str(d), run, steps=SFT_STEPS, model_extra=f"  init_from: {json.dumps(llama_dir['path'])}\n",
                          n_train=200, eval_every=4, save_every=2)
    proc = train(str(d), config)
    assert proc.returncode == 0, proc.stderr
    return {"dir": d, "run": str(run), "config": config, "proc": proc}


@pytest.mark.slow
def test_sft_of_an_imported_llama_keeps_its_architecture_and_tokenizer(sft, llama_dir):
    assert "Llama-format model" in sft["proc"].stderr and "+ 4 for ChatML markers" in sft["proc"].stderr
    params, mc, tok = runs.restore(sft["run"])
    assert (mc.kv_heads, mc.tie_embeddings, mc.rope_theta, mc.d_ff) == (2, False, 500000.0, 96)
    assert isinstance(tok, HFTokenizer) and len(tok) == llama_dir["backend"].get_vocab_size() + 4
    assert params["lm_head"]["kernel"][...].shape == (64, len(tok))
    with open(os.path.join(sft["run"], "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) == SFT_STEPS and losses[-1] < losses[0]


@pytest.mark.slow
def test_sft_of_an_imported_llama_resumes_bitwise(sft):
    """Ctrl-C at step 5, then --resume: the same final training state as the uninterrupted run."""
    d = sft["dir"]
    other = ["--set", f"out_dir={d / 'interrupted'}"]
    proc = train(str(d), sft["config"], *other, interrupt_at=5)
    assert proc.returncode == 130, proc.stderr
    proc = train(str(d), sft["config"], *other, "--resume")
    assert proc.returncode == 0, proc.stderr
    import re
    resumed = re.search(r"interrupted at step (\d+)", proc.stdout)
    assert resumed and 0 < int(resumed.group(1)) < SFT_STEPS and "will not match" not in proc.stderr
    a = load_tree(os.path.join(sft["run"], "latest"), SFT_STEPS)
    b = load_tree(str(d / "interrupted" / "latest"), SFT_STEPS)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.slow
def test_sft_of_an_imported_llama_chat_eval_inspect_export(sft, capsys, monkeypatch):
    """On the fine-tuned import: bin/chat (batch and streamed) and bin/eval give the same answers,
    bin/eval scores them, and after bin/export transformers gives those greedy answers and
    bin/inspect's per-token losses. The programs run in this process (each one's own process is
    tested elsewhere)."""
    d = sft["dir"]
    rows = write_rows(os.path.join(d, "test20.jsonl"), "test.jsonl", 20)

    def run(name, *args):
        code, out, err = run_main(name, args, capsys, monkeypatch)
        assert code == 0, err
        return out

    run("chat", "--checkpoint", sft["run"], "--file", rows, "--out", d / "answers.jsonl", "--max-new-tokens", 24)
    with open(d / "answers.jsonl", encoding="utf-8") as f:
        ours = [json.loads(line)["answer"] for line in f]
    i, question = next((i, r.question) for i, r in enumerate(read_rows("test.jsonl", 20))
                       if [role for role, _ in r.prompt_messages] == ["user"])  # a one-question row
    out = run("chat", "--checkpoint", sft["run"], question, "--max-new-tokens", 24)
    assert out == ours[i] + "\n" and "\ufffd" not in out  # streamed in whole characters
    out = run("eval", "--checkpoint", sft["run"], "--data", rows, "--max-new-tokens", 24, "--json", d / "eval.json")
    with open(d / "eval.json", encoding="utf-8") as f:
        assert [r["answer"] for r in json.load(f)["rows"]] == ours  # bin/chat's answers (transformers', below)
    scored = read_rows("test.jsonl", 20)
    figures = evaluate.aggregate([evaluate.score_row(a, r.expected) for a, r in zip(ours, scored)],
                                 [r.category for r in scored])
    assert evaluate.score_table(figures) in out, out
    inspected = run("inspect", "--config", sft["config"], "--checkpoint", sft["run"])
    run("export", "--checkpoint", sft["run"], "--out", d / "exported")
    hf_model, hf_tok = load_export(str(d / "exported"))
    assert hf_model.config.num_key_value_heads == 2 and not hf_model.config.tie_word_embeddings
    assert hf_tok.convert_ids_to_tokens(hf_tok.bos_token_id) == "<s>"
    convs = [r.prompt_messages for r in read_rows("test.jsonl", 20)]
    assert hf_greedy(hf_model, hf_tok, convs, 24) == ours
    # bin/inspect's per-token losses on training row 0 are transformers' cross-entropy on the export
    _, mc, tok = runs.restore(sft["run"])
    system = chatml.default_system_prompt(tok, load_config(sft["config"]).data.system_prompt)  # null: ChatML's
    ids, mask = chatml.render(read_rows("train.jsonl", 1)[0].messages, tok, system)
    ids, mask = ids[:mc.max_seq_len + 1], mask[1:mc.max_seq_len + 1]
    logp = torch.log_softmax(torch.tensor(torch_logits(hf_model, ids[:-1])), -1).numpy()
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    lines = inspected.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["pos"]) + 1
    table = [line.split() for line in lines[start:start + len(nll)]]
    assert lines[start + len(nll)].startswith(f"positions: {len(nll)}, ")
    assert [r[-2] == "✓" for r in table] == [bool(m) for m in mask]
    np.testing.assert_allclose([float(r[-1]) for r in table], nll, atol=5e-4 + TOL)  # printed to 3 decimals
    assert float(lines[-1].split()[4]) == pytest.approx(nll[mask > 0].mean(), abs=5e-5 + TOL)


def test_llama_options_are_validated_config_keys():
    from jaxsft.config import UserError, load_config
    cfg = load_config(None, ["model.n_kv_heads=2", "model.head_size=32", "model.tie_embeddings=false"])
    assert (cfg.model.kv_heads, cfg.model.head_dim, cfg.model.tie_embeddings) == (2, 32, False)
    assert load_config(None).model.kv_heads == 6 and load_config(None).model.head_dim == 64
    for sets, message in [(["model.n_kv_heads=4"], "--set model.n_kv_heads: n_kv_heads=4 does not divide n_heads=6"),
                          (["model.head_size=33"], "--set model.head_size: head_size=33 must be even"),
                          (["model.rope_theta=0"], "--set model.rope_theta: must be positive, got 0.0")]:
        with pytest.raises(UserError) as e:
            load_config(None, sets)
        assert str(e.value).startswith(message), str(e.value)
