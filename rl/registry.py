"""The algorithm registry: `uniloop train` runs the trainer class its config's `algorithm` names.

    @register_algorithm("my_algo")
    class MyTrainer(Trainer):              # rl/trainer.py
        def train_step(self) -> StepResult: ...

`algorithm: my_algo` in a recipe then runs it through the shared loop (rl/loop.py); config validation
(rl/validate.py) asks this registry, so a registered algorithm is accepted like a built-in one.
"""
from __future__ import annotations

import functools
from typing import Callable

from ..policies.registry import Registry
from .loop import train

_ALGORITHMS = Registry("algorithm", name_attr="algorithm_name")
register_algorithm = _ALGORITHMS.register  # class decorator on a Trainer subclass: `algorithm: <name>`


def registered_algorithms() -> dict[str, type]:
    return dict(_ALGORITHMS)


def get_algorithm(name: str) -> Callable:
    """`fn(cfg, resume=False) -> summary` running the trainer registered as `name`."""
    return functools.partial(train, trainer_cls=_ALGORITHMS.lookup(name))
