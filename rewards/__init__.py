"""Rewards: the interface, a registry, a weighted mixture, and the built-in rewards."""
from .base import (Reward, RewardContext, RewardError, RewardMixture, RewardOutput, RewardSpec,
                   register_reward, reward_types)

__all__ = ["Reward", "RewardContext", "RewardError", "RewardMixture", "RewardOutput", "RewardSpec",
           "register_reward", "reward_types"]
