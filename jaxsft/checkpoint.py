"""Checkpoints with orbax: the best parameters by validation loss, and the
latest full training state for --resume, in two separate managers so keeping
the best never evicts the latest.

A run directory holds:

    config.json      the full config (model section with vocab_size)
    tokenizer.json   the vocabulary (characters, or an imported model's own tokenizer)
    best/<step>/     parameters with the lowest validation loss so far
    latest/<step>/   parameters, optimizer state, step, best validation loss

Scripts restore a usable model in one call:

    params, model_cfg, tok = jaxsft.checkpoint.restore("runs/default")
"""
from __future__ import annotations

import json
import logging
import os

import jax
import orbax.checkpoint as ocp

from . import model
from .config import ModelConfig, UserError, model_config_from_dict, to_dict
from .files import write_json
from .tokenizer import AnyTokenizer, load as load_tokenizer


def write_meta(run_dir: str, cfg, tok: AnyTokenizer) -> None:
    """config.json and tokenizer.json beside the checkpoints (process 0 only)."""
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "config.json"), to_dict(cfg), indent=2)
    tok.save(os.path.join(run_dir, "tokenizer.json"))


def read_meta(run_dir: str) -> tuple[dict, AnyTokenizer]:
    cfg_path = os.path.join(run_dir, "config.json")
    tok_path = os.path.join(run_dir, "tokenizer.json")
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run directory")
    if not os.path.isfile(cfg_path) or not os.path.isfile(tok_path):
        raise UserError(f"{run_dir}: not a jaxsft run (config.json or tokenizer.json missing)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        tok = load_tokenizer(tok_path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{run_dir}: unreadable run metadata ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise UserError(f"{cfg_path}: unreadable run metadata (no 'model' section)")
    return cfg, tok


class RunCheckpoints:
    """The two orbax managers of a run directory."""

    def __init__(self, run_dir: str):
        run_dir = os.path.abspath(run_dir)
        # a save is written to "<step>.orbax-checkpoint-tmp-*" and renamed when complete, so a killed
        # process leaves the previous checkpoint readable; cleanup_tmp_directories removes the debris
        self.best = ocp.CheckpointManager(
            os.path.join(run_dir, "best"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["val_loss"], best_mode="min",
                                                 cleanup_tmp_directories=True))
        self.latest = ocp.CheckpointManager(
            os.path.join(run_dir, "latest"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, cleanup_tmp_directories=True))
        # an older step is deleted only after the newer one is committed, so the newest is always
        # whole; older ones are what a kill during that deletion left half-removed
        for mngr in (self.best, self.latest):
            for step in sorted(mngr.all_steps())[:-1]:
                mngr.delete(step)

    def save_best(self, step: int, params, val_loss: float) -> None:
        if step in self.best.all_steps():
            # a run killed between its best and latest saves at this step, now resumed:
            # the same step gives the same parameters, and orbax refuses to overwrite
            return
        self.best.save(step, args=ocp.args.StandardSave(params), metrics={"val_loss": float(val_loss)})

    def save_latest(self, step: int, state: dict) -> None:
        """state: {"params", "opt_state", "step", "best_val_loss"} (a pytree of arrays)."""
        self.latest.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore_latest(self, target: dict) -> dict | None:
        """The newest training state onto `target`'s structure, or None when none was saved yet."""
        step = self.latest.latest_step()
        if step is None:
            return None
        what = "the saved training state"
        check_shapes(os.path.join(self.latest.directory, str(step)), target, what)
        try:
            return self.latest.restore(step, args=ocp.args.StandardRestore(target))
        except (ValueError, KeyError, TypeError) as e:
            msg = str(e).splitlines()[0][:200]
            raise UserError(f"{self.latest.directory}: {what} does not match this config ({msg})") from None

    def wait(self) -> None:
        self.best.wait_until_finished()
        self.latest.wait_until_finished()

    def close(self) -> None:
        """Waits for saves in flight and releases the managers (a second call does nothing)."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self.best.close()
            self.latest.close()


def _leaf_name(path) -> str:
    """A pytree path as orbax names the stored array, e.g. "blocks.0.attn.wq.kernel.value"."""
    parts = []
    for k in path:
        parts.append(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a))))
    return ".".join(parts)


def check_shapes(step_dir: str, target, what: str) -> None:
    """UserError naming the first array whose stored shape differs from `target`'s, before any
    array is read (a failed orbax restore leaves its pending reads behind)."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # reading an item directory's metadata warns that the step's own file is elsewhere
    try:
        with ocp.StandardCheckpointer() as c:  # (a relative path reads as an empty tree)
            meta = c.metadata(os.path.abspath(os.path.join(step_dir, "default"))).item_metadata
    finally:
        absl.setLevel(level)
    stored = {m.name: tuple(m.shape) for m in jax.tree.leaves(meta) if hasattr(m, "name")}
    if not stored:
        return  # metadata in a form this version does not know: orbax's restore checks instead
    wanted = {_leaf_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(target)}
    for name in sorted(stored.keys() | wanted.keys()):
        if stored.get(name) != wanted.get(name):
            raise UserError(f"{step_dir}: {what} does not match this model config ({name}: stored "
                            f"{stored.get(name, 'nothing')}, the config needs {wanted.get(name, 'nothing')})")


def restore_params(path: str, target, what: str):
    """Restores the newest step under an orbax directory onto `target`'s structure."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: holds no checkpoint")
    mngr = ocp.CheckpointManager(os.path.abspath(path), options=ocp.CheckpointManagerOptions(create=False))
    step = mngr.latest_step()
    if step is None:
        raise UserError(f"{path}: holds no checkpoint")
    try:
        check_shapes(os.path.join(path, str(step)), target, what)
        return mngr.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0][:200]
        raise UserError(f"{path}: {what} does not match this model config ({msg})") from None
    finally:
        mngr.close()


def restore(run_dir: str, shardings=None):
    """(params, model_cfg, tokenizer): the best parameters of a run.

    shardings: a pytree of jax Shardings shaped like the parameters (e.g.
    parallel.param_shardings(params, mesh)) to restore onto a mesh; by default
    every array lands on this process's first device. Either way the run may
    have been saved on any number of devices.
    """
    cfg_dict, tok = read_meta(run_dir)
    model_cfg = model_config_from_dict(cfg_dict["model"])
    if model_cfg.vocab_size != len(tok):
        raise UserError(f"{run_dir}: config vocab_size {model_cfg.vocab_size} != tokenizer size {len(tok)}")
    _, abstract = model.abstract(model_cfg)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = restore_params(os.path.join(run_dir, "best"), abstract, "the best checkpoint")
    return params, model_cfg, tok
