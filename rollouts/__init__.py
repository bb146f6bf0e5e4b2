"""Rollouts: workers that sample from a policy, the sample -> score pipeline, Ray pools, rollout jobs."""
from .worker import RolloutRequest, RolloutWorker, Sampling, sample_seed

__all__ = ["RolloutRequest", "RolloutWorker", "Sampling", "sample_seed"]
