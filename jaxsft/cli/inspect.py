"""Show how one row is rendered and which tokens the loss is computed on (the
seed's Part 3 table): position, input token, target token, counted or not. A run
on a base's own chat template shows the row in that template.

  bin/inspect --config configs/default.yaml                 row 0 of the training file
  bin/inspect --config configs/default.yaml --row 5 --split val
  bin/inspect --config configs/default.yaml --checkpoint runs/default   adds each token's loss

Rows are numbered from 0 in file order. Without --checkpoint the vocabulary is
built exactly as bin/train would build it; with one, the run's own is used.
"""
import argparse

from ..config import UserError
from . import main_guard


def token_losses(run_dir, inputs, targets):
    """Per-position cross-entropy (T,) of the run's best parameters on one example."""
    import jax
    import numpy as np
    from .. import model, runs, steps
    from ..batching import make_batch
    params, model_cfg, _ = runs.restore(run_dir)
    graphdef, _ = model.abstract(model_cfg)
    batch = make_batch([(inputs, targets, np.zeros(len(inputs), np.float32))], 1, len(inputs))
    return np.asarray(jax.jit(steps.token_losses, static_argnums=1)(params, graphdef, batch))[0]


@main_guard
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (its data files, system prompt, max_seq_len)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--row", type=int, default=0, help="row number, from 0 (default 0)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train", help="which data file (default train)")
    p.add_argument("--checkpoint", help="run directory: use its vocabulary and show each token's loss")
    args = p.parse_args()

    from .. import chatml, checkpoint
    from ..config import load_config, model_config_from_dict
    from ..data import describe, row_texts
    from ..datasets_io import read_rows
    from ..evaluate import mask_table
    from ..setup import tokenizer_for
    cfg = load_config(args.config, args.set)
    path = getattr(cfg.data, args.split)
    if path is None:
        raise UserError(f"{args.config}: data.{args.split} is not set")
    rows = read_rows(path, cfg.data)
    if not 0 <= args.row < len(rows):
        raise UserError(f"--row {args.row}: {describe(path)} has rows 0 to {len(rows) - 1}")
    row = rows[args.row]
    max_seq_len = cfg.model.max_seq_len
    if args.checkpoint:
        run_cfg, tok = checkpoint.read_meta(args.checkpoint)
        max_seq_len = model_config_from_dict(run_cfg["model"]).max_seq_len
    else:
        tok = tokenizer_for(cfg, row_texts(rows if args.split == "train" else read_rows(cfg.data.train, cfg.data)))

    ids, mask = chatml.render(row.messages, tok, chatml.default_system_prompt(tok, cfg.data.system_prompt))
    cut_ids, loss_mask = ids[: max_seq_len + 1], mask[1: max_seq_len + 1]
    print(f"{describe(path)} row {args.row} (line {row.line}{', category ' + row.category if row.category else ''}): "
          f"{len(ids)} tokens, max_seq_len {max_seq_len}")
    if len(ids) > max_seq_len + 1:
        print(f"note: longer than max_seq_len + 1: training sees only the first {max_seq_len + 1} tokens")
    nll = token_losses(args.checkpoint, cut_ids[:-1], cut_ids[1:]) if args.checkpoint else None
    print(mask_table(cut_ids, loss_mask, tok.itos, nll))
    if loss_mask.sum() == 0:
        print("note: no answer token fits max_seq_len; training drops this row")
