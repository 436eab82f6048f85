"""The model families (config.FAMILIES: llama with rope scaling, mistral, qwen2, qwen3) against
transformers' own classes, on tiny random models built here (every tensor random: biases and norm
scales too, which transformers starts at 0 and 1) with a BPE tokenizer trained here:

- import: the same logits (f32, within 1e-4) on a few sequences, and turning the family's feature
  off (its rope scaling, its biases, its q/k norms) moves them far beyond that;
- decoding: the engine (prefill after a shared prefix, then KV-cache steps) continues prompts
  greedily with transformers' generate(do_sample=False) tokens;
- export: hf.write_llama writes the family's class (model_type, architectures, keys its config
  class knows), which transformers loads with the same logits, and which reads back bitwise;
- LoRA: adapters on a qwen2 / qwen3 base (its biases and norms frozen) load in PEFT with our logits;
  end to end (slow), each family with the chat template its models ship with: bin/train (LoRA on
  qwen2), bin/export as the base's class with its template and generation_config.json, and
  transformers' greedy answers through the export's apply_chat_template equal bin/chat's;
- bad input: another model_type or rope type, a sliding window on: one line, exit 2, nothing written.

Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import lazy_import, one_line_error, run_main, run_script

torch, transformers = lazy_import("torch"), lazy_import("transformers")  # at first use (conftest.TOGETHER)

from jaxsft import hf, lora, model, ops, runs  # noqa: E402
from jaxsft.config import FAMILIES, LoraConfig, ModelConfig, UserError, load_config  # noqa: E402
from jaxsft.engine import Engine, Request  # noqa: E402
from test_hf import (TOL, _broken, bpe_backend, imported, jax_logits, load_export, read_rows,  # noqa: E402
                     torch_logits, write_config)

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# case -> (transformers config class, its settings, the ModelConfig values the import must give)
CASES = {
    "llama-llama3": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=LLAMA3),
                     dict(family="llama", kv_heads=2, tie_embeddings=False, rope_type="llama3", rope_factor=8.0,
                          rope_original_max_len=64, rope_theta=500000.0)),
    "llama-linear": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
                     dict(family="llama", kv_heads=4, tie_embeddings=True, rope_type="linear", rope_factor=4.0)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None),
                dict(family="mistral", kv_heads=2, attn_bias="none", qk_norm=False, rope_type="default")),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
              dict(family="qwen2", kv_heads=2, tie_embeddings=True, attn_bias="qkv", qk_norm=False)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, tie_word_embeddings=False, head_dim=24, attention_bias=True),
              dict(family="qwen3", kv_heads=2, tie_embeddings=False, head_dim=24, attn_bias="all", qk_norm=True)),
}
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, initializer_range=0.2)


@functools.cache
def backend():
    return bpe_backend()


def build(path: str, case: str, seed: int = 0):
    """transformers' model of `case` with every tensor random, saved to `path` with the BPE tokenizer."""
    cls, settings, _ = CASES[case]
    backend().save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}, f)
    cfg = getattr(transformers, cls)(**COMMON, vocab_size=backend().get_vocab_size(), **settings)
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # transformers starts norms at 1 and biases at 0: a wrong convention would not show
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
            elif name.endswith(".bias"):  # larger ones would make every continuation repeat one token
                p.normal_(0.0, 0.1)
    m.save_pretrained(path)
    return m.eval()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    out = {}
    for case in CASES:
        path = str(tmp_path_factory.mktemp(case))
        out[case] = {"path": path, "model": build(path, case)}
    return out


def sequences(n=4):
    """A few token sequences of different lengths (bos + a test row's question and answer)."""
    return [[0] + backend().encode(r.question + "\n" + r.expected).ids[:100] for r in read_rows("test.jsonl", n)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_gives_transformers_logits(case, family_dirs):
    d = family_dirs[case]
    mc, tok, graphdef, params, (base, rows) = imported(d["path"])
    for key, value in CASES[case][2].items():
        assert getattr(mc, key) == value, key
    chex.assert_trees_all_equal_shapes(base, model.abstract(dataclasses.replace(mc, vocab_size=rows))[1])
    worst = 0.0
    for ids in sequences():
        expected = torch_logits(d["model"], ids)
        assert expected.std() > 0.5  # far from constant: a wrong convention shows
        worst = max(worst, float(np.abs(jax_logits(graphdef, params, ids)[:, :rows] - expected).max()))
    print(f"{case}: max |logit difference| {worst:.2e}")
    assert worst < TOL


def _without(params, names):
    """params without the leaves under a module or variable named in `names`, except biases, which
    are zeroed instead: the same tree, so the parity test's compiled program runs it."""
    flat = [(p, jax.tree.map(jnp.zeros_like, v) if "bias" in map(str, p) else v)
            for p, v in nnx.to_flat_state(params) if not set(map(str, p)) & (set(names) - {"bias"})]
    return nnx.from_flat_state(flat)


# each family's feature turned off: (case, ModelConfig changes, parameters dropped, or zeroed for biases)
OFF = [("llama-llama3", dict(rope_type="default"), ()), ("llama-linear", dict(rope_type="default"), ()),
       ("qwen2", dict(), ("bias",)), ("qwen3", dict(qk_norm=False), ("q_norm", "k_norm")),
       ("qwen3", dict(), ("bias",))]


@pytest.mark.parametrize("case, change, dropped", OFF, ids=[f"{c}-{next(iter(ch), d and d[0])}" for c, ch, d in OFF])
def test_each_feature_is_seen_by_the_comparison(case, change, dropped, family_dirs):
    """The break that makes the parity test fail: the family's feature off moves the logits far beyond TOL."""
    d = family_dirs[case]
    mc, tok, graphdef, params, (_, rows) = imported(d["path"])
    off = model.abstract(dataclasses.replace(mc, **change))[0]
    ids = sequences(1)[0]
    diff = np.abs(jax_logits(off, _without(params, dropped), ids)[:, :rows] - torch_logits(d["model"], ids)).max()
    assert diff > 100 * TOL, diff


# one case per feature the KV-cache path computes (mistral's and linear rope's are llama's and llama3's)
CACHE_CASES = ("llama-llama3", "qwen2", "qwen3")


@pytest.mark.parametrize("case", CACHE_CASES)
def test_engine_greedy_continuations_are_transformers(case, family_dirs):
    """The engine's prefill (after a shared prefix) and KV-cache steps continue 4 prompts of different
    lengths with the tokens of transformers' generate(do_sample=False): rope scaling, biases and q/k
    norms in the cache path."""
    d = family_dirs[case]
    mc, _, _, _, (base, rows) = imported(d["path"])
    mc = dataclasses.replace(mc, vocab_size=rows)
    prompts = [[0] + backend().encode("问题：" + r.question).ids[:40] for r in read_rows("test.jsonl", 4)]
    prefix = prompts[0][:3]
    assert sum(p[:3] == prefix for p in prompts) >= 2 and len({len(p) for p in prompts}) > 1
    reqs = Engine(base, mc, stop_ids=(1,), slots=4, pad_id=0, admit_at=4, prefix=prefix).run(
        [Request(np.asarray(p, np.int32), 16) for p in prompts])
    theirs = []
    for p in prompts:
        with torch.no_grad():
            out = d["model"].generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                      do_sample=False, max_new_tokens=16, eos_token_id=1, pad_token_id=0)
        new = out[0, len(p):].tolist()
        theirs.append(new[:new.index(1)] if 1 in new else new)
    ours = [r.tokens for r in reqs]
    assert len(set(sum(ours, []))) > 8  # not one token over and over
    assert ours == theirs


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_is_the_family_transformers_loads(case, family_dirs, tmp_path):
    """hf.write_llama of the imported model (ChatML markers added): config.json names the family's
    class with keys its config class knows, transformers loads it with our logits over the whole
    vocabulary, and it reads back bitwise."""
    mc, tok, graphdef, params, _ = imported(family_dirs[case]["path"])
    out = str(tmp_path / "exported")
    hf.write_llama(out, params, mc, tok, "", "float32")
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    cls = FAMILIES[mc.family][0]
    assert written["model_type"] == mc.family and written["architectures"] == [cls]
    known = transformers.AutoConfig.for_model(mc.family).to_dict()
    assert set(written) <= set(known), set(written) - set(known)
    hf_model, _ = load_export(out)
    assert type(hf_model).__name__ == cls
    loaded = hf_model.config.to_dict()
    for k, v in written.items():
        assert loaded[k] == v, k
    for ids in sequences(2):
        ids = ids + [tok.user_id, tok.end_id]  # the new rows too
        assert np.abs(jax_logits(graphdef, params, ids) - torch_logits(hf_model, ids)).max() < TOL
    back = hf.read_params(out, mc)
    leaves = jax.tree_util.tree_leaves_with_path
    for (path, x), (_, y) in zip(leaves(params), leaves(back)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path


def _random_b(adapters, seed=2):
    """Adapters whose B is not 0 (as after training)."""
    out = []
    for i, (path, var) in enumerate(nnx.to_flat_state(adapters)):
        if path[-1] == "lora_b":
            var = var.replace(0.05 * jax.random.normal(jax.random.PRNGKey(seed + i), var.get_value().shape))
        out.append((path, var))
    return nnx.from_flat_state(out)


# slow: importing peft costs each process ~4 s; the quick tier checks PEFT on the Llama base (test_lora.py)
@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen2", "qwen3"])
def test_peft_adapter_on_a_family_base_gives_our_logits(case, family_dirs, tmp_path):
    """LoRA on a base with biases and q/k norms: those stay frozen base parameters (none is an
    adapter), and PEFT on transformers' class of the exported base computes our unmerged logits."""
    peft = pytest.importorskip("peft")
    mc, tok, graphdef, params, (_, rows) = imported(family_dirs[case]["path"])
    lc = LoraConfig(rank=4, alpha=8.0)
    adapted, frozen, adapters = lora.init(mc, lc, seed=0, base=params, n_old=rows)
    adapters = _random_b(adapters)
    frozen_paths = [set(map(str, p)) for p, _ in nnx.to_flat_state(frozen)]
    assert any("bias" in p for p in frozen_paths) and any("q_norm" in p for p in frozen_paths) == (case == "qwen3")
    assert not any({"bias", "q_norm", "k_norm"} & set(map(str, p)) for p, _ in nnx.to_flat_state(adapters))
    tokens = jnp.asarray([sequences(1)[0][:30] + [tok.user_id, tok.assistant_id]], jnp.int32)
    ours = np.asarray(model.apply(adapted, lora.combine(frozen, adapters), tokens)[0])
    hf.write_llama(str(tmp_path / "base"), params, mc, tok, "", "float32")
    lora.save_peft(str(tmp_path / "adapter"), adapters, lc, mc.vocab_size)
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
        plain = base(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(
            torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    assert np.abs(ours - plain).max() > 1e-3  # the adapter changes the logits ...
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)  # ... as PEFT applies it too


# each family in the chat template its models ship with (test_templates.STYLES; mistral's stands for
# a template that folds the system prompt into the first user turn, as Mistral's and Gemma's do)
STYLE_OF = {"llama-llama3": "llama3", "llama-linear": "llama3", "mistral": "gemma", "qwen2": "qwen", "qwen3": "qwen"}


def build_styled(path: str, case: str) -> str:
    """The base of `case` (every tensor random, as `build`, in one block: the layers' names and
    values in and out are checked on two by test_import_gives_transformers_logits and
    test_export_is_the_family_transformers_loads) with its style's tokenizer files, chat template
    and eos ids (generation_config.json), as a downloaded model's directory has them."""
    import test_templates as tt
    style = STYLE_OF[case]
    backend = styled_backend()
    tt.write_base_files(path, backend, style, generation=False)
    tokens, eos = tt.STYLES[style][2], [backend.token_to_id(t) for t in tt.STYLES[style][3]]
    ids = {k: backend.token_to_id(tokens[f"{k}_token"]) if f"{k}_token" in tokens else None for k in ("bos", "pad")}
    cls, settings, _ = CASES[case]
    cfg = getattr(transformers, cls)(**{**COMMON, "num_hidden_layers": 1, "bos_token_id": ids["bos"],
                                        "eos_token_id": eos, "pad_token_id": ids["pad"]},
                                     vocab_size=backend.get_vocab_size(), **settings)
    torch.manual_seed(1)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.3)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    m.save_pretrained(path)  # config.json, model.safetensors, generation_config.json (its eos ids)
    return path


@functools.cache
def styled_backend():
    import test_templates
    return test_templates.bpe_backend()


def _moved(params, start, name):
    """Whether every parameter whose path holds `name` differs from its start."""
    pairs = zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(start))
    moved = [not np.array_equal(x, y) for (path, x), y in pairs if name in jax.tree_util.keystr(path)]
    return bool(moved) and all(moved)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_family_trains_in_its_own_template_and_exports_as_itself(case, tmp_path, capsys, monkeypatch):
    """bin/train (LoRA on qwen2, every parameter otherwise) on the family's base with its own chat
    template, then bin/export: config.json's model_type and architectures, the chat template and
    generation_config.json are the base's; transformers' greedy answers through the export's
    apply_chat_template equal bin/chat's on every row; on qwen3 the q/k norms and biases trained;
    on qwen2, PEFT's base + adapter gives the merged export's logits."""
    import test_templates as tt
    base = build_styled(str(tmp_path / "base"), case)
    config = tt.write_run_config(tmp_path, base, steps=4)
    run, out = tmp_path / "run", tmp_path / "exported"
    lora_args = ["--set", "lora.rank=4"] if case == "qwen2" else []
    code, _, err = run_main("train", ["--config", config, "--no-progress", *lora_args], capsys, monkeypatch)
    assert code == 0 and "its own chat template" in err, err
    exports = {out: []} | ({tmp_path / "adapter": ["--adapter"]} if lora_args else {})
    for where, extra in exports.items():
        code, _, err = run_main("export", ["--checkpoint", run, "--out", where, *extra], capsys, monkeypatch)
        assert code == 0, err
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        with open(os.path.join(base, name)) as f, open(out / name) as g:
            theirs, ours = json.load(f), json.load(g)
        if name == "config.json":
            assert (ours["model_type"], ours["architectures"]) == (theirs["model_type"], theirs["architectures"])
        elif name == "generation_config.json":
            assert ours == theirs
        else:
            assert ours["chat_template"] == theirs["chat_template"]
    rows = tmp_path / "rows.jsonl"
    with open(os.path.join(tt.REPO, "data", "test.jsonl"), encoding="utf-8") as f:
        rows.write_text("".join(f.readline() for _ in range(4)), encoding="utf-8")
    code, _, err = run_main("chat", ["--checkpoint", run, "--file", rows, "--out", tmp_path / "answers.jsonl",
                                     "--max-new-tokens", 12], capsys, monkeypatch)
    assert code == 0, err
    ours = [json.loads(line)["answer"] for line in open(tmp_path / "answers.jsonl", encoding="utf-8")]
    convs = [r.prompt_messages for r in tt.read_jsonl(str(rows))]
    assert tt.hf_answers(str(out), convs, 12) == ours and len(set(ours)) > 1, ours
    params, mc, tok = runs.restore(str(run))
    if case == "qwen3":
        start = hf.read_params(base, dataclasses.replace(mc, vocab_size=len(tok)))
        assert _moved(params, start, "q_norm") and _moved(params, start, "bias")
    if case == "qwen2":
        peft = pytest.importorskip("peft")
        ids = torch.tensor([tok.encode("3加5等于多少？")])
        with torch.no_grad():
            merged = load_export(str(out))[0](ids).logits.numpy()
            plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter" / "base"))
            adapted = peft.PeftModel.from_pretrained(plain, str(tmp_path / "adapter" / "adapter")).eval()
            np.testing.assert_allclose(adapted(ids).logits.numpy(), merged, atol=TOL, rtol=0)


# ---------------------------------------------------------------- bad input

BAD = {
    "model-type": ("llama-linear", lambda c: c.update(model_type="gemma"),
                   "config.json: model_type 'gemma' is not supported (supported: llama, mistral, qwen2, qwen3)"),
    "rope-type": ("llama-linear", lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                      "rope_theta": 10000.0}),
                  "config.json: rope_parameters.rope_type 'yarn' is not supported (supported: default, linear, "
                  "llama3)"),
    "mistral-window": ("mistral", lambda c: c.update(sliding_window=4096),
                       "config.json: sliding_window=4096 is not supported (sliding-window attention)"),
    "qwen2-window": ("qwen2", lambda c: c.update(use_sliding_window=True),
                     "config.json: use_sliding_window=true is not supported (sliding-window attention)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsupported_base_is_one_line_exit_2_nothing_written(case, family_dirs, tmp_path, capsys, monkeypatch):
    src, edit, message = BAD[case]
    d = _broken(family_dirs[src]["path"], tmp_path / "bad", edit_config=edit)
    out = tmp_path / "run"
    cfg = write_config(str(tmp_path), out, steps=2, model_extra=f"  init_from: {json.dumps(d)}\n", n_train=16)
    code, _, err = run_main("train", ["--config", cfg, "--no-progress"], capsys, monkeypatch)
    assert one_line_error(code, err) == f"error: {d}/{message}"
    assert not os.path.exists(out)


@pytest.mark.parametrize("sets, message", [
    (["model.family=gemma"], "--set model.family: 'gemma' is not supported (supported: llama, mistral, qwen2, qwen3)"),
    (["model.family=qwen2"], "--set model.family: qwen2 (Qwen2ForCausalLM) has model.attn_bias qkv, not none"),
    (["model.family=qwen3", "model.attn_bias=qkv"],
     "--set model.family: qwen3 (Qwen3ForCausalLM) has model.attn_bias none or all, not qkv"),
    (["model.family=qwen3"], "--set model.family: qwen3 (Qwen3ForCausalLM) has model.qk_norm=true"),
    (["model.qk_norm=true"], "<defaults>: model.family: llama (LlamaForCausalLM) has model.qk_norm=false"),
    (["model.attn_bias=maybe"], "--set model.attn_bias: expected one of none, qkv, all, got 'maybe'"),
    (["model.rope_type=yarn"], "--set model.rope_type: 'yarn' is not supported (supported: default, linear, llama3)"),
    (["model.rope_type=linear", "model.rope_factor=0"], "--set model.rope_factor: must be positive, got 0.0"),
    (["model.rope_type=llama3", "model.rope_high_freq_factor=1"], "--set model.rope_high_freq_factor: must be above"),
])
def test_family_config_keys_are_validated(sets, message):
    with pytest.raises(UserError) as e:
        load_config(None, sets)
    assert str(e.value).startswith(message), str(e.value)
    ok = load_config(None, ["model.family=qwen3", "model.qk_norm=true", "model.attn_bias=all"]).model
    assert (ok.family, ok.qk_norm, ok.attn_bias) == ("qwen3", True, "all")


def test_defaults_leave_the_llama_model_as_it_was():
    """The features off draw no random numbers and add no parameters: a qwen2 model's kernels are
    the llama model's of the same seed, and the default rotary frequencies are the plain formula's."""
    mc = ModelConfig(vocab_size=40, max_seq_len=32, d_model=32, n_heads=4, n_layers=2, d_ff=64)
    _, plain = model.init(mc, 3)
    names = {str(p[-1]) for p, _ in nnx.to_flat_state(plain)}
    assert names == {"embedding", "scale", "kernel"}
    _, qwen = model.init(dataclasses.replace(mc, family="qwen3", attn_bias="all", qk_norm=True), 3)
    qwen = dict(nnx.to_flat_state(qwen))
    for path, v in nnx.to_flat_state(plain):
        assert np.asarray(v.get_value()).tobytes() == np.asarray(qwen[path].get_value()).tobytes(), path
    half = 8
    expected = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    assert np.asarray(ops.rope_freqs(16, 10000.0)).tobytes() == np.asarray(expected).tobytes()


@pytest.mark.parametrize("rope", [LLAMA3, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                                  dict(LLAMA3, original_max_position_embeddings=8192, factor=32.0)],
                         ids=["llama3", "linear", "llama3-8192"])
def test_rope_freqs_are_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=256,
                                   rope_parameters=dict(rope))
    theirs = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")[0].numpy()
    scaling = (("linear", rope["factor"]) if rope["rope_type"] == "linear" else
               ("llama3", rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                rope["original_max_position_embeddings"]))
    ours = np.asarray(ops.rope_freqs(64, rope["rope_theta"], scaling))
    assert not np.allclose(ours, np.asarray(ops.rope_freqs(64, rope["rope_theta"])))  # scaled
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_absent_keys_default_as_transformers_config_classes(family):
    """hf.DEFAULTS and hf.FAMILY_DEFAULTS are what each family's config class assumes."""
    c = transformers.AutoConfig.for_model(family)
    want = {**hf.DEFAULTS, **hf.FAMILY_DEFAULTS[family]}
    d, h = c.hidden_size, c.num_attention_heads
    got = {k: getattr(c, k, None) for k in want if k != "rope_theta"}
    got["rope_theta"] = c.rope_parameters["rope_theta"]
    want["num_key_value_heads"] = want["num_key_value_heads"] or h
    want["head_dim"] = want["head_dim"] or d // h
    got["head_dim"] = got["head_dim"] or d // h
    assert got == want
