"""Algorithm registry: `uniloop train` dispatches on `cfg.algorithm`.

An algorithm is a function `fn(cfg: Config, resume: bool) -> dict` (a summary of the run).
New algorithms plug in with `@register_algorithm("name")` without touching the CLI.
"""
from __future__ import annotations

import functools
import importlib

_ALGORITHMS: dict = {}

# Modules that register the built-in algorithms; imported lazily so `uniloop --help` stays fast.
_BUILTIN_MODULES = ["uniloop.rl.trainer", "uniloop.rl.dpo", "uniloop.rl.online_dpo",
                    "uniloop.rl.flow_grpo", "uniloop.rl.diffusion_dpo"]


def register_algorithm(name: str):
    """Register `fn(cfg, resume)`. The registered entry first moves an earlier run in cfg.output_dir
    aside when this one is not a resume (`runlog.prepare_run_dir`): runs never mix their files."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(cfg, resume: bool = False):
            from .runlog import prepare_run_dir
            prepare_run_dir(cfg.output_dir, resume)
            return fn(cfg, resume=resume)
        _ALGORITHMS[name] = run
        return run
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
