"""The seed's preference data: preference accuracy and the chosen style, SFT start against DPO.

    bin/train --config configs/default.yaml                                   # runs/default
    bin/train --config configs/dpo.yaml --set data.train=SEED/custom_dpo_train.jsonl \\
        --set data.val=SEED/custom_dpo_val.jsonl --set data.test=null --set out_dir=runs/dpo_seed
    python bench/dpo_seed.py runs/default runs/dpo_seed [--pairs SEED/custom_dpo_val.jsonl]

SEED is ../shared/seed-data. For each run: the preference accuracy on the pairs (a DPO run's
implicit reward against its starting model; an SFT run is its own reference, so raw log-probs:
log p(chosen) > log p(rejected)), and the share of greedy answers to the pairs' distinct prompts
written in the chosen style (starting "要点"). The val split's prompts are not in train.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SEED = os.path.join(REPO, "..", "shared", "seed-data", "custom_dpo_val.jsonl")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--pairs", default=SEED)
    p.add_argument("--style", default="要点", help="the chosen answers' opening")
    args = p.parse_args()
    from jaxsft import preference
    from jaxsft.data import read_pairs
    from jaxsft.decode import Generator
    pairs = read_pairs(args.pairs)
    prompts = sorted({q.prompt for q in pairs})
    print(f"{len(pairs)} pairs, {len(prompts)} distinct prompts ({args.pairs})")
    print(f"{'run':28} {'reference':10} {'accuracy':>9} {'margin':>8} {'style':>12}")
    for run in args.runs:
        rep = preference.report(run, pairs)
        answers = Generator.from_run(run, max_new_tokens=80).answer(prompts)
        styled = sum(a.startswith(args.style) for a in answers)
        ref = "itself" if rep["raw"] else "its start"
        print(f"{run:28} {ref:10} {100 * rep['preference_accuracy']:8.1f}% {rep['margin']:8.3f} "
              f"{styled:4d}/{len(answers)} {100 * styled / len(answers):3.0f}%")
        for q, a in list(zip(prompts, answers))[:2]:
            print(f"    {q[-1][1]} -> {a}")


if __name__ == "__main__":
    main()
