"""Checks of a loaded config against the registries, before any model loads: one clear line per error.

`rl/config.py` checks values, types and ranges while loading; what needs to know which algorithms,
rewards and policy families exist (a user may have registered their own) is checked here, with the
same file:line / --set locations.
"""
from __future__ import annotations

import inspect

from ..policies.registry import policy_families
from ..rewards.base import reward_types
from .algorithms import algorithms
from .config import Config, ConfigError, load_config
from .config_loader import source_of


def load_run_config(path, overrides: list[str] | None = None) -> Config:
    """`load_config` + `validate`: what `uniloop train` runs on."""
    cfg = load_config(path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config):
    """Raise ConfigError naming the file:line (or --set) of the first key that no registry accepts."""
    src = source_of(cfg)
    algos = algorithms()
    if cfg.algorithm not in algos:
        raise ConfigError(f"{src.where('algorithm')}: key 'algorithm' must be a registered algorithm "
                          f"{sorted(algos)}, got {cfg.algorithm!r}")
    families = policy_families()
    if cfg.model.family != "auto" and cfg.model.family not in families:
        raise ConfigError(f"{src.where('model.family')}: key 'model.family' must be `auto` or a registered policy "
                          f"family {sorted(families)}, got {cfg.model.family!r}")
    types = reward_types()
    for i, rc in enumerate(cfg.rewards):
        tname = rc.type or rc.name
        key = f"rewards[{i}].type" if rc.type else f"rewards[{i}].name"
        if tname not in types:
            raise ConfigError(f"{src.where(key)}: key '{key}' names no registered reward type: {tname!r}; "
                              f"registered: {sorted(types)}")
        try:  # the constructor's signature, without building the reward (no model loads here)
            inspect.signature(types[tname]).bind(**dict(rc.args))
        except TypeError as e:
            raise ConfigError(f"{src.where(f'rewards[{i}].args')}: key 'rewards[{i}].args' does not fit reward type "
                              f"{tname!r}: {e}") from None
