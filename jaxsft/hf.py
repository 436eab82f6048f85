"""Llama-format models in and out: the directory transformers' LlamaForCausalLM and
AutoTokenizer read and write.

    config.json                    LlamaForCausalLM's configuration (transformers 5 keys)
    model.safetensors              the weights (or shards listed in model.safetensors.index.json)
    tokenizer.json                 the `tokenizers` library's file
    tokenizer_config.json, special_tokens_map.json   special tokens and our ChatML chat template
                                   (a run on a base's own template: that template, the base's tokens)
    generation_config.json         eos = <|endoftext|> (on a base's own template: the base's file)

`write_llama` writes one from a model's parameters (runs.export: from a jaxsft run). A run whose
model.init_from is one (runs.py) reads its architecture (`model_fields`), its tokenizer with our markers
added (`read_tokenizer`) and its weights (`read_params`); a feature jaxsft does not
compute stops with a UserError naming the file and key. A base's own chat template
(`read_chat_template`: chat_template.jinja, else tokenizer_config.json's chat_template) goes
with its tokenizer into the run (tokenizer.HFTokenizer.template) and back out at export.

Weights: transformers' name <- jaxsft's parameter, torch's (out, in) layout = our kernel.T:

    model.embed_tokens.weight                   embed.embedding          (V, D)  as is
    model.layers.N.input_layernorm.weight       blocks.N.norm1.scale     (D,)
    model.layers.N.self_attn.{q,k,v,o}_proj.weight   blocks.N.attn.w{q,k,v,o}.kernel.T
    model.layers.N.post_attention_layernorm.weight   blocks.N.norm2.scale
    model.layers.N.mlp.{gate,up,down}_proj.weight    blocks.N.mlp.w{1,3,2}.kernel.T
    model.norm.weight                           norm.scale
    lm_head.weight                              lm_head.kernel.T (untied; tied models have none)

The conventions behind these (checked against transformers' modeling_llama.py, and
settled by the logits tests in tests/test_hf.py): rotary embedding rotates the pairs
(x[i], x[i + K/2]) (rotate_half) with inverse frequencies theta^(-2i/K); RMSNorm is
x * rsqrt(mean(x^2) + eps) * weight in float32; attention scores are scaled by
K^-0.5; key/value head g serves query heads g*H/G .. (g+1)*H/G - 1 (repeat_kv).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import jax
import numpy as np

from . import templates
from .config import ModelConfig, UserError, read_text
from .files import write_json
from .templates import ChatTemplate
from .tokenizer import ASSISTANT, END, SPECIALS, SYSTEM, UNK, USER, AnyTokenizer, HFTokenizer, Tokenizer

DTYPES = {"F32": np.float32, "BF16": "bfloat16", "F16": np.float16}


def _names(mc: ModelConfig) -> dict:
    """jaxsft parameter path ('blocks.0.attn.wq.kernel') -> (transformers name, transposed)."""
    names = {"embed.embedding": ("model.embed_tokens.weight", False), "norm.scale": ("model.norm.weight", False)}
    if not mc.tie_embeddings:
        names["lm_head.kernel"] = ("lm_head.weight", True)
    for n in range(mc.n_layers):
        ours, theirs = f"blocks.{n}.", f"model.layers.{n}."
        names[ours + "norm1.scale"] = (theirs + "input_layernorm.weight", False)
        names[ours + "norm2.scale"] = (theirs + "post_attention_layernorm.weight", False)
        for w, proj in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            names[f"{ours}attn.{w}.kernel"] = (f"{theirs}self_attn.{proj}.weight", True)
        for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            names[f"{ours}mlp.{w}.kernel"] = (f"{theirs}mlp.{proj}.weight", True)
    return names


def _path(path) -> str:
    """A pytree path of the parameter State as a dotted name, without nnx's trailing 'value'."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(parts[:-1] if parts[-1] == "value" else parts)


# ---------------------------------------------------------------- export


def llama_config(mc: ModelConfig, tok: AnyTokenizer, dtype: str = "float32") -> dict:
    """config.json of LlamaForCausalLM for a jaxsft model (keys as transformers 5 writes them)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": mc.vocab_size, "hidden_size": mc.d_model, "intermediate_size": mc.d_ff,
        "num_hidden_layers": mc.n_layers, "num_attention_heads": mc.n_heads,
        "num_key_value_heads": mc.kv_heads, "head_dim": mc.head_dim, "hidden_act": "silu",
        "max_position_embeddings": mc.max_seq_len, "initializer_range": 0.02, "rms_norm_eps": mc.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": mc.rope_theta},
        "tie_word_embeddings": mc.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "pretraining_tp": 1, "use_cache": True, "dtype": dtype,
        "bos_token_id": tok.bos_id, "eos_token_id": tok.end_id, "pad_token_id": tok.pad_id,
    }


def chat_template(system_prompt: str, m: dict) -> str:
    """A Jinja chat template rendering exactly chatml.render: bos, the system turn (the
    messages' own or `system_prompt`; none when empty), turns separated by "\\n", and with
    add_generation_prompt "\\n<|assistant|>". (transformers trims a newline after a block
    tag, so newlines are written as expressions.)"""
    nl = '{{ "\\n" }}'
    return ("{{ bos_token }}"
            f"{{% set ns = namespace(system={json.dumps(system_prompt, ensure_ascii=False)}) %}}"
            "{% set turns = messages %}"
            "{% if messages and messages[0]['role'] == 'system' %}"
            "{% set ns.system = messages[0]['content'] %}{% set turns = messages[1:] %}{% endif %}"
            f"{{% if ns.system %}}{m['system']}{{{{ ns.system }}}}{m['end']}{{% endif %}}"
            "{% for message in turns %}"
            f"{{% if ns.system or not loop.first %}}{nl}{{% endif %}}"
            f"{{% if message['role'] == 'user' %}}{m['user']}{{% else %}}{m['assistant']}{{% endif %}}"
            f"{{{{ message['content'] }}}}{m['end']}"
            "{% endfor %}"
            f"{{% if add_generation_prompt %}}{nl}{m['assistant']}{{% endif %}}")


def char_backend(tok: Tokenizer):
    """The character vocabulary as a `tokenizers` tokenizer: every character a token
    (ids as ours), the markers special tokens, <unk> for the rest; tokens are joined
    without spaces when decoding."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    backend = Backend(models.WordLevel({s: i for i, s in enumerate(tok.itos)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return backend


def _tokenizer_files(tok: AnyTokenizer, system_prompt: str, max_seq_len: int):
    """(tokenizers backend, tokenizer_config.json, special_tokens_map.json). A run on a base's own
    template writes that template and the base's special tokens (and a pad token)."""
    if tok.template is not None:
        special = {"pad_token": tok.markers["pad"], **tok.template.tokens}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
                  "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": max_seq_len,
                  "chat_template": tok.template.source}
        return tok.backend, config, special
    if isinstance(tok, Tokenizer):
        backend = char_backend(tok)
        m = {"bos": tok.itos[tok.bos_id], "pad": tok.itos[tok.pad_id], "system": tok.itos[tok.system_id],
             "user": tok.itos[tok.user_id], "assistant": tok.itos[tok.assistant_id], "end": tok.itos[tok.end_id]}
        unk = UNK
    else:
        backend, m = tok.backend, tok.markers
        unk = getattr(backend.model, "unk_token", None)
    special = {"bos_token": m["bos"], "eos_token": m["end"], "pad_token": m["pad"],
               **({"unk_token": unk} if unk else {}),
               "additional_special_tokens": [m["system"], m["user"], m["assistant"]]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": max_seq_len,
              "chat_template": chat_template(system_prompt, m)}
    return backend, config, special


def generation_config(tok: AnyTokenizer) -> dict:
    """generation_config.json: the base's as it was (a run on its own template), else ours: eos
    at the tokenizer's stop ids."""
    if tok.template is not None and tok.template.generation_config:
        return tok.template.generation_config
    eos = tok.stop_ids[0] if len(tok.stop_ids) == 1 else list(tok.stop_ids)
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": tok.pad_id}


def write_llama(out_dir: str, params, mc: ModelConfig, tok: AnyTokenizer, system_prompt: str, dtype: str) -> None:
    """The files of a Llama-format model directory (created) for the parameters of `mc`."""
    import ml_dtypes
    from safetensors.numpy import save_file
    cast = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    names = _names(mc)
    tensors = {}
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        name, transposed = names[_path(path)]
        a = np.asarray(a, np.float32)
        tensors[name] = np.ascontiguousarray(a.T if transposed else a).astype(cast)
    backend, tok_config, special = _tokenizer_files(tok, system_prompt, mc.max_seq_len)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(out_dir, "config.json"), llama_config(mc, tok, dtype), indent=2)
    write_json(os.path.join(out_dir, "generation_config.json"), generation_config(tok), indent=2)
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), tok_config, indent=2)
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special, indent=2)


# ---------------------------------------------------------------- import


def is_llama_dir(path: str) -> bool:
    """A directory whose config.json is a transformers config (not a jaxsft run's)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and not isinstance(d.get("model"), dict)


def _read_json(path: str, required: bool = True):
    if not os.path.isfile(path):
        if required:
            raise UserError(f"{path}: not found")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object")
    return d


# config.json keys whose other values ask for computations jaxsft does not do: (key, fine values, what)
UNSUPPORTED = [("attention_bias", (None, False), "attention biases"), ("mlp_bias", (None, False), "MLP biases"),
               ("sliding_window", (None,), "sliding-window attention"),
               ("use_sliding_window", (None, False), "sliding-window attention"),
               ("hidden_act", (None, "silu"), "jaxsft's MLP is SwiGLU with silu")]


def model_fields(src: str) -> dict:
    """The ModelConfig keys src/config.json sets, vocab_size its checkpoint's rows
    (transformers' defaults for absent keys); UserError naming the key for any feature
    jaxsft does not compute."""
    path = os.path.join(src, "config.json")
    c = _read_json(path)

    def get(key, kind, default):
        v = default if c.get(key) is None else c[key]
        ok = isinstance(v, bool) if kind is bool else isinstance(v, kind) and not isinstance(v, bool)
        if not ok:
            want = {bool: "true or false", int: "an integer"}.get(kind, "a number")
            raise UserError(f"{path}: {key} is {json.dumps(v)}, expected {want}")
        return v

    if c.get("model_type") != "llama":
        raise UserError(f"{path}: model_type {c.get('model_type')!r} is not supported (only 'llama')")
    for key, fine, what in UNSUPPORTED:
        if c.get(key) not in fine:
            raise UserError(f"{path}: {key}={json.dumps(c[key])} is not supported ({what})")
    theta = get("rope_theta", (int, float), 10000.0)  # transformers 4's key; 5 writes rope_parameters
    for key in ("rope_scaling", "rope_parameters"):  # 4's scaling, 5's rotary settings
        rope = c.get(key) or {}
        if not isinstance(rope, dict):
            raise UserError(f"{path}: {key}={json.dumps(rope)} is not supported (expected an object)")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise UserError(f"{path}: {key}={json.dumps(rope)} is not supported (rope scaling)" if key == "rope_scaling"
                            else f"{path}: {key}.rope_type={json.dumps(kind)} is not supported (rope scaling; only "
                                 f"'default')")
        extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise UserError(f"{path}: {key}.{extra[0]} is not supported (only rope_type and rope_theta)")
        theta = rope.get("rope_theta", theta)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise UserError(f"{path}: rope_theta is {theta!r}, expected a positive number")
    rows, d, h = get("vocab_size", int, 32000), get("hidden_size", int, 4096), get("num_attention_heads", int, 32)
    layers, ff = get("num_hidden_layers", int, 32), get("intermediate_size", int, 11008)
    if min(rows, d, h, layers, ff) <= 0:
        raise UserError(f"{path}: vocab_size, hidden_size, num_attention_heads, num_hidden_layers and "
                        f"intermediate_size must be positive")
    kv, hd = get("num_key_value_heads", int, h), get("head_dim", int, d // h)
    fields = dict(vocab_size=rows, d_model=d, n_heads=h, n_layers=layers, d_ff=ff, n_kv_heads=0 if kv == h else kv,
                  head_size=0 if hd * h == d else hd, rope_theta=float(theta),
                  norm_eps=float(get("rms_norm_eps", (int, float), 1e-6)),
                  tie_embeddings=get("tie_word_embeddings", bool, False))
    if kv <= 0 or h % kv or hd <= 0 or hd % 2:
        key = "num_key_value_heads" if kv <= 0 or h % kv else "head_dim"
        raise UserError(f"{path}: {key}={c.get(key)} is not supported (key/value heads must divide "
                        f"num_attention_heads; the head size must be even)")
    return fields


def _token_text(v) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: its text, or {"content": text, ...}."""
    v = v.get("content") if isinstance(v, dict) else v
    return v if isinstance(v, str) else None


def read_chat_template(src: str, tc: dict, backend, cfg: dict) -> Optional[ChatTemplate]:
    """The base's own chat template, as transformers finds it (src/chat_template.jinja, else
    tokenizer_config.json's chat_template: a string, or a list holding one named "default"), with
    the special tokens transformers passes it and the stop ids: generation_config.json's
    eos_token_id (an int or a list; without the file, config.json's) and the template's end of
    turn (templates.end_of_turn); None when it has none."""
    jinja, tc_path = os.path.join(src, "chat_template.jinja"), os.path.join(src, "tokenizer_config.json")
    source, origin = tc.get("chat_template"), f"{tc_path}: chat_template"
    if os.path.isfile(jinja):
        source, origin = read_text(jinja), jinja
    elif isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
        if source is None:
            raise UserError(f"{origin}: a list of templates, none named 'default'")
    if source is None:
        return None
    if not isinstance(source, str):
        raise UserError(f"{origin}: expected the template's text, got {json.dumps(source)[:80]}")
    stm = _read_json(os.path.join(src, "special_tokens_map.json"), required=False)
    tokens = {n: _token_text(tc.get(n)) or _token_text(stm.get(n)) for n in templates.TOKEN_NAMES}
    gen_path = os.path.join(src, "generation_config.json")
    gen = _read_json(gen_path, required=False)
    t = ChatTemplate(source, origin, {n: v for n, v in tokens.items() if v}, (), gen)
    suffix = templates.end_of_turn(t)
    eot = backend.encode(suffix, add_special_tokens=False).ids
    if len(eot) != 1:
        raise UserError(f"{origin}: the template ends an answer with {suffix!r}, {len(eot)} tokens of "
                        f"tokenizer.json; jaxsft stops generating at one token")
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
        raise UserError(f"{gen_path if 'eos_token_id' in gen else os.path.join(src, 'config.json')}: eos_token_id "
                        f"is {json.dumps(eos)}, expected a token id or a list of them")
    return dataclasses.replace(t, stop_ids=tuple(dict.fromkeys(eos + eot)))


def read_tokenizer(src: str, n_rows: int, chat_template: Optional[str] = None) -> HFTokenizer:
    """src/tokenizer.json as it is, rendering with the base's own chat template (read_chat_template;
    data.chat_template null or "base": "base" without one is a UserError); or with our ChatML markers
    added ("chatml", a base without a template, or by default one whose vocabulary holds our markers: an
    export of a jaxsft ChatML run). bos, pad and eos are the model's own where its
    tokenizer_config.json (or config.json's ids) names them (pad: else eos; eos: else the template's
    end of turn)."""
    from tokenizers import Tokenizer as Backend
    path = os.path.join(src, "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found (jaxsft reads a Llama-format model's tokenizer from tokenizer.json)")
    try:
        backend = Backend.from_file(path)
    except Exception as e:  # the library raises a bare Exception for a malformed file
        raise UserError(f"{path}: not a tokenizers file ({str(e).splitlines()[0][:200]})") from None
    tc = _read_json(os.path.join(src, "tokenizer_config.json"), required=False)
    cfg = _read_json(os.path.join(src, "config.json"))

    def token(name):
        v = _token_text(tc.get(f"{name}_token"))
        if v is not None and backend.token_to_id(v) is not None:
            return v
        i = cfg.get(f"{name}_token_id")
        return backend.id_to_token(i) if isinstance(i, int) and not isinstance(i, bool) else None

    # an export of a jaxsft ChatML run has our markers (and a template writing them): ChatML, as it was trained
    ours = all(backend.token_to_id(m) is not None for m in (SYSTEM, USER, ASSISTANT, END))
    chat_template = chat_template or ("chatml" if ours else None)
    template = None if chat_template == "chatml" else read_chat_template(src, tc, backend, cfg)
    if template is None:
        if chat_template == "base":
            raise UserError(f"data.chat_template: base, but {src} has no chat template (no chat_template.jinja, "
                            f"no chat_template in tokenizer_config.json)")
        return HFTokenizer.wrap(backend, bos=token("bos"), pad=token("pad"), size=n_rows)
    end = token("eos") or backend.id_to_token(template.stop_ids[-1])  # (the end of turn, or an eos id)
    markers = {"bos": token("bos"), "end": end, "pad": token("pad") or end}
    return HFTokenizer(backend, {k: v for k, v in markers.items() if v}, n_rows, template)


def _weight_files(src: str) -> dict:
    """transformers name -> the safetensors file holding it."""
    from safetensors import safe_open
    index = os.path.join(src, "model.safetensors.index.json")
    single = os.path.join(src, "model.safetensors")
    if os.path.isfile(index):
        wm = _read_json(index).get("weight_map")
        if not isinstance(wm, dict):
            raise UserError(f"{index}: weight_map is missing")
        return {k: os.path.join(src, v) for k, v in wm.items()}
    if not os.path.isfile(single):
        raise UserError(f"{single}: not found (nor model.safetensors.index.json)")
    try:
        with safe_open(single, framework="np") as f:
            return {k: single for k in f.keys()}
    except Exception as e:  # safetensors' own error type
        raise UserError(f"{single}: not a safetensors file ({str(e).splitlines()[0][:200]})") from None


def read_params(src: str, mc: ModelConfig):
    """The parameters of the Llama-format model in `src` as float32 jax arrays (on the first
    device) in jaxsft's tree for `mc` (its vocab_size = the checkpoint's rows). Not numpy: a
    LoRA run's frozen base is then these very arrays, not a copy beside them (Setup.base keeps
    them for the whole run). Every tensor's presence, shape and
    dtype is checked before any is read."""
    import ml_dtypes  # noqa: F401  numpy's bfloat16, which safetensors' numpy reader needs
    from safetensors import safe_open
    from . import model
    files = _weight_files(src)
    names = _names(mc)
    _, abstract = model.abstract(mc)
    wanted = {}
    for path, a in jax.tree_util.tree_leaves_with_path(abstract):
        name, transposed = names[_path(path)]
        wanted[name] = (tuple(a.shape[::-1]) if transposed else tuple(a.shape), transposed)
    handles = {}
    try:
        for name, (shape, _) in wanted.items():
            file = files.get(name)
            if file is None:
                raise UserError(f"{os.path.join(src, 'model.safetensors')}: missing tensor {name}")
            if file not in handles:
                if not os.path.isfile(file):
                    raise UserError(f"{file}: not found (listed in model.safetensors.index.json)")
                handles[file] = safe_open(file, framework="np")
            sl = handles[file].get_slice(name)
            got, dtype = tuple(sl.get_shape()), sl.get_dtype()
            if got != shape:
                raise UserError(f"{file}: {name} has shape {list(got)}, config.json needs {list(shape)}")
            if dtype not in DTYPES:
                raise UserError(f"{file}: {name} has dtype {dtype} (jaxsft reads F32, BF16 and F16)")
        arrays = {}
        for name, (shape, transposed) in wanted.items():  # one tensor at a time on the host
            a = handles[files[name]].get_tensor(name).astype(np.float32, copy=False)
            arrays[name] = jax.device_put(np.ascontiguousarray(a.T) if transposed else a)
    finally:
        handles.clear()
    return jax.tree_util.tree_map_with_path(lambda p, _: arrays[names[_path(p)][0]], abstract)
