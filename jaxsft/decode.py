"""Answering conversations: `Generator` is what scripts use (bin/chat, bin/eval,
evaluate.score_rows, the trainer's exact-match hook): it renders conversations in
ChatML or the base's own chat template (chatml.render) and answers them with the
continuous-batching engine (`engine.Engine`), which compiles a bounded set of
programs and never makes a batch wait for its longest row. (The one-program
decoder and the naive one the engine is tested against live in
tests/reference_decode.py.)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from . import chatml, model
from .config import ModelConfig
from .engine import Engine, Request, bucket, capped
from .tokenizer import AnyTokenizer

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0


class Generator:
    """Answers conversations with a trained model.

    >>> gen = Generator(params, model_cfg, tok)
    >>> gen.answer([[("user", "什么是机器学习？")]])
    ['机器学习是让模型从数据中学习规律并做预测。']
    """

    def __init__(self, params, cfg: ModelConfig, tok: AnyTokenizer, system_prompt: Optional[str] = None,
                 max_new_tokens: int = 100, batch_size: int = 64):
        self.params, self.cfg, self.tok = params, cfg, tok
        self.graphdef = model.abstract(cfg)[0]
        self.system_prompt = chatml.default_system_prompt(tok, system_prompt)  # None: the format's default
        # half the context holds the answer, the rest the prompt
        self.max_new_tokens = min(max_new_tokens, cfg.max_seq_len // 2)
        if self.max_new_tokens < max_new_tokens:
            _note_once(f"note: answers are capped at {self.max_new_tokens} tokens (half of max_seq_len "
                       f"{cfg.max_seq_len}; the other half holds the prompt), not {max_new_tokens}")
        self.batch_size = batch_size
        self._engines: dict = {}

    @classmethod
    def from_run(cls, run_dir: str, system_prompt: Optional[str] = None, **kw) -> "Generator":
        """The best checkpoint of a run, answering with the system prompt it was trained
        with (or `system_prompt`): the one way a script gets a model that answers."""
        from . import checkpoint, runs
        params, model_cfg, tok = runs.restore(run_dir)
        if system_prompt is None:
            system_prompt = checkpoint.read_meta(run_dir)[0]["data"]["system_prompt"]
        return cls(params, model_cfg, tok, system_prompt, **kw)

    def prompt_ids(self, messages) -> tuple[np.ndarray, bool]:
        """Prompt ids (chatml.render) for a conversation ending with a user turn, cut to fit
        the context: oldest user/assistant pairs go first, then the start of the
        last question. Returns (ids, truncated)."""
        budget = self.cfg.max_seq_len - self.max_new_tokens
        msgs = list(messages)
        system = [msgs.pop(0)] if msgs and msgs[0][0] == "system" else []
        truncated = False
        while True:
            ids, _ = chatml.render(system + msgs, self.tok, self.system_prompt, add_generation_prompt=True)
            if len(ids) <= budget:
                return ids, truncated
            truncated = True
            if len(msgs) > 1:
                msgs = msgs[2:]  # drop the oldest (user, assistant) pair
            else:
                role, text = msgs[0]
                msgs = [(role, text[len(ids) - budget:])] if len(text) > len(ids) - budget else [(role, text[-1:])]
                if len(text) <= 1:
                    return ids[-budget:], True

    def engine(self, n: int, context: Optional[int] = None):
        """The continuous-batching engine answering `n` prompts: batch_size slots, or fewer
        (a power of two) for fewer prompts, so one question does not decode 64 rows a
        step. One engine per slot count, kept with its KV cache; params may change between
        calls (the trainer's evaluation hook swaps them in). Prompts that start with the system
        prompt are prefilled after it (the engine's prefix). context: cache positions per slot
        (default max_seq_len); one engine per (slots, context)."""
        slots = bucket(max(n, 1), capped(self.batch_size, BATCH_BUCKETS))
        eng = self._engines.get((slots, context))
        if eng is None:  # shapes compiled as needed; freed slots refilled 8 prompts at a time
            eng = self._engines[slots, context] = Engine(
                self.params, self.cfg, self.tok.stop_ids, slots, self.tok.pad_id, admit_at=8,
                prefix=chatml.system_prefix(self.tok, self.system_prompt), context=context)
        eng.params = self.params
        return eng

    def requests(self, prompts, sampling: Sampling, seed: int):
        """Engine requests for `prompts`: row i samples with seed + i; an answer is at most
        max_new_tokens and never runs past the context."""
        out = []
        for i, p in enumerate(prompts):
            p = np.asarray(p, np.int32)
            if len(p) >= self.cfg.max_seq_len:
                raise ValueError(f"a prompt of {len(p)} tokens leaves no room to answer in the context of "
                                 f"{self.cfg.max_seq_len}")
            out.append(Request(p, min(self.max_new_tokens, self.cfg.max_seq_len - len(p)), sampling.temperature,
                               sampling.top_k, sampling.top_p, seed + i))
        return out

    def context(self, reqs) -> int:
        """Cache positions for answering `reqs`: the longest prompt + answer they may need, in
        steps of 64 (each decode step reads all of them), at most max_seq_len; so a few engines
        at most, none recompiled for another batch of the same shape."""
        need = max(len(r.prompt) + r.max_tokens for r in reqs)
        return min(-(-need // 64) * 64, self.cfg.max_seq_len)

    def generate_ids(self, prompts: list[np.ndarray], sampling: Sampling = Sampling(), seed: int = 0) -> list[list[int]]:
        """Token ids of each answer (without its stop token: <|endoftext|>, or any of
        tok.stop_ids). All prompts go through one continuous-batching engine (batch_size
        slots): a slot freed by a short answer takes the next prompt, so no row waits for
        the longest. Greedy answers to identical
        prompts are identical, so each distinct prompt is decoded once."""
        if len(prompts) == 0:
            return []
        reqs = self.requests(prompts, sampling, seed)
        context = self.context(reqs)
        if sampling.temperature > 0:
            self.engine(len(reqs), context).run(reqs)
            return [r.tokens for r in reqs]
        unique: dict = {}
        for r in reqs:
            unique.setdefault(r.prompt.tobytes(), r)
        self.engine(len(unique), context).run(list(unique.values()))
        return [list(unique[r.prompt.tobytes()].tokens) for r in reqs]

    def answer(self, conversations: Sequence, sampling: Sampling = Sampling(), seed: int = 0) -> list[str]:
        """Conversations (each a list of (role, content) ending with a user turn) -> answers."""
        prompts = [self.prompt_ids(c)[0] for c in conversations]
        return [self.tok.decode(ids) for ids in self.generate_ids(prompts, sampling, seed)]

    def stream_ids(self, prompt: np.ndarray, sampling: Sampling = Sampling(), seed: int = 0):
        """Yields the answer's token ids one at a time as they are decoded (until a stop
        token, <|endoftext|> or tok.stop_ids, which is not yielded). Same tokens as
        generate_ids([prompt], sampling, seed)[0]: the same engine and key schedule."""
        yield from self.engine(1).stream(self.requests([prompt], sampling, seed)[0])


_noted: set = set()


def _note_once(msg: str) -> None:
    if msg not in _noted:
        _noted.add(msg)
        print(msg, file=sys.stderr)
