"""Supervised fine-tuning: bin/train --config configs/default.yaml [--set key=value ...] [--resume]"""
from . import main_guard, run_training, train_args


@main_guard
def main():
    args = train_args(__doc__)
    from ..config import UserError, load_config
    cfg = load_config(args.config, args.set)
    if cfg.data.corpus:
        raise UserError(f"{args.config}: data.corpus is set, which makes this a pretraining config; "
                        f"run it with bin/pretrain")
    run_training(cfg, args, score_test=True)
