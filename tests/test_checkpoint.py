"""Checkpoints: best-by-validation save and one-call restore, latest state round
trip, and the errors a user sees for a wrong directory."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft import checkpoint, model, runs, steps
from jaxsft.config import Config, ModelConfig, TrainConfig, UserError
from jaxsft.tokenizer import Tokenizer

apply = jax.jit(lambda graphdef, params, tokens: model.apply(graphdef, params, tokens)[0], static_argnums=0)


@pytest.fixture(scope="module")
def tok(qa):
    return Tokenizer.build([t for pair in qa for t in pair] + ["\n"])


@pytest.fixture(scope="module")
def cfg(tok):
    return ModelConfig(vocab_size=len(tok), max_seq_len=32, d_model=32, n_heads=2, n_layers=1, d_ff=64,
                       dropout=0.0)


def _params(cfg, seed):
    return model.init(cfg, seed)


def _tokens(tok):
    return jnp.asarray([tok.encode("什么是机器学习？你好"), tok.encode("天空是什么颜色？1+")], jnp.int32)


def _save_run(run_dir, cfg, tok, saves):
    """Writes meta and saves (step, params, val_loss) in order as 'best' checkpoints."""
    checkpoint.write_meta(str(run_dir), Config(model=cfg, out_dir=str(run_dir)), tok)
    ck = checkpoint.RunCheckpoints(str(run_dir))
    for step, params, val_loss in saves:
        ck.save_best(step, params, val_loss)
    ck.wait()
    ck.close()


def test_save_best_then_restore_gives_identical_logits(tmp_path, cfg, tok):
    graphdef, params = _params(cfg, 0)
    _save_run(tmp_path / "run", cfg, tok, [(5, params, 1.25)])
    assert sorted(os.listdir(tmp_path / "run")) == ["best", "config.json", "latest", "tokenizer.json"]
    restored, model_cfg, tok2 = runs.restore(str(tmp_path / "run"))
    assert model_cfg == cfg
    assert tok2.itos == tok.itos
    x = _tokens(tok)
    np.testing.assert_array_equal(apply(graphdef, restored, x), apply(graphdef, params, x))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), jax.tree.map(np.asarray, params))


def test_best_is_the_lowest_validation_loss(tmp_path, cfg, tok):
    graphdef, a = _params(cfg, 1)
    _, b = _params(cfg, 2)
    _save_run(tmp_path / "run", cfg, tok, [(1, a, 2.0), (2, b, 1.0), (3, a, 3.0)])
    restored, _, _ = runs.restore(str(tmp_path / "run"))
    x = _tokens(tok)
    np.testing.assert_array_equal(apply(graphdef, restored, x), apply(graphdef, b, x))


def _leaves_bytes(tree) -> dict:
    """{path: (dtype, shape, bytes)} of every array in a pytree: equal means bitwise equal."""
    return {jax.tree_util.keystr(k): (np.asarray(v).dtype, np.shape(v), np.asarray(v).tobytes())
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_latest_state_round_trip(tmp_path, cfg):
    """The full training state comes back bit for bit: step, parameters and the optimizer state
    (Adam's moments and step counts, after one update so that they are not their zero start)."""
    _, params = _params(cfg, 3)
    tx = steps.make_optimizer(TrainConfig(), 10)
    _, opt_state = jax.jit(tx.update)(params, tx.init(params), params)  # the parameters as a gradient: any nonzero one
    state = {"state": steps.TrainState(jnp.int32(7), params, opt_state), "best_val_loss": jnp.float32(0.5)}
    ck = checkpoint.RunCheckpoints(str(tmp_path))
    ck.save_latest(7, state)
    ck.wait()
    target = {"state": steps.TrainState.create(jax.tree.map(jnp.zeros_like, params), tx),
              "best_val_loss": jnp.float32(0)}
    assert _leaves_bytes(target["state"].opt_state) != _leaves_bytes(opt_state)  # a restore must change it
    back = ck.restore_latest(target)
    ck.close()
    got, saved = _leaves_bytes(back), _leaves_bytes(state)
    assert got.keys() == saved.keys()
    assert [k for k in saved if got[k] != saved[k]] == []  # the paths of any leaf that differs


def test_restore_empty_directory_raises(tmp_path):
    with pytest.raises(UserError, match="not a jaxsft run"):
        runs.restore(str(tmp_path))
    with pytest.raises(UserError, match="no such run directory"):
        runs.restore(str(tmp_path / "missing"))


def test_restore_without_checkpoint_raises(tmp_path, cfg, tok):
    checkpoint.write_meta(str(tmp_path), Config(model=cfg), tok)
    with pytest.raises(UserError, match="holds no checkpoint"):
        runs.restore(str(tmp_path))


def test_restore_with_other_model_config_raises(tmp_path, cfg, tok):
    _, params = _params(cfg, 0)
    _save_run(tmp_path, cfg, tok, [(1, params, 1.0)])
    bigger = ModelConfig(**{**cfg.__dict__, "d_model": 64})
    checkpoint.write_meta(str(tmp_path), Config(model=bigger), tok)
    with pytest.raises(UserError, match="does not match"):
        runs.restore(str(tmp_path))
