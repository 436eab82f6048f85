"""Everything a run needs, read and validated before anything is written:
`prepare(cfg, mesh)` -> one frozen `Setup` (model config, tokenizer, examples,
the batch plan, the optimizer). The trainer, the benchmarks and the tests all
start from it.

The vocabulary: from scratch, every character of the training text; with
model.init_from, the base run's vocabulary with new characters appended, or a
Llama-format model's own tokenizer with the ChatML markers it lacks (hf.py), whose
config.json then also sets the model's architecture (runs.py reads the base).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import optax

from . import chatml, datasets_io, hf, lora, runs
from .batching import BatchPlan, RunPlan
from .config import DEFAULT_SYSTEM_PROMPT, Config, ModelConfig, UserError
from .data import Row, corpus_examples, describe, pair_texts, read_corpus, row_texts, split_corpus
from .parts import Parts
from .steps import make_optimizer, make_schedule
from .tokenizer import AnyTokenizer, Tokenizer


@dataclass(frozen=True)
class Setup:
    cfg: Config  # as given; vocab_size, chat_template and system_prompt filled in (with_vocabulary)
    tok: AnyTokenizer
    train_examples: Sequence  # (inputs, targets, loss_mask) per row (or corpus window), a list or kept in Arrow
    # (datasets_io.ArrowExamples); dpo: (chosen, rejected) pairs
    val_rows: list[Row]  # [] when pretraining; dpo: each pair's prompt (no answer)
    val_examples: list
    plan: RunPlan  # the batch of every step
    tx: optax.GradientTransformation  # steps.AdamW: optax's init and update, and the fused apply
    schedule: Callable  # step -> learning rate
    base: Optional[tuple] = None  # model.init_from: (its parameters, its vocabulary size)

    @property
    def model_cfg(self) -> ModelConfig:
        return self.cfg.model

    @property
    def pretraining(self) -> bool:
        return bool(self.cfg.data.corpus)

    @property
    def dpo(self) -> bool:
        return self.cfg.train.objective == "dpo"

    def init_params(self):
        """(graphdef, parameters at step 0): fresh, or the base's (`runs.init_params_from`)."""
        return runs.init_params_from(self.model_cfg, self.cfg.train.seed, self.base)

    def init_model(self) -> Parts:
        """The model at step 0 split by what trains (lora.transform: every parameter, or with
        lora.rank > 0 the adapters on the frozen base)."""
        graphdef, params = self.init_params()
        return lora.transform(self.cfg, graphdef, params, None if self.base is None else self.base[1])


def tokenizer_for(cfg: Config, texts: list[str]) -> AnyTokenizer:
    """The vocabulary of a run trained on `texts` (reads no weights).

    From scratch: every character of `texts`, the system prompt and "\\n" (ChatML: a
    data.chat_template of base is a UserError). With model.init_from: the base's
    (runs.base_tokenizer: its own chat template or ChatML's markers).
    """
    src = cfg.model.init_from
    if not src:
        if cfg.data.chat_template == "base":
            raise UserError("data.chat_template: base needs model.init_from (a Llama-format directory with a chat "
                            "template); a run from scratch renders ChatML")
        system = DEFAULT_SYSTEM_PROMPT if cfg.data.system_prompt is None else cfg.data.system_prompt
        return Tokenizer.build(list(texts) + [system, "\n"])
    return runs.base_tokenizer(cfg, texts)


def _warn(log, msg: str) -> None:
    log(msg, file=sys.stderr)


def focus_categories(cfg: Config, train, log=print) -> tuple:
    """The categories of train.focus_categories (the curriculum's first steps) that the training
    rows have. Those they do not have are left out with a note; with none left, the curriculum is off."""
    names, have = cfg.train.focus_categories, train.categories()
    missing = [n for n in names if n not in have]
    if missing:
        present = [n for n in names if n not in missing]
        _warn(log, f"note: train.focus_categories: {describe(cfg.data.train)} has no row of category "
                   f"{', '.join(map(repr, missing))}; " + (f"the curriculum uses {', '.join(present)} only"
                                                           if present else "the curriculum is skipped"))
    return tuple(n for n in names if n in have)


def _examples(rows, tok, cfg: Config, what: str, categories: Optional[tuple] = None):
    """rows (datasets_io.MemoryRows or ArrowRows) -> (examples, rows dropped as too long)."""
    L = cfg.model.max_seq_len
    examples, dropped = rows.examples(tok, cfg.data.system_prompt, L, what, categories)
    if not len(examples):
        raise UserError(f"{what}: no row fits max_seq_len={L} with any of its answer")
    return examples, dropped


def with_vocabulary(cfg: Config, tok: AnyTokenizer) -> Config:
    """cfg with model.vocab_size from `tok`, and data.chat_template and data.system_prompt resolved
    for its format (chatml.default_system_prompt), as the run's config.json keeps them."""
    data = dataclasses.replace(cfg.data, system_prompt=chatml.default_system_prompt(tok, cfg.data.system_prompt),
                               chat_template="chatml" if tok.template is None else "base")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=len(tok)), data=data)


def prepare(cfg: Config, mesh, log=print) -> Setup:
    """Reads and validates the data, builds the vocabulary, the batch plan and the
    optimizer of a run on `mesh`; raises UserError before anything is written.
    data.corpus set: a pretraining run (next-token examples of the corpus's training
    paragraphs; its held-out paragraphs validate; no validation rows)."""
    tc = cfg.train
    cfg = runs.with_base_architecture(cfg)
    if cfg.data.corpus:
        paragraphs = read_corpus(cfg.data.corpus)
        tok, base = _vocabulary(cfg, paragraphs, log)
        cfg = with_vocabulary(cfg, tok)
        train_par, val_par = split_corpus(paragraphs)
        L = cfg.model.max_seq_len
        train_ex, val_rows, val_ex = corpus_examples(train_par, tok, L), [], corpus_examples(val_par, tok, L)
        focus = []
    elif tc.objective == "dpo":
        train_pairs, val_pairs = datasets_io.read_pairs(cfg.data.train, cfg.data), \
            datasets_io.read_pairs(cfg.data.val, cfg.data)
        tok, base = _vocabulary(cfg, pair_texts(train_pairs), log)
        cfg = with_vocabulary(cfg, tok)
        system, L = cfg.data.system_prompt, cfg.model.max_seq_len
        train_what, val_what = describe(cfg.data.train), describe(cfg.data.val)
        train_ex, dropped = chatml.encode_pairs(train_pairs, tok, system, L, train_what)
        val_ex, vdropped = chatml.encode_pairs(val_pairs, tok, system, L, val_what)
        for what, ex in ((train_what, train_ex), (val_what, val_ex)):
            if not ex:
                raise UserError(f"{what}: no pair fits max_seq_len={L} with some of both answers")
        if dropped or vdropped:
            _warn(log, f"warning: dropped {dropped} training and {vdropped} validation pairs with an answer that "
                       f"does not fit max_seq_len={L}")
        _note_unknown(tok, pair_texts(val_pairs), log)
        val_rows = [Row(p.prompt, p.category, None, p.line, p.where) for p in val_pairs]
        focus = []
    else:
        train = datasets_io.train_rows(cfg.data.train, cfg.data)  # in memory, or kept in Arrow when large
        val_rows = datasets_io.read_rows(cfg.data.val, cfg.data)
        tok, base = _vocabulary(cfg, train.texts(), log)
        cfg = with_vocabulary(cfg, tok)
        train_what = describe(cfg.data.train)
        train_ex, dropped = _examples(train, tok, cfg, train_what)
        val_ex, vdropped = _examples(datasets_io.MemoryRows(val_rows), tok, cfg, describe(cfg.data.val))
        if dropped or vdropped:
            _warn(log, f"warning: dropped {dropped} training and {vdropped} validation rows whose answer does not "
                       f"fit max_seq_len={cfg.model.max_seq_len}")
        _note_unknown(tok, row_texts(val_rows), log)
        names = focus_categories(cfg, train, log) if tc.focus_steps else ()
        focus = _examples(train, tok, cfg, f"train.focus_categories: {train_what}", names)[0] if names else []
    plan = run_plan(cfg, tok, train_ex, focus, multiple=tc.grad_accum_steps * mesh.size)
    return Setup(cfg, tok, train_ex, val_rows, val_ex, plan, make_optimizer(tc, plan.total_steps),
                 make_schedule(tc, plan.total_steps), base)


def _note_unknown(tok: AnyTokenizer, val_texts: list[str], log) -> None:
    unk = sum(len(tok.unknown(t)) for t in val_texts)
    if unk:
        _warn(log, f"note: {unk} validation characters are not in the training vocabulary (they become <unk>)")


def run_plan(cfg: Config, tok: AnyTokenizer, train_ex: list, focus_ex: list, multiple: int = 1) -> RunPlan:
    """The batches of every step: packing geometry fixed from the first batches, the
    shared system prompt (train.share_prefix), and the curriculum first. The output head
    runs at answer positions only when one device holds each whole batch (multiple 1). The
    system prompt is the format's default where data.system_prompt is null, as the examples'."""
    tc = cfg.train
    system = chatml.default_system_prompt(tok, cfg.data.system_prompt)
    prefix = chatml.system_prefix(tok, system) if tc.pack_len and tc.share_prefix else None

    def plan(examples):
        return BatchPlan(examples, tc.batch_size, tc.seed, tc.buckets, cfg.model.max_seq_len, tc.pack_len,
                         multiple, prefix, pairs=tc.objective == "dpo").settled(head_only_at_answers=multiple == 1)

    return RunPlan(plan(train_ex), tc.epochs, tc.max_steps, plan(focus_ex) if focus_ex else None,
                   tc.focus_steps if focus_ex else 0)


def _vocabulary(cfg: Config, texts: list[str], log=print):
    """(tokenizer_for(cfg, texts), base): None from scratch; with model.init_from,
    (the base's best parameters, its vocabulary size) for runs.init_params_from."""
    tok = tokenizer_for(cfg, texts)  # checks the base's shape before any array is read
    src = cfg.model.init_from
    if not src:
        return tok, None
    if runs.is_llama_base(cfg):
        rows = hf.model_fields(src)["vocab_size"]
        m = cfg.model
        _warn(log, f"model.init_from: Llama-format model {src} ({m.family}): d_model {m.d_model}, {m.n_layers} layers, "
                   f"{m.n_heads} heads ({m.kv_heads} key/value), d_ff {m.d_ff}, "
                   f"{'tied' if m.tie_embeddings else 'untied'} head, "
                   f"vocabulary {rows} rows" + (f" + {len(tok) - rows} for ChatML markers" if len(tok) > rows else "")
                   + (f"; its own chat template ({tok.template.origin})" if tok.template is not None else ""))
    base = runs.load_base(src, cfg.model)
    new = [] if runs.is_llama_base(cfg) else tok.itos[base[1]:]
    if new:  # a jaxsft run's character vocabulary, grown
        shown = "".join(new[:40]) + (" ..." if len(new) > 40 else "")
        _warn(log, f"model.init_from: {src}'s vocabulary of {base[1]} gains {len(new)} characters its data never "
                   f"had, each a new embedding row: {shown}")
    return tok, base

