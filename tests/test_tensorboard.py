"""TensorBoard's events (jaxsft/tensorboard_log.py), read back with TensorBoard's own reader:
the trained tiny run's are its metrics.jsonl, value for value, and its config; a resumed
session's replace the steps past its start. (Resumes after SIGKILL: test_reliability.py and
test_dpo.py check their events the same way; train.tensorboard: false writes none:
test_reliability.py's curriculum test.)"""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import yaml

from conftest import TINY_STEPS, assert_events_are_metrics, read_events
from jaxsft.tensorboard_log import TensorBoardLog


@pytest.mark.slow
def test_the_runs_events_are_its_metrics_and_config(trained_run):
    run_dir = trained_run["run_dir"]
    scalars = assert_events_are_metrics(run_dir)
    # every kind of record is there: training steps, evaluations, exact match (train.eval_exact)
    assert {"loss", "lr", "grad_norm", "tokens", "val_loss", "val_exact", "elapsed_s"} <= set(scalars)
    assert len(scalars["loss"]) == TINY_STEPS and "best" not in scalars
    _, texts = read_events(run_dir)
    assert [step for step, _ in texts] == [1]
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        assert yaml.safe_load(textwrap.dedent(texts[0][1])) == json.load(f)


def test_a_resumed_session_replaces_the_steps_past_its_start(tmp_path):
    """Two sessions in one directory, in one second, as a kill and --resume leave them: the first
    wrote steps 1-12 (evaluations at 10 and 12), the second resumed from the state at step 10.
    TensorBoard shows steps 1-10 of the first and 11-14 of the second, each once; each session's
    config at its first step. A nested mapping's numbers are tagged parent/child; a flag is none."""
    d = str(tmp_path / "tensorboard")
    first = TensorBoardLog(d, {"train": {"lr": 1e-3, "buckets": (32, 64)}})
    first.write([{"step": s, "loss": 1 / s, "tokens": 100 + s} for s in range(1, 11)])
    first.write([{"step": 10, "val_loss": 0.7, "best": True, "val_exact": {"算术": 0.25, "all": 0.5}}])
    first.write([{"step": s, "loss": 1 / s, "tokens": 100 + s} for s in (11, 12)])
    first.write([{"step": 12, "val_loss": 0.6, "best": True, "val_exact": {"算术": 0.5, "all": 0.75}}])
    # killed: never closed
    second = TensorBoardLog(d, {"train": {"lr": 2e-3, "buckets": (32, 64)}}, start=10)
    second.write([{"step": s, "loss": 2 / s, "tokens": 200 + s} for s in range(11, 15)])
    second.close()
    second.close()  # a second close is harmless (Trainer.close after a Ctrl-C)
    assert len(os.listdir(d)) == 2

    scalars, texts = read_events(tmp_path)
    f32 = lambda v: float(np.float32(v))  # noqa: E731  (an event holds a float32)
    assert scalars["loss"] == [(s, f32((1 if s <= 10 else 2) / s)) for s in range(1, 15)]
    assert scalars["tokens"] == [(s, (100 if s <= 10 else 200) + s) for s in range(1, 15)]
    assert scalars["val_loss"] == [(10, f32(0.7))]
    assert scalars["val_exact/算术"] == [(10, 0.25)] and scalars["val_exact/all"] == [(10, 0.5)]
    assert "best" not in scalars and "step" not in scalars
    assert [(s, yaml.safe_load(textwrap.dedent(t))) for s, t in texts] == [
        (1, {"train": {"lr": 1e-3, "buckets": [32, 64]}}), (11, {"train": {"lr": 2e-3, "buckets": [32, 64]}})]
