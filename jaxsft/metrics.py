"""metrics.jsonl: one JSON object per training step or evaluation, written here
and read back here (curves, tests, scripts).

    {"step": 10, "loss": 2.31, "lr": 0.001, "grad_norm": 0.8, "tokens": 412}   a training step
    {"step": 250, "val_loss": 1.92, "best": true, "elapsed_s": 31.4}         an evaluation
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .files import atomic


class MetricsLog:
    """Appends records to a run's metrics.jsonl. On resume (keep_until=step) the
    lines after the resumed step are dropped first: they belong to the lost future."""

    def __init__(self, path: str, keep_until: Optional[int] = None):
        self.path = path
        if keep_until is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                kept = [l.rstrip("\n") + "\n" for l in f if (s := step_of(l)) is not None and s <= keep_until]
            with atomic(path) as f:  # a kill now leaves the old file or the new one
                f.writelines(kept)
        elif keep_until is None:
            open(path, "w").close()

    def write(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    def close(self) -> None:
        """(each write closes the file)"""


class Tee:
    """Records written to several logs at once (metrics.jsonl, TensorBoard's events): the
    trainer writes each record once, wherever it goes."""

    def __init__(self, logs: list):
        self.logs = logs

    def write(self, records: list[dict]) -> None:
        for log in self.logs:
            log.write(records)

    def close(self) -> None:
        for log in self.logs:
            log.close()


class NullLog:
    """What processes other than 0 write: nothing."""

    def write(self, records: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


def step_of(line: str) -> Optional[int]:
    """The step of a metrics.jsonl line; None for a line torn by a killed process."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a metrics.jsonl; a torn line is skipped."""
    train, val = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in r:
                train.append(r)
            elif "val_loss" in r:
                val.append(r)
    return train, val
