"""curves.png: what is drawn, how the file is written, and that training writes it."""
import json
import os
import re

import numpy as np
import pytest

from conftest import QA, TINY_REPEATS, TINY_STEPS, TINY_YAML
from jaxsft.plots import draw, moving_average, read_metrics, smoothing_window, write_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, n_steps=40, eval_at=(10, 20, 30, 40), val=(2.0, 1.5, 1.7, 1.2), torn=False):
    """Training records with loss 3 - step/20 and lr = step / 1000, and evaluations."""
    lines = []
    best = float("inf")
    for s in range(1, n_steps + 1):
        lines.append({"step": s, "loss": 3 - s / 20, "lr": s / 1000, "grad_norm": 1.0, "tokens": 50})
        if s in eval_at:
            v = val[eval_at.index(s)]
            lines.append({"step": s, "val_loss": v, "best": v < best})
            best = min(best, v)
    text = "".join(json.dumps(r) + "\n" for r in lines) + ('{"step": 41, "lo' if torn else "")
    path.write_text(text, encoding="utf-8")


def test_moving_average_and_window():
    np.testing.assert_allclose(moving_average(np.array([1.0, 2.0, 3.0, 6.0]), 2), [1.5, 2.5, 4.5])
    assert [smoothing_window(n) for n in (1, 9, 10, 50, 100, 5000)] == [1, 1, 2, 10, 20, 20]


def test_read_metrics_splits_records_and_skips_a_torn_line(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", torn=True)
    train, val = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 41))
    assert [(r["step"], r["val_loss"], r["best"]) for r in val] == [
        (10, 2.0, True), (20, 1.5, True), (30, 1.7, False), (40, 1.2, True)]


def test_draw_plots_every_point(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    train, val = read_metrics(tmp_path / "metrics.jsonl")
    ax_loss, ax_val, ax_lr = draw(train, val).axes
    raw, smooth = ax_loss.lines
    np.testing.assert_allclose(raw.get_xdata(), np.arange(1, 41))
    np.testing.assert_allclose(raw.get_ydata(), 3 - np.arange(1, 41) / 20)
    # window 8 over a straight line: the mean of steps s-7..s is the value at s - 3.5
    np.testing.assert_allclose(smooth.get_xdata(), np.arange(8, 41))
    np.testing.assert_allclose(smooth.get_ydata(), 3 - (np.arange(8, 41) - 3.5) / 20)
    curve, best = ax_val.lines
    assert list(curve.get_xdata()) == [10, 20, 30, 40] and list(curve.get_ydata()) == [2.0, 1.5, 1.7, 1.2]
    assert list(best.get_xdata()) == [10, 20, 40]  # 30 did not improve
    np.testing.assert_allclose(ax_lr.lines[0].get_ydata(), np.arange(1, 41) / 1000)
    assert [a.get_title() for a in (ax_loss, ax_val, ax_lr)] == ["SFT Training Loss", "SFT Val Loss", "Learning Rate"]


def test_a_dpo_run_gets_a_rewards_panel():
    train = [{"step": s, "loss": 0.7, "lr": 1e-4, "rewards/chosen": s / 10, "rewards/rejected": -s / 10}
             for s in range(1, 41)]
    val = [{"step": s, "val_loss": 0.5, "val_rewards/accuracy": s / 40, "best": True} for s in (20, 40)]
    fig = draw(train, val)
    ax_loss, ax_val, ax_lr, ax_rw, ax_acc = fig.axes  # the accuracy on the rewards panel's twin axis
    assert [a.get_title() for a in (ax_loss, ax_val, ax_rw)] == ["DPO Training Loss", "DPO Val Loss", "Rewards"]
    chosen, rejected = ax_rw.lines
    np.testing.assert_allclose(chosen.get_xdata(), np.arange(8, 41))  # window 8, as for the loss
    np.testing.assert_allclose(chosen.get_ydata(), (np.arange(8, 41) - 3.5) / 10)
    np.testing.assert_allclose(rejected.get_ydata(), -(np.arange(8, 41) - 3.5) / 10)
    assert list(ax_acc.lines[0].get_xdata()) == [20, 40] and list(ax_acc.lines[0].get_ydata()) == [0.5, 1.0]


def test_write_curves_writes_a_png_atomically(tmp_path):
    assert write_curves(str(tmp_path)) is None  # no metrics.jsonl yet
    write_metrics(tmp_path / "metrics.jsonl", torn=True)
    out = write_curves(str(tmp_path))
    assert out == os.path.join(tmp_path, "curves.png")
    with open(out, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    import matplotlib.image
    assert matplotlib.image.imread(out).shape[:2] == (400, 1500)  # 15 x 4 inches at 100 dpi
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "metrics.jsonl"]  # no .tmp left behind


@pytest.mark.slow
def test_training_writes_curves_and_every_point(trained_run):
    run_dir = trained_run["run_dir"]
    train, val = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    per_epoch = -(-len(QA) * TINY_REPEATS // int(re.search(r"batch_size: (\d+)", TINY_YAML)[1]))
    assert [r["step"] for r in train] == list(range(1, TINY_STEPS + 1))
    # one evaluation per epoch, and one at the last step
    assert [r["step"] for r in val] == sorted(set(range(per_epoch, TINY_STEPS + 1, per_epoch)) | {TINY_STEPS})
    assert set(train[0]) == {"step", "loss", "lr", "grad_norm", "tokens"}
    assert set(val[0]) == {"step", "val_loss", "best", "val_exact", "elapsed_s"}  # the run sets train.eval_exact
    with open(os.path.join(run_dir, "curves.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert not os.path.exists(os.path.join(run_dir, "curves.png.tmp"))
