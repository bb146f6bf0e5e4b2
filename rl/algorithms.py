"""Algorithm registry: `uniloop train` dispatches on `cfg.algorithm`.

An algorithm is a function `fn(cfg: Config, resume: bool) -> dict` (a summary of the run).
New algorithms plug in with `@register_algorithm("name")` without touching the CLI.
"""
from __future__ import annotations

import importlib

_ALGORITHMS: dict = {}

# Modules that register the built-in algorithms; imported lazily so `uniloop --help` stays fast.
_BUILTIN_MODULES = ["uniloop.rl.trainer", "uniloop.rl.dpo", "uniloop.rl.online_dpo",
                    "uniloop.rl.flow_grpo", "uniloop.rl.diffusion_dpo"]


def register_algorithm(name: str):
    def wrap(fn):
        _ALGORITHMS[name] = fn
        return fn
    return wrap


def algorithms() -> dict:
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real missing dependency inside the module: surface it
                raise
    return dict(_ALGORITHMS)


def get_algorithm(name: str):
    algos = algorithms()
    if name not in algos:
        raise ValueError(f"unknown algorithm {name!r}; available: {sorted(algos)}")
    return algos[name]
