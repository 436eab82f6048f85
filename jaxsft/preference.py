"""Preference accuracy of a run on preference pairs (bin/eval --pairs, and a DPO run's test pairs).

For pair k with chosen answer c and rejected answer r, the implicit reward of an answer a is

    reward(a) = log p_run(a) - log p_ref(a)        (each a sum over a's tokens, dpo.answer_logps)
    correct_k = reward(c) > reward(r)              preference_accuracy: their mean
    margin_k  = beta * (reward(c) - reward(r))     margin: their mean (beta: the run's dpo.beta)

overall and per category. The reference is the run's starting model when the run is a DPO run
(`runs.reference_params`). Any other run is its own reference, so its rewards would all be
zero: for it the figures use the raw log-probs instead (reward(a) = log p_run(a)), and the
report says so (`raw`, `reference`).

A pair renders as training renders it (chatml.encode_pairs: the run's tokenizer and system
prompt, the loss on the answer and its end of turn); a pair with an answer that does not fit
max_seq_len is left out and counted (`dropped`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import chatml, checkpoint, dpo, model, runs
from .batching import BatchPlan
from .config import DpoConfig, TrainConfig
from .evaluate import NO_CATEGORY

PAIRS_PER_CALL = 32  # pairs (2x answer rows) per forward pass
SELF = "itself (an SFT run: raw log-probs)"


def encode(pairs: Sequence, tok, system_prompt: Optional[str], max_seq_len: int) -> tuple[list, list]:
    """(examples, kept): the (chosen, rejected) examples of the pairs that fit max_seq_len, and
    their indices in `pairs`."""
    examples, kept = [], []
    for i, p in enumerate(pairs):
        ex, _ = chatml.encode_pairs([p], tok, system_prompt, max_seq_len)
        if ex:
            examples.append(ex[0])
            kept.append(i)
    return examples, kept


def figures(policy: np.ndarray, reference: Optional[np.ndarray], categories: Sequence[str],
            beta: float) -> dict:
    """policy, reference (K, 2): each pair's chosen and rejected log-prob sums (reference None:
    the raw log-probs are the rewards) -> {n, preference_accuracy, margin, per_category: {name:
    {n, preference_accuracy, margin}}}; categories "" count under NO_CATEGORY, sorted."""
    rewards = policy if reference is None else policy - reference
    diff = (rewards[:, 0] - rewards[:, 1]).astype(np.float64)

    def of(at):
        return {"n": int(len(at)), "preference_accuracy": float(np.mean(diff[at] > 0)) if len(at) else 0.0,
                "margin": float(beta * np.mean(diff[at])) if len(at) else 0.0}

    cats = np.asarray([c or NO_CATEGORY for c in categories], dtype=object)
    per = {c: of(np.flatnonzero(cats == c)) for c in sorted(set(cats))}
    return {**of(np.arange(len(diff))), "per_category": per}


def pair_logps(params, model_cfg, examples: list, buckets, pairs_per_call: int = PAIRS_PER_CALL, step=None):
    """(K, 2) float32: each pair's chosen and rejected answer log-prob sums under `params`, batched
    as the DPO trainer computes its reference (dpo.reference_logps). step: a dpo.make_logps_step
    to reuse (one compiled program for the run and its reference)."""
    step = step or dpo.make_logps_step(model.abstract(model_cfg)[0], pairs_per_call)
    plan = BatchPlan(examples, pairs_per_call, 0, tuple(buckets), model_cfg.max_seq_len, pairs=True)
    return dpo.reference_logps(step, params, plan, pairs_per_call)


def report(run_dir: str, pairs: Sequence, system_prompt: Optional[str] = None, restored=None,
           pairs_per_call: int = PAIRS_PER_CALL) -> dict:
    """The preference figures of the run in `run_dir` (`figures`) on `pairs` (data.Pair), with
    `reference` (what it was measured against, in words), `raw` (True: raw log-probs), `beta`
    and `dropped`. system_prompt: default the run's. restored: (params, model_cfg, tokenizer)
    when the caller has runs.restore(run_dir) already."""
    cfg_dict, _ = checkpoint.read_meta(run_dir)
    params, mc, tok = restored or runs.restore(run_dir)
    if system_prompt is None:
        system_prompt = cfg_dict.get("data", {}).get("system_prompt")
    system_prompt = chatml.default_system_prompt(tok, system_prompt)
    examples, kept = encode(pairs, tok, system_prompt, mc.max_seq_len)
    beta = cfg_dict.get("dpo", {}).get("beta", DpoConfig.beta)
    ref_params = runs.reference_params(run_dir)
    out = {"n": 0, "preference_accuracy": 0.0, "margin": 0.0, "per_category": {}}
    if examples:
        buckets = cfg_dict.get("train", {}).get("buckets", TrainConfig.buckets)
        step = dpo.make_logps_step(model.abstract(mc)[0], pairs_per_call)
        policy = pair_logps(params, mc, examples, buckets, pairs_per_call, step)
        reference = None if ref_params is None else pair_logps(ref_params, mc, examples, buckets, pairs_per_call,
                                                               step)
        out = figures(policy, reference, [pairs[i].category for i in kept], beta)
    where = SELF if ref_params is None else f"start (model.init_from {cfg_dict['model'].get('init_from')})"
    return {**out, "reference": where, "raw": ref_params is None, "beta": beta, "dropped": len(pairs) - len(kept)}


def describe(rep: dict) -> str:
    """One line saying what a report's figures compare."""
    if rep["raw"]:
        return (f"reference: {SELF}: it is its own reference, so accuracy compares log p(chosen) > "
                f"log p(rejected); margin = {rep['beta']:g} x their difference")
    return (f"reference: {rep['reference']}: reward = log p(answer) - log p_ref(answer); accuracy: reward(chosen) > "
            f"reward(rejected); margin = {rep['beta']:g} x their difference")
