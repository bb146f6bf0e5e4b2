"""Rewards: the interface, a registry, a weighted mixture, and the built-in rewards.

Importing the package registers every built-in reward type (the modules below), so `reward_types()`
lists them whichever module of the package is imported first.
"""
from . import builtin, clip, judges, ray_actor, rules, self_understanding, understanding_model  # noqa: F401
from . import aesthetic, detector, hps, image_reward, ocr, pickscore  # noqa: F401  (model-based image rewards)
from .base import (Reward, RewardContext, RewardError, RewardMixture, RewardOutput, RewardSpec,
                   register_reward, reward_types)

__all__ = ["Reward", "RewardContext", "RewardError", "RewardMixture", "RewardOutput", "RewardSpec",
           "register_reward", "reward_types"]
