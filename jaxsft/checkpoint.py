"""Checkpoints with orbax: the best parameters by validation loss, and the
latest full training state for --resume, in two separate managers so keeping
the best never evicts the latest.

A run directory holds:

    config.json      the full config (model section with vocab_size)
    tokenizer.json   the vocabulary
    best/<step>/     parameters with the lowest validation loss so far
    latest/<step>/   parameters, optimizer state, step, best validation loss

Scripts restore a usable model in one call:

    params, model_cfg, tok = jaxsft.checkpoint.restore("runs/default")
"""
from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp

from . import model
from .config import ModelConfig, UserError, model_config_from_dict, to_dict
from .tokenizer import Tokenizer


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


def write_meta(run_dir: str, cfg, tok: Tokenizer) -> None:
    """config.json and tokenizer.json beside the checkpoints (process 0 only)."""
    os.makedirs(run_dir, exist_ok=True)
    _write_json(os.path.join(run_dir, "config.json"), to_dict(cfg))
    tok.save(os.path.join(run_dir, "tokenizer.json"))


def read_meta(run_dir: str) -> tuple[dict, Tokenizer]:
    cfg_path = os.path.join(run_dir, "config.json")
    tok_path = os.path.join(run_dir, "tokenizer.json")
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run directory")
    if not os.path.isfile(cfg_path) or not os.path.isfile(tok_path):
        raise UserError(f"{run_dir}: not a jaxsft run (config.json or tokenizer.json missing)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        tok = Tokenizer.load(tok_path)
    except (ValueError, KeyError) as e:
        raise UserError(f"{run_dir}: unreadable run metadata ({e})") from None
    return cfg, tok


class RunCheckpoints:
    """The two orbax managers of a run directory."""

    def __init__(self, run_dir: str):
        run_dir = os.path.abspath(run_dir)
        self.best = ocp.CheckpointManager(
            os.path.join(run_dir, "best"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["val_loss"], best_mode="min"))
        self.latest = ocp.CheckpointManager(
            os.path.join(run_dir, "latest"), options=ocp.CheckpointManagerOptions(max_to_keep=1))

    def save_best(self, step: int, params, val_loss: float) -> None:
        self.best.save(step, args=ocp.args.StandardSave(params), metrics={"val_loss": float(val_loss)})

    def save_latest(self, step: int, state: dict) -> None:
        """state: {"params", "opt_state", "step", "best_val_loss"} (a pytree of arrays)."""
        self.latest.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore_latest(self, target: dict) -> dict:
        step = self.latest.latest_step()
        return self.latest.restore(step, args=ocp.args.StandardRestore(target))

    def wait(self) -> None:
        self.best.wait_until_finished()
        self.latest.wait_until_finished()

    def close(self) -> None:
        self.best.close()
        self.latest.close()


def restore_params(path: str, target, what: str):
    """Restores the newest step under an orbax directory onto `target`'s structure."""
    mngr = ocp.CheckpointManager(os.path.abspath(path))
    step = mngr.latest_step()
    if step is None:
        raise UserError(f"{path}: holds no checkpoint")
    try:
        return mngr.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0][:200]
        raise UserError(f"{path}: {what} does not match this model config ({msg})") from None
    finally:
        mngr.close()


def restore(run_dir: str):
    """(params, model_cfg, tokenizer): the best parameters of a run."""
    cfg_dict, tok = read_meta(run_dir)
    model_cfg = model_config_from_dict(cfg_dict["model"])
    if model_cfg.vocab_size != len(tok):
        raise UserError(f"{run_dir}: config vocab_size {model_cfg.vocab_size} != tokenizer size {len(tok)}")
    _, abstract = model.abstract(model_cfg)
    params = restore_params(os.path.join(run_dir, "best"), abstract, "the best checkpoint")
    return params, model_cfg, tok
