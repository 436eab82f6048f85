"""Several runs side by side (bin/eval given several checkpoints), as the seed's 05_Evaluation
notebook compares its base, SFT and DPO models. Per run, on a rows file:

    exact match      greedy answers against the references, per category (evaluate.score_rows)
    perplexity       exp of the token-weighted mean cross-entropy of the reference answers
                     (each row rendered with `expected` as its last answer, every assistant turn's
                     tokens and end of turn counted, as the validation loss counts them:
                     steps.validation_loss)
    distinct-1/2     evaluate.distinct_n of the greedy answers, in the run's tokens (characters
                     for a character vocabulary)

and on a pairs file its preference figures (preference.report).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from . import chatml, checkpoint, evaluate, model, preference, runs
from .config import TrainConfig
from .data import Row
from .decode import Generator
from .steps import make_eval_step, validation_loss


def perplexity(params, model_cfg, tok, system_prompt: str, rows: Sequence[Row], buckets,
               batch_size: int = 64) -> tuple[float, int]:
    """(perplexity of the rows' reference answers, rows dropped: no answer token fits max_seq_len)."""
    answered = [dataclasses.replace(r, messages=r.prompt_messages + (("assistant", r.expected),)) for r in rows]
    examples, dropped = chatml.encode_rows(answered, tok, system_prompt, model_cfg.max_seq_len)
    if not examples:
        return float("nan"), dropped
    step = make_eval_step(model.abstract(model_cfg)[0])
    loss = validation_loss(step, params, examples, batch_size, tuple(buckets), model_cfg.max_seq_len)
    return math.exp(loss), dropped


def run_figures(run_dir: str, rows: Optional[Sequence[Row]], pairs: Optional[Sequence], system_prompt=None,
                max_new_tokens: int = 100, batch_size: int = 64) -> dict:
    """One run's figures: with rows, score_rows's report (its rows' answers left out) plus
    perplexity, distinct_1 and distinct_2; with pairs, preference (preference.report)."""
    cfg_dict, _ = checkpoint.read_meta(run_dir)
    params, mc, tok = runs.restore(run_dir)
    if system_prompt is None:
        system_prompt = cfg_dict.get("data", {}).get("system_prompt")
    out: dict = {"checkpoint": run_dir}
    if rows:
        gen = Generator(params, mc, tok, system_prompt, max_new_tokens=max_new_tokens, batch_size=batch_size)
        scored = evaluate.score_rows(gen, rows)
        answers = [tok.encode(r["answer"]) for r in scored.pop("rows")]
        buckets = cfg_dict.get("train", {}).get("buckets", TrainConfig.buckets)
        ppl, dropped = perplexity(params, mc, tok, gen.system_prompt, rows, buckets, batch_size)
        out.update(scored, perplexity=ppl, perplexity_dropped=dropped,
                   distinct_1=evaluate.distinct_n(answers, 1), distinct_2=evaluate.distinct_n(answers, 2))
    if pairs:
        out["preference"] = preference.report(run_dir, pairs, system_prompt, (params, mc, tok))
    return out
