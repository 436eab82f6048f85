"""Pretraining: plain next-token loss on the text corpus of data.corpus (one paragraph per line).
bin/pretrain --config configs/pretrain.yaml [--set key=value ...] [--resume]; fine-tune the result
with model.init_from: RUN_DIR (see configs/sft_from_pretrain.yaml)."""
from . import main_guard, run_training, train_args


@main_guard
def main():
    args = train_args(__doc__)
    from ..config import UserError, load_config
    cfg = load_config(args.config, args.set)
    if not cfg.data.corpus:
        raise UserError(f"{args.config}: data.corpus is not set (bin/pretrain trains on a text corpus; "
                        f"use bin/train for instruction data)")
    run_training(cfg, args)
