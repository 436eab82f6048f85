"""A run directory as a whole: restoring its model, the base a run starts from
(model.init_from) and the one a LoRA run's adapters belong to, and exporting it.

A run directory (checkpoint.py stores its files):

    config.json, tokenizer.json, best/, latest/   every run (tokenizer.json also keeps a base's own
                     chat template, its stop ids and the base's generation_config.json: templates.py)
    lora_base.json   a LoRA run (lora.py) only: best/ and latest/ hold its adapters, and this names
                     its base (model.init_from, as given and absolute), the base's vocabulary
                     size and a fingerprint of the base's arrays, checked whenever the adapters
                     are put back on it

Scripts restore a usable model in one call:

    params, model_cfg, tok = jaxsft.runs.restore("runs/default")

A base (model.init_from) is a jaxsft run, restored as above (a LoRA run on its own base, and so
on down), or a Llama-format directory (hf.py), whose config.json then also sets the model's
architecture (`with_base_architecture`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, hf, lora, model
from .config import (DEFAULT_SYSTEM_PROMPT, Config, ModelConfig, TrainConfig, UserError, lora_config_from_dict,
                     model_config_from_dict)
from .files import write_json
from .tokenizer import AnyTokenizer

BASE_REF = "lora_base.json"
# the model keys a base run and the config fine-tuning it must agree on
ARCHITECTURE = ("d_model", "n_heads", "n_layers", "d_ff", "n_kv_heads", "head_size", "rope_theta", "norm_eps",
                "tie_embeddings", "family", "attn_bias", "qk_norm", "rope_type", "rope_factor", "rope_low_freq_factor",
                "rope_high_freq_factor", "rope_original_max_len")


# restoring a run


def restore(run_dir: str, shardings=None):
    """(params, model_cfg, tokenizer): the best parameters of a run (of a LoRA run: its base
    with the best adapters merged in).

    shardings: a pytree of jax Shardings shaped like the parameters (e.g.
    parallel.param_shardings(params, mesh)) to restore onto a mesh; by default
    every array lands on this process's first device. Either way the run may
    have been saved on any number of devices.
    """
    cfg_dict, tok = checkpoint.read_meta(run_dir)
    model_cfg = model_config_from_dict(cfg_dict["model"])
    if model_cfg.vocab_size != len(tok):
        raise UserError(f"{run_dir}: config vocab_size {model_cfg.vocab_size} != tokenizer size {len(tok)}")
    if lora_config_from_dict(cfg_dict.get("lora")).rank > 0:  # adapters on a base model
        return _restore_lora(run_dir, shardings), model_cfg, tok
    _, abstract = model.abstract(model_cfg)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = checkpoint.restore_params(os.path.join(run_dir, "best"), abstract, "the best checkpoint")
    return params, model_cfg, tok


def _restore_lora(run_dir: str, shardings=None):
    """The plain parameters (base + adapters merged) of a LoRA run's best checkpoint: the base
    rebuilt as training began (its arrays, the embedding grown to the run's vocabulary),
    checked against lora_base.json, and the best adapters folded in."""
    base, adapters, _, _, lc = restore_parts(run_dir)
    params = jax.jit(lora.merge, static_argnums=2)(base, adapters, lc)
    if shardings is not None:
        params = jax.device_put(params, shardings)
    return params


def restore_parts(run_dir: str):
    """(base, adapters, model_cfg, tokenizer, lora config) of a LoRA run's best checkpoint, unmerged:
    what an exporter writes as a base model plus a PEFT adapter. The base is float32 as training
    saw it: with lora.base_dtype int8 or int4, its kernels quantised and dequantised (lora.as_trained)."""
    cfg_dict, tok = checkpoint.read_meta(run_dir)
    lc = lora_config_from_dict(cfg_dict.get("lora"))
    if lc.rank <= 0:
        raise UserError(f"{run_dir}: not a LoRA run (its config has no lora.rank)")
    mc = model_config_from_dict(cfg_dict["model"])
    base_params, n_old = lora_base(run_dir, mc)
    _, base = init_params_from(mc, cfg_dict.get("train", {}).get("seed", 0), (base_params, n_old))
    del base_params
    base = lora.as_trained(base, lc)
    abstract = lora.abstract_adapters(mc, lc, n_old)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    adapters = checkpoint.restore_params(os.path.join(run_dir, "best"), abstract, "the best checkpoint")
    return base, adapters, mc, tok, lc


# the base a run starts from (model.init_from)


def is_llama_base(cfg: Config) -> bool:
    """Whether model.init_from is a Llama-format directory (else a jaxsft run, or nothing)."""
    src = cfg.model.init_from
    if not src:
        return False
    if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "config.json")):
        raise UserError(f"model.init_from: {os.path.join(src, 'config.json')}: not found (expected a jaxsft run "
                        f"or a Llama-format directory: config.json, model.safetensors, tokenizer.json)")
    return hf.is_llama_dir(src)


def with_base_architecture(cfg: Config) -> Config:
    """cfg whose model architecture is that of a Llama-format model.init_from (its
    config.json's keys replace the config's; max_seq_len and dropout stay the config's)."""
    if not is_llama_base(cfg):
        return cfg
    fields = hf.model_fields(cfg.model.init_from)
    fields.pop("vocab_size")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields))


def base_tokenizer(cfg: Config, texts: list[str]) -> AnyTokenizer:
    """The vocabulary of a run from model.init_from trained on `texts` (reads no weights): a jaxsft
    run's tokenizer with the new characters appended in sorted order (old ids keep their meaning;
    the same texts always give the same vocabulary, so a resumed run rebuilds it identically), the
    base's model shape checked against this config's; a Llama-format directory's tokenizer.json
    with its own chat template, or the ChatML markers it lacks (data.chat_template, hf.read_tokenizer).
    A jaxsft run's base keeps its format: ChatML, or the template it was trained on."""
    src = cfg.model.init_from
    if is_llama_base(cfg):
        return hf.read_tokenizer(src, hf.model_fields(src)["vocab_size"], cfg.data.chat_template)
    base_cfg, base_tok = checkpoint.read_meta(src)
    has = "base" if base_tok.template is not None else "chatml"
    if cfg.data.chat_template not in (None, has):
        trained = "on its own base's chat template" if has == "base" else "in ChatML"
        raise UserError(f"data.chat_template: {cfg.data.chat_template}, but model.init_from {src} is a jaxsft run "
                        f"trained {trained}; a run keeps its base's format")
    base = model_config_from_dict(base_cfg["model"])
    for f in ARCHITECTURE:
        if getattr(base, f) != getattr(cfg.model, f):
            raise UserError(f"model.init_from: {src} has {f}={getattr(base, f)}, "
                            f"this config has {getattr(cfg.model, f)}")
    system = DEFAULT_SYSTEM_PROMPT if cfg.data.system_prompt is None else cfg.data.system_prompt
    return base_tok.extend(list(texts) + [system])


def load_base(src: str, mc: ModelConfig):
    """(parameters, vocabulary size) of model.init_from `src`: a jaxsft run's best parameters,
    or a Llama-format directory's weights (mc: the architecture, as with_base_architecture gives)."""
    if hf.is_llama_dir(src):
        rows = hf.model_fields(src)["vocab_size"]
        return hf.read_params(src, dataclasses.replace(mc, vocab_size=rows)), rows
    base_params, _, base_tok = restore(src)
    return base_params, len(base_tok)


def init_params_from(model_cfg: ModelConfig, seed: int, base=None):
    """Fresh parameters, or a pretrained model's with its embedding grown to the new vocabulary:
    every array is the base's, except that the embedding (n_old rows) gains the fresh rows
    n_old.. for the tokens appended to the base's vocabulary (and an untied output head
    (D, n_old) the fresh columns). base: (params, n_old) or None."""
    graphdef, params = model.init(model_cfg, seed)
    if base is not None:
        base_params, n_old = base

        def from_base(fresh, old):
            if fresh.shape == old.shape:
                return old
            axis = 0 if fresh.shape[1:] == old.shape[1:] else 1  # the embedding's rows, the head's columns
            assert old.shape[axis] == n_old and fresh.ndim == 2, (fresh.shape, old.shape)
            return jnp.concatenate([old, jax.lax.slice_in_dim(fresh, n_old, None, axis=axis)], axis=axis)

        params = jax.tree.map(from_base, params, base_params)  # a new tree: the arrays' shapes may change
    return graphdef, params


def reference_params(run_dir: str):
    """The parameters a DPO run (train.objective dpo) is measured against: its starting model,
    rebuilt exactly as training began: model.init_from (a LoRA run's base as lora_base.json names
    it, checked against its fingerprint: the base with the adapters off, its kernels as
    lora.base_dtype stored them) with the embedding rows of the characters the base lacked
    initialised from the run's train.seed (`init_params_from`).
    None for any other run (SFT, or a config.json older than train.objective): it is its own
    reference."""
    cfg_dict, _ = checkpoint.read_meta(run_dir)
    train = cfg_dict.get("train", {})
    if train.get("objective", "sft") != "dpo":
        return None
    mc = model_config_from_dict(cfg_dict["model"])
    lc = lora_config_from_dict(cfg_dict.get("lora"))
    seed = train.get("seed", TrainConfig.seed)
    if lc.rank > 0:  # the base with the adapters off, as training saw it (lora.base_dtype)
        return lora.as_trained(init_params_from(mc, seed, lora_base(run_dir, mc))[1], lc)
    src = cfg_dict["model"].get("init_from")
    if not src or not os.path.exists(src):
        raise UserError(f"{run_dir}: its starting model (model.init_from {src}) is missing; a DPO run is "
                        f"measured against it")
    return init_params_from(mc, seed, load_base(src, mc))[1]


# the base a LoRA run's adapters belong to


def write_meta(run_dir: str, cfg: Config, tok: AnyTokenizer, base=None) -> None:
    """A new run's config.json and tokenizer.json, and a LoRA run's lora_base.json (process 0).
    base: (its parameters, its vocabulary size), as Setup.base."""
    checkpoint.write_meta(run_dir, cfg, tok)
    if lora.enabled(cfg):
        write_base_ref(run_dir, cfg, base)


def verify_base(run_dir: str, cfg: Config, base=None) -> None:
    """On --resume: UserError when a LoRA run's base has changed since its adapters were trained
    (other runs hold every parameter: nothing to check)."""
    if lora.enabled(cfg):
        check_base(run_dir, base[0])


def fingerprint(params) -> str:
    """sha256 over every array of a parameter tree (path, dtype, shape and bytes)."""
    h = hashlib.sha256()
    for path, a in jax.tree_util.tree_leaves_with_path(params):
        a = np.asarray(a)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_base_ref(run_dir: str, cfg: Config, base) -> None:
    """lora_base.json: model.init_from (as given and absolute), the base's vocabulary size and
    the fingerprint of its arrays. base: (its parameters, its vocabulary size), as Setup.base."""
    params, n_old = base
    write_json(os.path.join(run_dir, BASE_REF), {
        "init_from": cfg.model.init_from, "path": os.path.abspath(cfg.model.init_from), "vocab_size": n_old,
        "sha256": fingerprint(params)}, indent=2)


def read_base_ref(run_dir: str) -> dict:
    path = os.path.join(run_dir, BASE_REF)
    try:
        with open(path, encoding="utf-8") as f:
            ref = json.load(f)
        return {k: ref[k] for k in ("init_from", "path", "vocab_size", "sha256")}
    except FileNotFoundError:
        raise UserError(f"{run_dir}: a LoRA run without {BASE_REF} (the reference to its base)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


def lora_base(run_dir: str, mc: ModelConfig):
    """(parameters, vocabulary size) of the base a LoRA run's adapters belong to, as lora_base.json
    names it, checked against its fingerprint."""
    ref = read_base_ref(run_dir)
    base = load_base(base_source(run_dir, ref), mc)
    check_base(run_dir, base[0], ref)
    return base


def check_base(run_dir: str, base_params, ref: dict | None = None) -> None:
    """UserError when the base loaded now is not the one the run's adapters were trained on."""
    ref = read_base_ref(run_dir) if ref is None else ref
    if fingerprint(base_params) != ref["sha256"]:
        raise UserError(f"{run_dir}: its base {ref['init_from']} has changed since the adapters were trained "
                        f"(its arrays' sha256 differs from {BASE_REF}); train the adapters again on it")


def base_source(run_dir: str, ref: dict) -> str:
    """Where the base is now: the absolute path recorded, else model.init_from as given."""
    for p in (ref["path"], ref["init_from"]):
        if p and os.path.exists(p):
            return p
    raise UserError(f"{run_dir}: its base model {ref['path']} (model.init_from) is missing; a LoRA run holds "
                    f"its adapters only")


# export


def export(run_dir: str, out_dir: str, dtype: str = "float32", adapter: bool = False) -> list[str]:
    """Writes the best checkpoint of `run_dir` as a Llama-format directory `out_dir` (which
    must not exist or be empty; hf.write_llama); returns the files written. The directory is
    assembled beside `out_dir` and renamed into place, so a failure leaves nothing behind.

    A LoRA run (lora.py) is written merged (W + (alpha/r) A B). With adapter=True it is written
    unmerged instead: out_dir/base/ the Llama-format base (the embedding rows of the run's new
    characters as they started) and out_dir/adapter/ the best adapters in PEFT's format
    (adapter_config.json + adapter_model.safetensors), for
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("out_dir/base"), "out_dir/adapter")."""
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype}: expected float32 or bfloat16")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"{out_dir}: already exists and is not an empty directory")
    system_prompt = checkpoint.read_meta(run_dir)[0].get("data", {}).get("system_prompt") or ""
    if adapter:
        base, adapters, mc, tok, lc = restore_parts(run_dir)
    else:
        params, mc, tok = restore(run_dir)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        if adapter:
            hf.write_llama(os.path.join(tmp, "base"), base, mc, tok, system_prompt, dtype)
            lora.save_peft(os.path.join(tmp, "adapter"), adapters, lc, mc.vocab_size,
                           base_model=os.path.join(os.path.abspath(out_dir), "base"))
        else:
            hf.write_llama(tmp, params, mc, tok, system_prompt, dtype)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(os.path.relpath(os.path.join(r, n), out_dir) for r, _, names in os.walk(out_dir) for n in names)
