"""Rollout workers (in-process here; Ray actors wrap the same class)."""
from .worker import RolloutRequest, RolloutWorker, make_policy, sample_seed

__all__ = ["RolloutRequest", "RolloutWorker", "make_policy", "sample_seed"]
