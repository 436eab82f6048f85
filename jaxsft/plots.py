"""curves.png: the seed's Part 5 figure, drawn from a run's metrics.jsonl.

metrics.jsonl (`jaxsft.metrics`) holds one JSON object per line, so anyone can re-plot:

    {"step": 10, "loss": 2.31, "lr": 0.001, "grad_norm": 0.8, "tokens": 412}   a training step
    {"step": 250, "val_loss": 1.92, "best": true}                             an evaluation

Three panels: training loss per step with a moving average, validation loss
per evaluation (best marked), learning rate per step; a DPO run (its records hold
rewards/chosen) has a fourth: the chosen and rejected answers' rewards (moving
averages) and the validation preference accuracy. Uses matplotlib's Agg
canvas directly (no pyplot, no global backend) and replaces the file
atomically, so a viewer never sees half a PNG.

    python -m jaxsft.plots runs/default    # redraw runs/default/curves.png
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np

from .files import atomic
from .metrics import read_metrics


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """x (N,) -> (N - window + 1,): mean of each run of `window` values (the seed's np.convolve)."""
    return np.convolve(x, np.ones(window) / window, mode="valid")


def smoothing_window(n: int) -> int:
    """The seed's window of 20 steps, shrunk for short runs (1: no smoothed line)."""
    return max(1, min(20, n // 5))


def draw(train: list[dict], val: list[dict]):
    """A matplotlib Figure with the three panels (axes: training loss, validation loss, lr), and
    DPO's rewards as a fourth."""
    from matplotlib.figure import Figure

    dpo = any("rewards/chosen" in r for r in train)
    fig = Figure(figsize=(20 if dpo else 15, 4), layout="tight")
    axes = fig.subplots(1, 4 if dpo else 3, sharex=True)  # one step axis for all
    ax_loss, ax_val, ax_lr = axes[:3]
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train])
        ax_loss.plot(steps, loss, "b-", alpha=0.4, linewidth=1, label="per step")
        w = smoothing_window(len(loss))
        if w > 1:
            ax_loss.plot(steps[w - 1:], moving_average(loss, w), "r-", linewidth=2, label=f"mean of {w}")
        ax_loss.legend()
        ax_lr.plot(steps, [r["lr"] for r in train], "m-")
    if val:
        ax_val.plot([r["step"] for r in val], [r["val_loss"] for r in val], "g-o", linewidth=2, label="validation")
        best = [r for r in val if r.get("best")]
        if best:
            ax_val.plot([r["step"] for r in best], [r["val_loss"] for r in best], "k*", markersize=10,
                        label="new best")
        ax_val.legend()
    panels = [(ax_loss, f"{'DPO' if dpo else 'SFT'} Training Loss", "Loss"),
              (ax_val, f"{'DPO' if dpo else 'SFT'} Val Loss", "Loss"), (ax_lr, "Learning Rate", "lr")]
    if dpo:
        panels.append((_rewards(axes[3], train, val), "Rewards", "beta * log-ratio"))
    for ax, title, ylabel in panels:
        ax.set_title(title)
        ax.set_xlabel("Step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def _rewards(ax, train: list[dict], val: list[dict]):
    """DPO's panel: the chosen and rejected rewards per step (moving averages), the validation
    preference accuracy on a second axis."""
    steps = np.array([r["step"] for r in train])
    w = smoothing_window(len(steps))
    for key, style in (("rewards/chosen", "g-"), ("rewards/rejected", "r-")):
        y = np.array([r[key] for r in train])
        ax.plot(steps[w - 1:], moving_average(y, w), style, linewidth=2, label=key.split("/")[1])
    ax.legend(loc="upper left")
    scored = [r for r in val if "val_rewards/accuracy" in r]
    if scored:
        acc = ax.twinx()
        acc.plot([r["step"] for r in scored], [r["val_rewards/accuracy"] for r in scored], "k--o", label="val accuracy")
        acc.set_ylim(0, 1.05)
        acc.legend(loc="lower right")
    return ax


def write_curves(run_dir: str) -> Optional[str]:
    """Draws run_dir/metrics.jsonl into run_dir/curves.png; returns its path (None without metrics)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    train, val = read_metrics(path)
    if not train and not val:
        return None
    out = os.path.join(run_dir, "curves.png")
    with atomic(out, "wb") as f:
        draw(train, val).savefig(f, format="png", dpi=100)
    return out

if __name__ == "__main__":
    for d in sys.argv[1:] or ["runs/default"]:
        print(write_curves(d) or f"{d}: no metrics.jsonl")
