"""TensorBoard event files beside metrics.jsonl: every number of every record the trainer
writes, at the record's step and under the record's key (loss, lr, grad_norm, val_loss,
val_exact, rewards/margin, ...), and the run's config as text. Written with tensorboardX (no
TensorFlow) into RUN_DIR/tensorboard/; `tensorboard --logdir runs/` shows every run.

    {"step": 250, "val_loss": 1.92, "best": true}  ->  scalar val_loss = 1.92 at step 250

A flag (best) or a string is not a figure and is left out; a nested mapping's numbers get
the tag parent/child. TensorBoard keeps a scalar as float32: readers get each value rounded
to the nearest float32.

Each session (a new run, or a --resume from step S) starts an event file of its own with a
restart marker at step S + 1: TensorBoard's reader then drops the steps past S that an
earlier session wrote (metrics.jsonl drops the same lines: metrics.MetricsLog). Its fast
loader (the default of `tensorboard`) ignores the marker; it drops a tag's points from the
step a later event of that tag has, so the resumed run's own events replace them as it goes.
"""
from __future__ import annotations

import json
import os
import sys
import time

import yaml

from .config import UserError


class TensorBoardLog:
    """Appends records to an event file in `log_dir` (a new file per session), flushed at
    each write, as metrics.jsonl's lines are: the trainer writes every 10 steps and at each
    evaluation and save, so a kill loses no event before the resume point.

    tensorboardX's SummaryWriter is not used: it queues events for a thread and its flush()
    does not wait for that queue (of 200 scalars added, then flushed, a process ending at
    once left 190 on disk). Its EventsWriter writes them in this thread."""

    def __init__(self, log_dir: str, config: dict, start: int = 0):
        Event, EventsWriter, SessionLog, summary = _tensorboardx()
        self._event, self._summary = Event, summary
        os.makedirs(log_dir, exist_ok=True)
        # files are read in name order: <seconds>.<host>, then nanoseconds, for two sessions in one second
        self.writer = EventsWriter(os.path.join(log_dir, "events"), f".{time.time_ns() % 10**9:09d}")
        self.closed = False
        # a restart: the reader drops every event an earlier session wrote at a step > start
        self.writer.write_event(Event(wall_time=time.time(), step=start + 1,
                                      session_log=SessionLog(status=SessionLog.START)))
        self._add(start + 1, summary.text("config", config_text(config)))
        self.writer.flush()

    def write(self, records: list[dict]) -> None:
        for r in records:
            for tag, value in scalars(r):
                self._add(r["step"], self._summary.scalar(tag, value))
        self.writer.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    def _add(self, step: int, summary) -> None:
        self.writer.write_event(self._event(wall_time=time.time(), step=step, summary=summary))


def scalars(record: dict, prefix: str = ""):
    """(tag, value) of each number of a metrics record: its key (parent/child inside a
    nested mapping); step is the x axis, not a figure; flags and strings are left out."""
    for k, v in record.items():
        tag = prefix + str(k)
        if isinstance(v, dict):
            yield from scalars(v, tag + "/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and tag != "step":
            yield tag, v


def config_text(config: dict) -> str:
    """The config as YAML, indented 4 spaces: TensorBoard's text tab renders Markdown,
    where that is a code block."""
    plain = json.loads(json.dumps(config))  # tuples as lists, as config.json holds them
    text = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
    return "\n".join("    " + line for line in text.splitlines())


def _tensorboardx():
    """tensorboardX's event writer, summaries and protos. Its package imports torch whenever
    torch is installed, only to accept torch tensors: 1.4 s and 180 MB in a JAX process that
    never makes one. torch is hidden while it loads (tensorboardX expects an ImportError)."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None
    try:
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
    except ImportError as e:
        raise UserError(f"train.tensorboard: {e}; pip install tensorboardX, or set train.tensorboard: false") from None
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return Event, EventsWriter, SessionLog, summary
