"""Configuration: dataclasses with the seed's defaults, YAML loading, dotted
`--set key=value` overrides, and validation that names the file, line and key.

A config file has four parts (see configs/default.yaml):

    model:   d_model, n_heads, n_layers, d_ff, max_seq_len, dropout, init_from
             (and n_kv_heads, head_size, rope_theta, norm_eps, tie_embeddings: Llama's options;
             family, attn_bias, qk_norm, rope_type and rope_*: the families, FAMILIES)
    data:    train, val, test, format, columns, system_prompt, chat_template, corpus
    train:   batch_size, epochs, max_steps, lr, weight_decay, warmup_steps, ...
    out_dir: where the run writes checkpoints, metrics.jsonl, tensorboard/ and curves.png

and optionally `mesh` (devices), `lora` (adapters on a frozen model.init_from) and `dpo`
(preference tuning, train.objective: dpo).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

DEFAULT_SYSTEM_PROMPT = "你是一个有帮助的AI助手。"


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2."""


@dataclass(frozen=True)
class ModelConfig:
    # vocabulary size; filled in from the tokenizer, not set by hand
    vocab_size: int = 0
    # longest token sequence the model is trained on (the seed pads every row to it)
    max_seq_len: int = 256
    # width of the residual stream and of each token's embedding
    d_model: int = 384
    # attention (query) heads per layer
    n_heads: int = 6
    # transformer blocks (attention + SwiGLU)
    n_layers: int = 6
    # SwiGLU hidden width
    d_ff: int = 1536
    # dropout rate on the embedding and on each attention and SwiGLU output, in training only
    dropout: float = 0.1
    # start from a pretrained model: a jaxsft run directory (its best parameters and tokenizer) or a
    # Llama-format directory (config.json, model.safetensors, tokenizer.json), whose config.json then
    # sets every architecture key below
    init_from: Optional[str] = None
    # key/value heads (grouped-query attention; 0: n_heads, plain multi-head attention)
    n_kv_heads: int = 0
    # size of one attention head (0: d_model / n_heads)
    head_size: int = 0
    # rotary embedding base
    rope_theta: float = 10000.0
    # RMSNorm epsilon
    norm_eps: float = 1e-5
    # the output head is the token embedding (true), or a matrix of its own
    tie_embeddings: bool = True
    # the model family, transformers' model_type: llama, mistral, qwen2 or qwen3 (FAMILIES); bin/export
    # writes that family's class, so the features below must be ones it has
    family: str = "llama"
    # attention projection biases: none, qkv (query, key and value: Qwen2) or all (and the output
    # projection: Qwen3's attention_bias)
    attn_bias: str = "none"
    # RMSNorm over each head's queries and keys before the rotary embedding (Qwen3's q_norm, k_norm)
    qk_norm: bool = False
    # rotary frequencies theta^(-2i/K) as they are (default), all divided by rope_factor (linear), or
    # Llama 3.1's scaling (llama3): the low ones divided by rope_factor, the high ones kept, between them
    # a smooth mix (ops.rope_freqs)
    rope_type: str = "default"
    # linear and llama3: what the (low) frequencies are divided by
    rope_factor: float = 1.0
    # llama3: wavelengths above rope_original_max_len / rope_low_freq_factor are divided by rope_factor
    rope_low_freq_factor: float = 1.0
    # llama3: wavelengths below rope_original_max_len / rope_high_freq_factor are kept as they are
    rope_high_freq_factor: float = 4.0
    # llama3: the context length the model was pretrained with (original_max_position_embeddings)
    rope_original_max_len: int = 8192
    # how training computes attention (the same function; decoding always runs full): full (each
    # layer's (batch, heads, T, T) score matrix, whole), blockwise (tiles of 512 queries x 512 keys
    # with a running softmax, skipping tiles no query sees: within 1e-5 of full), cudnn (a GPU only:
    # cuDNN's fused attention, bfloat16 operands), or auto: cudnn on a GPU with train.dtype bfloat16,
    # else blockwise from 1,024 keys (a row and its shared prefix) on, else full
    attention: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def rope_scaling(self) -> tuple:
        """ops.rotary's scaling: () by default, (linear, factor) or (llama3, factor, low, high, original)."""
        if self.rope_type == "linear":
            return ("linear", self.rope_factor)
        if self.rope_type == "llama3":
            return ("llama3", self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                    self.rope_original_max_len)
        return ()


# the model families: each is the Llama core plus named features (ModelConfig's attn_bias, qk_norm), and
# the values of those features its transformers class can hold. family -> (class, attn_bias values, qk_norm)
FAMILIES = {
    "llama": ("LlamaForCausalLM", ("none",), False),
    "mistral": ("MistralForCausalLM", ("none",), False),
    "qwen2": ("Qwen2ForCausalLM", ("qkv",), False),
    "qwen3": ("Qwen3ForCausalLM", ("none", "all"), True),
}
ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION = ("auto", "full", "blockwise", "cudnn")
REMAT = ("none", "block", "dots")
ATTN_BIAS = ("none", "qkv", "all")


# data.format's row forms (rowforms.py) and the fields data.columns may rename
ROW_FORMS = ("jaxsft", "openai", "alpaca", "sharegpt", "completion")
ROW_FIELDS = ("instruction", "response", "input", "output", "messages", "conversations", "role", "content", "from",
              "value", "prompt", "completion", "system", "category", "expected", "chosen", "rejected")


@dataclass(frozen=True)
class DataConfig:
    # training rows: a file, a glob, a list of them or a datasets save_to_disk directory; JSON Lines
    # (.jsonl, or any other name), .json, .parquet, .csv or .arrow; rows of any form data.format names
    train: str | tuple[str, ...] = "data/train.jsonl"
    # validation rows (as train): their loss picks the best checkpoint (eval_exact decodes some of them)
    val: str | tuple[str, ...] = "data/val.jsonl"
    # held-out rows (as train) bin/train answers with the best checkpoint after training, scored per
    # category into test_report.json (null: none)
    test: Optional[str | tuple[str, ...]] = "data/test.jsonl"
    # the rows' form: jaxsft (instruction/response or messages), openai (messages), alpaca
    # (instruction/input/output), sharegpt (conversations of from/value), completion (prompt/completion);
    # null: each file's, from its first row's fields. Preference pairs (dpo) have their own forms
    format: Optional[str] = None
    # field names of the rows that differ from the form's: {our name: theirs}, e.g. {instruction: question,
    # response: answer}; also the keys inside messages (role, content, from, value)
    columns: dict[str, str] = field(default_factory=dict)
    # the system message of every row that has none of its own (empty: no system turn; null: the
    # format's default, ChatML's DEFAULT_SYSTEM_PROMPT, none with a base's own template, which then
    # does what it does without one); the run keeps it, so bin/chat, bin/eval, bin/serve and the
    # export's chat template use it too
    system_prompt: Optional[str] = None
    # how rows are rendered: base (the chat template of a Llama-format model.init_from, from its
    # tokenizer_config.json or chat_template.jinja) or chatml (jaxsft's markers, added to its
    # vocabulary); null: base when model.init_from has a template, chatml otherwise
    chat_template: Optional[str] = None
    # plain text for pretraining (bin/pretrain): a directory of *.txt files or one file, one
    # paragraph per line; when set, the run trains on next-token loss over it and train/val are unused
    corpus: Optional[str] = None


@dataclass(frozen=True)
class TrainConfig:
    # rows per optimizer step (the seed's meaning of batch size)
    batch_size: int = 8
    # passes over the training rows; null: as many as max_steps takes (a step budget, whatever
    # the data set's size)
    epochs: Optional[int] = 5
    # optional cap on optimizer steps; the schedule is laid out over the capped length
    max_steps: Optional[int] = None
    # peak learning rate: reached after warmup_steps, then cosine decay to 0 at the last step
    lr: float = 5e-5
    # AdamW's decoupled weight decay, on every trained parameter
    weight_decay: float = 0.01
    # steps of linear warmup from 0 to lr
    warmup_steps: int = 20
    # clip the gradient's global norm to this (0: no clipping)
    max_grad_norm: float = 1.0
    # seeds the parameters' initialisation, the data order and dropout
    seed: int = 42
    # validate every N steps (0: only at the end of each epoch)
    eval_every: int = 0
    # save the full training state for --resume every N steps (0: only at evaluations) ...
    save_every: int = 0
    # ... and at least every N seconds of training, so a kill loses at most about that (0: off)
    save_every_s: int = 60
    # split each batch into k micro-batches whose gradients are summed by token count
    grad_accum_steps: int = 1
    # the products' operand dtype: float32, bfloat16 (autocast: float32 accumulation; parameters,
    # activations, gradients and optimizer state stay float32; docs/distributed.md), or auto:
    # bfloat16 where the hardware multiplies it natively (a GPU from Ampere on, a TPU, a CPU with
    # AMX), float32 elsewhere (ops.choose_dtype); the run's first lines and config.json say which
    dtype: str = "auto"
    # rematerialisation: none (the backward pass reads every activation the forward pass kept), block
    # (each transformer block keeps only its input and runs its forward pass again in the backward
    # pass: about a third more compute, a fraction of the memory), or dots (block, also keeping its
    # matrix products' outputs); the same losses and gradients, bit for bit
    remat: str = "none"
    # the output head's cross-entropy this many answer positions at a time (jaxsft/head.py): each
    # chunk's logits formed and dropped, and formed again in the backward pass, so the (positions,
    # vocabulary) logits and their gradient are never all held (Qwen2.5-0.5B's vocabulary at 1,024
    # positions: the head's temporaries 1.19 GB whole, 0.15 GB chunked). Only where the logits are
    # large (head.MIN_LOGITS: 16M elements) and span more than one chunk; 0: off, the head whole.
    # The same loss within float rounding
    head_chunk: int = 256
    # greedy answers to this many validation questions are printed at each evaluation
    sample_questions: int = 3
    # per-row sequence lengths a batch is padded to (each compiles once); capped by max_seq_len
    buckets: tuple = (32, 64, 96, 128, 192, 256)
    # > 0: pack each step's rows into rows of this many tokens (fewer pad tokens; the
    # number of packed rows varies, each count compiles once); 0: one padded row per example
    pack_len: int = 0
    # with pack_len: compute the system prompt that starts most rows once per batch
    # instead of once per row (the same loss and gradients, ~30% fewer tokens on data/)
    share_prefix: bool = True
    # at each evaluation, greedy-decode this many validation rows and log their exact match (0: off)
    eval_exact: int = 0
    # a curriculum: the first focus_steps steps draw their rows only from the training rows
    # whose category is one of focus_categories, then the run goes through the whole set as
    # usual (max_steps caps both together). For a skill that forms late, e.g. copying a
    # string, while the learning rate is high; [] / 0: off
    focus_categories: tuple[str, ...] = ()
    # the curriculum's length in steps (0: off)
    focus_steps: int = 0
    # what the run minimises: sft (cross-entropy on the answers of data rows) or dpo (preference
    # pairs {prompt, chosen, rejected}: the dpo section's loss against the model.init_from start)
    objective: str = "sft"
    # also write every number of metrics.jsonl as TensorBoard events, at its step, and the config
    # as text, under out_dir/tensorboard/ (`tensorboard --logdir runs/` shows every run); false: off
    tensorboard: bool = True


@dataclass(frozen=True)
class DpoConfig:
    # the implicit reward's scale: reward = beta * (log p(answer) - log p_reference(answer))
    beta: float = 0.1
    # sigmoid: -log sigmoid(beta * h), h the chosen answer's log-ratio minus the rejected one's
    # (Rafailov et al. 2023); ipo: (h - 1 / (2 beta))^2 with log-probs averaged per token (Azar et al.)
    loss: str = "sigmoid"
    # sigmoid only: the probability that a pair's labels are swapped (conservative DPO); 0: off
    label_smoothing: float = 0.0
    # > 0: adds sft_weight x the chosen answer's per-token negative log-likelihood to each pair's
    # loss (RPO, Pang et al. 2024; TRL's rpo_alpha): DPO alone may push the rejected answer down
    # without making the chosen one what the model writes; 0: plain DPO
    sft_weight: float = 0.0


@dataclass(frozen=True)
class MeshConfig:
    # devices on the data-parallel axis (0: all devices not on fsdp)
    data: int = 0
    # devices that parameters and optimizer state are sharded over
    fsdp: int = 1
    # multi-host: the coordinator's "host:port" (null: JAX_COORDINATOR_ADDRESS, else one host)
    coordinator: Optional[str] = None
    # multi-host: the number of processes (null: JAX_NUM_PROCESSES, else JAX detects it)
    num_processes: Optional[int] = None
    # multi-host: this process's id in [0, num_processes) (null: JAX_PROCESS_ID, else detected)
    process_id: Optional[int] = None


# LoRA's projection names, in layer order, and transformers' Llama module names for them
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
            "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


LORA_BASE_DTYPES = ("float32", "bfloat16", "int8", "int4")  # quant.py


def target_names(names) -> tuple[str, ...]:
    """lora.targets (ours or transformers' names) -> our names in TARGETS order; ValueError naming
    the first unknown one."""
    alias = {v: k for k, v in HF_NAMES.items()}
    chosen = set()
    for n in names:
        if n not in TARGETS and n not in alias:
            raise ValueError(f"unknown projection {n!r} (known: {', '.join(TARGETS)}, or transformers' "
                             f"{', '.join(HF_NAMES.values())})")
        chosen.add(alias.get(n, n))
    return tuple(t for t in TARGETS if t in chosen)


@dataclass(frozen=True)
class LoraConfig:
    # adapter rank r; 0: off (every parameter trains). > 0: the model.init_from base is frozen and
    # only the adapters A (in, r), B (r, out) of the targeted projections train (jaxsft/lora.py)
    rank: int = 0
    # the adapter's output is scaled by alpha / rank
    alpha: float = 16.0
    # dropout on an adapter's input: only 0 is supported (adapters are added outside the model
    # code, which gets no dropout key); model.dropout still applies to the whole network
    dropout: float = 0.0
    # the projections that get adapters: attention wq wk wv wo, SwiGLU w1 w3 w2 (or transformers'
    # names q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
    # how the frozen base's projection kernels (all seven, adapted or not) are held in memory
    # (QLoRA; jaxsft/quant.py): float32 as loaded; bfloat16; int8 (per output channel scales);
    # int4 (packed two a byte, a scale per 64 input rows). Widened to float32 where each is used,
    # inside the step; the embedding, norms, biases, the adapters and their optimizer state stay
    # float32. Exports and evaluation see the dequantised base plus the adapters
    base_dtype: str = "float32"


@dataclass(frozen=True)
class Config:
    # the network's shape and where it starts from
    model: ModelConfig = field(default_factory=ModelConfig)
    # the rows (or corpus) trained, validated and tested on
    data: DataConfig = field(default_factory=DataConfig)
    # optimizer, schedule, batching and evaluation
    train: TrainConfig = field(default_factory=TrainConfig)
    # devices: data-parallel and FSDP axes, multi-host start-up
    mesh: MeshConfig = field(default_factory=MeshConfig)
    # LoRA adapters on a frozen model.init_from (off at rank 0)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # preference tuning (train.objective: dpo)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    # the run directory: config.json, tokenizer.json, best/, latest/, metrics.jsonl, tensorboard/, curves.png
    out_dir: str = "runs/default"


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mesh": MeshConfig, "lora": LoraConfig,
            "dpo": DpoConfig}


def read_text(path: str) -> str:
    """A UTF-8 file's text (a leading BOM dropped), or UserError naming the line of a bad byte."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x})") from None


def _key_lines(path: str, text: str) -> dict:
    """Maps 'section.key' to its 1-based line in the YAML text (for error messages)."""
    lines = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if not isinstance(node, yaml.MappingNode):
        return lines
    for k, v in node.value:
        lines[k.value] = k.start_mark.line + 1
        if isinstance(v, yaml.MappingNode):
            for k2, _ in v.value:
                lines[f"{k.value}.{k2.value}"] = k2.start_mark.line + 1
    return lines


def _field_types(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, default: Any, where: str, ftype: str):
    """Checks `value` against the field's declared type; returns the typed value."""
    optional = ftype.startswith("Optional[")
    t = ftype[len("Optional["):-1] if optional else ftype
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: must not be empty (expected {t})")
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if t == "float":
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if t == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if t == "str":
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    if t == "tuple[str, ...]":  # a bare string is a list of one
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if t == "str | tuple[str, ...]":  # a path, or a list of them
        if isinstance(value, str):
            return value
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where}: expected a path or a non-empty list of paths, got {value!r}")
        return tuple(value)
    if t == "dict[str, str]":
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise UserError(f"{where}: expected a mapping of field names to names, got {value!r}")
        return dict(value)
    if t == "tuple":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"{where}: expected a list of integers, got {value!r}")
        return tuple(value)
    raise AssertionError(f"unhandled type {ftype}")


def _parse_override(item: str):
    if "=" not in item:
        raise UserError(f"--set {item}: expected key=value, e.g. train.max_steps=20")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _read_yaml(path: str) -> tuple[dict, dict]:
    """(the file's sections, {dotted key: line}); UserError naming the file (and line) when it is
    missing, not YAML, or not a mapping."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found")
    text = read_text(path)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with sections model, data, train, out_dir")
    return raw, _key_lines(path, text)


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """Reads a YAML config (or the defaults when `path` is None), applies
    `section.key=value` overrides and validates the result.

    Raises UserError naming the file, line and key for any mistake.
    """
    raw, lines = _read_yaml(path) if path is not None else ({}, {})
    src = path or "<defaults>"

    overridden = set()  # keys set by --set: a range error names the override, not the file's line

    def where(key):
        if key in overridden:
            return f"--set {key}"
        return f"{src}:{lines[key]}: {key}" if key in lines else f"{src}: {key}"

    values = {name: {} for name in SECTIONS}
    out_dir = Config.out_dir
    for sec, body in raw.items():
        if sec == "out_dir":
            out_dir = _coerce(body, out_dir, where("out_dir"), "str")
            continue
        if sec not in SECTIONS:
            raise UserError(f"{where(sec)}: unknown section (expected one of model, data, train, mesh, lora, dpo, out_dir)")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise UserError(f"{where(sec)}: expected a mapping of keys")
        fields = _field_types(SECTIONS[sec])
        for k, v in body.items():
            key = f"{sec}.{k}"
            if k not in fields or k == "vocab_size":
                raise UserError(f"{where(key)}: unknown key (known: {', '.join(n for n in fields if n != 'vocab_size')})")
            values[sec][k] = _coerce(v, fields[k].default, where(key), str(fields[k].type))

    for item in overrides:
        key, v = _parse_override(item)
        overridden.add(key)
        if key == "out_dir":
            out_dir = _coerce(v, out_dir, "--set out_dir", "str")
            continue
        sec, _, k = key.partition(".")
        if sec not in SECTIONS or not k:
            raise UserError(f"--set {key}: no such key (sections: model, data, train, mesh, lora, dpo, out_dir)")
        fields = _field_types(SECTIONS[sec])
        if k not in fields or k == "vocab_size":
            raise UserError(f"--set {key}: no such key in section {sec}")
        values[sec][k] = _coerce(v, fields[k].default, f"--set {key}", str(fields[k].type))

    cfg = Config(**{sec: SECTIONS[sec](**values[sec]) for sec in SECTIONS}, out_dir=out_dir)
    validate(cfg, where)
    return cfg


def validate(cfg: Config, where=lambda k: k) -> None:
    """Range checks that types alone cannot express."""
    m, t = cfg.model, cfg.train
    positive = [("model.d_model", m.d_model), ("model.n_heads", m.n_heads), ("model.n_layers", m.n_layers),
                ("model.d_ff", m.d_ff), ("model.max_seq_len", m.max_seq_len), ("train.batch_size", t.batch_size),
                ("train.epochs", 1 if t.epochs is None else t.epochs), ("train.lr", t.lr), ("train.grad_accum_steps", t.grad_accum_steps)]
    for key, v in positive:
        if v <= 0:
            raise UserError(f"{where(key)}: must be positive, got {v}")
    if m.head_size < 0 or m.n_kv_heads < 0:
        key = "model.head_size" if m.head_size < 0 else "model.n_kv_heads"
        raise UserError(f"{where(key)}: must not be negative, got {min(m.head_size, m.n_kv_heads)}")
    if not m.head_size and m.d_model % m.n_heads:
        raise UserError(f"{where('model.n_heads')}: n_heads={m.n_heads} does not divide d_model={m.d_model}")
    if m.head_dim % 2:
        what = "head_size" if m.head_size else "head size d_model/n_heads"
        raise UserError(f"{where('model.head_size' if m.head_size else 'model.n_heads')}: {what}={m.head_dim} "
                        f"must be even for rotary embedding")
    if m.n_heads % m.kv_heads:
        raise UserError(f"{where('model.n_kv_heads')}: n_kv_heads={m.kv_heads} does not divide n_heads={m.n_heads}")
    for key, v in [("model.rope_theta", m.rope_theta), ("model.norm_eps", m.norm_eps)]:
        if v <= 0:
            raise UserError(f"{where(key)}: must be positive, got {v}")
    validate_family(m, where)
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"{where('model.dropout')}: must be in [0, 1), got {m.dropout}")
    for key, v in [("train.weight_decay", t.weight_decay), ("train.warmup_steps", t.warmup_steps),
                   ("train.max_grad_norm", t.max_grad_norm), ("train.eval_every", t.eval_every),
                   ("train.save_every", t.save_every), ("train.save_every_s", t.save_every_s),
                   ("train.sample_questions", t.sample_questions),
                   ("train.pack_len", t.pack_len), ("train.eval_exact", t.eval_exact),
                   ("train.focus_steps", t.focus_steps), ("train.head_chunk", t.head_chunk)]:
        if v < 0:
            raise UserError(f"{where(key)}: must not be negative, got {v}")
    if t.max_steps is not None and t.max_steps <= 0:
        raise UserError(f"{where('train.max_steps')}: must be positive, got {t.max_steps}")
    if t.epochs is None and t.max_steps is None:
        raise UserError(f"{where('train.epochs')}: null (train for max_steps) needs train.max_steps")
    if t.batch_size % t.grad_accum_steps:
        raise UserError(f"{where('train.grad_accum_steps')}: {t.grad_accum_steps} does not divide batch_size={t.batch_size}")
    if t.focus_steps and not t.focus_categories:
        raise UserError(f"{where('train.focus_steps')}: {t.focus_steps} focus steps need train.focus_categories")
    if t.focus_steps and cfg.data.corpus is not None:
        raise UserError(f"{where('train.focus_steps')}: pretraining has no categories to focus on")
    if t.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"{where('train.dtype')}: expected auto, float32 or bfloat16, got {t.dtype!r}")
    if t.remat not in REMAT:
        raise UserError(f"{where('train.remat')}: expected one of {', '.join(REMAT)}, got {t.remat!r}")
    if m.attention not in ATTENTION:
        raise UserError(f"{where('model.attention')}: expected one of {', '.join(ATTENTION)}, got {m.attention!r}")
    if not t.buckets or any(b <= 0 for b in t.buckets):
        raise UserError(f"{where('train.buckets')}: expected positive lengths, got {list(t.buckets)}")
    if cfg.data.chat_template not in (None, "base", "chatml"):
        raise UserError(f"{where('data.chat_template')}: expected base or chatml, got {cfg.data.chat_template!r}")
    if cfg.data.format is not None and cfg.data.format not in ROW_FORMS:
        raise UserError(f"{where('data.format')}: expected one of {', '.join(ROW_FORMS)} (or null: detected), "
                        f"got {cfg.data.format!r}")
    unknown = [k for k in cfg.data.columns if k not in ROW_FIELDS]
    if unknown:
        raise UserError(f"{where('data.columns')}: unknown field {unknown[0]!r} (known: {', '.join(ROW_FIELDS)})")
    if cfg.data.corpus is not None and not cfg.data.corpus.strip():
        raise UserError(f"{where('data.corpus')}: must not be empty (leave it out for fine-tuning)")
    if not cfg.out_dir:
        raise UserError(f"{where('out_dir')}: must not be empty")
    validate_lora(cfg, where)
    validate_dpo(cfg, where)


def validate_dpo(cfg: Config, where=lambda k: k) -> None:
    t, d = cfg.train, cfg.dpo
    if t.objective not in ("sft", "dpo"):
        raise UserError(f"{where('train.objective')}: expected sft or dpo, got {t.objective!r}")
    if d.beta <= 0:
        raise UserError(f"{where('dpo.beta')}: must be positive, got {d.beta}")
    if d.loss not in ("sigmoid", "ipo"):
        raise UserError(f"{where('dpo.loss')}: expected sigmoid or ipo, got {d.loss!r}")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise UserError(f"{where('dpo.label_smoothing')}: must be in [0, 0.5), got {d.label_smoothing}")
    if d.sft_weight < 0:
        raise UserError(f"{where('dpo.sft_weight')}: must not be negative, got {d.sft_weight}")
    if d.label_smoothing and d.loss != "sigmoid":
        raise UserError(f"{where('dpo.label_smoothing')}: applies to dpo.loss sigmoid only")
    if t.objective != "dpo":
        return
    if not cfg.model.init_from:
        raise UserError(f"{where('train.objective')}: dpo tunes a trained model against itself; set "
                        f"model.init_from (an SFT run or a Llama-format directory)")
    if cfg.data.corpus is not None:
        raise UserError(f"{where('train.objective')}: dpo trains on preference pairs, not a data.corpus")
    if t.grad_accum_steps != 1:
        raise UserError(f"{where('train.grad_accum_steps')}: dpo keeps a pair's two answers in one batch; "
                        f"only 1 is supported")
    if t.focus_steps:
        raise UserError(f"{where('train.focus_steps')}: the curriculum is for sft; dpo has none")


def validate_family(m: ModelConfig, where=lambda k: k) -> None:
    """The family and its features agree (FAMILIES); the rotary scaling's values are usable."""
    if m.family not in FAMILIES:
        raise UserError(f"{where('model.family')}: {m.family!r} is not supported (supported: {', '.join(FAMILIES)})")
    if m.attn_bias not in ATTN_BIAS:
        raise UserError(f"{where('model.attn_bias')}: expected one of {', '.join(ATTN_BIAS)}, got {m.attn_bias!r}")
    cls, biases, qk_norm = FAMILIES[m.family]
    if m.attn_bias not in biases:
        raise UserError(f"{where('model.family')}: {m.family} ({cls}) has model.attn_bias "
                        f"{' or '.join(biases)}, not {m.attn_bias}")
    if m.qk_norm != qk_norm:
        raise UserError(f"{where('model.family')}: {m.family} ({cls}) has model.qk_norm={str(qk_norm).lower()}")
    if m.rope_type not in ROPE_TYPES:
        raise UserError(f"{where('model.rope_type')}: {m.rope_type!r} is not supported "
                        f"(supported: {', '.join(ROPE_TYPES)})")
    for key in ("rope_factor", "rope_low_freq_factor", "rope_original_max_len"):
        if getattr(m, key) <= 0:
            raise UserError(f"{where('model.' + key)}: must be positive, got {getattr(m, key)}")
    if m.rope_type == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        raise UserError(f"{where('model.rope_high_freq_factor')}: must be above rope_low_freq_factor="
                        f"{m.rope_low_freq_factor}, got {m.rope_high_freq_factor}")


def validate_lora(cfg: Config, where=lambda k: k) -> None:
    lc = cfg.lora
    if lc.rank < 0:
        raise UserError(f"{where('lora.rank')}: must not be negative, got {lc.rank}")
    if lc.base_dtype not in LORA_BASE_DTYPES:
        raise UserError(f"{where('lora.base_dtype')}: expected one of {', '.join(LORA_BASE_DTYPES)}, "
                        f"got {lc.base_dtype!r}")
    if lc.rank == 0:
        if lc.base_dtype != "float32":
            raise UserError(f"{where('lora.base_dtype')}: {lc.base_dtype} needs lora.rank > 0 (only a frozen "
                            f"base is stored in fewer bits; full fine-tuning trains every parameter in float32)")
        return
    if lc.alpha <= 0:
        raise UserError(f"{where('lora.alpha')}: must be positive, got {lc.alpha}")
    if lc.dropout != 0.0:
        raise UserError(f"{where('lora.dropout')}: only 0 is supported (adapter dropout is not implemented; "
                        f"model.dropout={cfg.model.dropout} still applies during LoRA training)")
    if not lc.targets:
        raise UserError(f"{where('lora.targets')}: must name at least one projection")
    try:
        target_names(lc.targets)
    except ValueError as e:
        raise UserError(f"{where('lora.targets')}: {e}") from None
    if not cfg.model.init_from:
        raise UserError(f"{where('lora.rank')}: LoRA trains adapters on a frozen pretrained model; "
                        f"set model.init_from (a jaxsft run or a Llama-format directory)")


def to_dict(cfg) -> dict:
    """Plain-JSON form (tuples become lists)."""
    return dataclasses.asdict(cfg)


def lora_config_from_dict(d: dict) -> LoraConfig:
    """A run's lora section as config.json holds it (none in runs before LoRA: off)."""
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (d or {}).items() if k in names}
    return LoraConfig(**d)


def model_config_from_dict(d: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in names})
