"""`Parts`: the model a run trains, split by what trains.

Full fine-tuning trains every parameter: `full(graphdef, params)`, whose frozen part holds no
array. A transform of the model (lora.py's `transform`) gives another split: its own graphdef,
the few parameters that train, and a frozen rest. The train step (steps.make_train_step)
differentiates `combine(frozen, trainable)` with respect to `trainable` alone; the optimizer
state and the checkpoints hold `trainable`; evaluation and sampling see `plain_graphdef` on
the parameters `for_eval` gives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import jax


def keep_trainable(frozen, trainable):
    """combine of full fine-tuning: the trained parameters are the model's."""
    return trainable


@dataclass(frozen=True)
class Parts:
    graphdef: Any  # the model the train step runs on combine(frozen, trainable)
    trainable: Any  # what the gradient, the optimizer and the checkpoints see (TrainState.params)
    frozen: Any  # a constant of every step (never donated nor saved); {} when every parameter trains
    plain_graphdef: Any  # the plain model (evaluation, sampling)
    combine: Callable = keep_trainable  # (frozen, trainable) -> the parameters graphdef runs, inside the step
    merge: Optional[Callable] = None  # (frozen, trainable) -> plain_graphdef's parameters; None: trainable are
    notes: tuple[str, ...] = field(default=())  # lines the trainer logs about the split

    def for_eval(self, frozen, out_shardings=None) -> Callable:
        """trainable -> the plain model's parameters, with `frozen` as placed on the mesh (the merge
        jitted once, its output laid out as out_shardings says; by default as the frozen arrays are,
        which fits a frozen tree shaped like the plain model's: not a quantised one)."""
        if self.merge is None:
            return lambda trainable: trainable
        if out_shardings is None:
            out_shardings = jax.tree.map(lambda a: a.sharding, frozen)
        merge = jax.jit(self.merge, out_shardings=out_shardings)
        return lambda trainable: merge(frozen, trainable)


def full(graphdef, params) -> Parts:
    """Every parameter trains."""
    return Parts(graphdef, params, {}, graphdef)
