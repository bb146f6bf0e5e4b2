"""The sample -> score pipeline every online algorithm runs: requests in, scored batches out.

    pool.generate_stream(requests)  ->  chunk by chunk  ->  rewards.submit(chunk)  ->  merge  ->  mix
                                                                                   -> ScoredBatch per request

A pool is anything with `generate_stream(requests, version, num_chunks, next_requests)`, `sync`,
`metrics` and `close`: `InProcessPool` (the learner's own policy) or `RayWorkerPool` (actors with
their own copies). The pipeline knows nothing of the algorithm: advantages, pairs or any other use of
the rewards is the learner's business.
"""
from __future__ import annotations

import dataclasses
import math
import time

from ..policies.batches import ScoredBatch, concat_rollouts
from ..rewards.base import RewardContext, RewardMixture, merge_components
from .worker import RolloutRequest, RolloutWorker, Sampling


def sample_and_score(pool, rewards: RewardMixture, policy, requests: list[RolloutRequest], step: int,
                     num_chunks: int = 1, next_requests: list[RolloutRequest] | None = None):
    """Sample the step's rollouts chunk by chunk and start scoring each chunk as soon as it is sampled,
    so that async rewards (judges, reward actors) score chunk i while chunk i+1 samples.

    Chunks are contiguous runs of whole prompt groups with their own per-sample seeds; merged back,
    the batch and its rewards are those of sampling and scoring it in one piece. `next_requests` (the
    next step's) lets a one-step-off pool start sampling them now. Returns one ScoredBatch per request
    and the step's timing metrics.
    """
    context = RewardContext(policy=policy, step=step)
    pending, sampling, t0 = {}, 0.0, time.perf_counter()
    stream = pool.generate_stream(requests, policy.version, num_chunks, next_requests)
    while True:
        ts = time.perf_counter()
        item = next(stream, None)
        sampling += time.perf_counter() - ts
        if item is None:
            break
        ri, ci, batch = item
        pending[ri, ci] = rewards.submit(batch, context)  # async components return at once
    t1 = time.perf_counter()
    scored = []
    for ri in range(len(requests)):
        parts = [pending[k] for k in sorted(k for k in pending if k[0] == ri)]
        batch = concat_rollouts([p.batch for p in parts])
        if len(parts) > 1:  # a re-sampled chunk may carry an older version: report the oldest
            batch = dataclasses.replace(batch, version=min(p.batch.version for p in parts))
        mix = rewards.mix(batch, merge_components([p.result() for p in parts]))
        scored.append(ScoredBatch(batch, mix.total, mix.valid, mix.components))
    t2 = time.perf_counter()
    busy = rewards.pop_busy_seconds()
    times = {"time/rollout": sampling, "time/reward": (t1 - t0 - sampling) + (t2 - t1),
             "time/reward_wait": t2 - t1, "rollout/scoring_chunks": float(num_chunks)}
    times.update({f"time/reward/{name}": sec for name, sec in busy.items()})
    return scored, times


def scoring_chunks(configured: int, rewards: RewardMixture, requests: list[RolloutRequest], batch_size: int,
                   num_workers: int) -> int:
    """`rollout.scoring_chunks`, with 0 = one chunk per forward batch of every worker (at least 2) when a
    reward runs async: chunking then costs no batch efficiency."""
    if configured > 0:
        return configured
    if not rewards.has_async or not requests:
        return 1
    samples = max(len(r.prompts) * r.num_generations for r in requests)
    per_chunk = max(1, batch_size) * max(1, num_workers)
    return max(2, math.ceil(samples / per_chunk))


class InProcessPool:
    """The default engine: one worker in this process, sharing the learner's policy."""

    def __init__(self, worker: RolloutWorker):
        self.worker = worker

    def generate_stream(self, requests, version: int, num_chunks: int = 1, next_requests=None):
        """Yield (request index, chunk index, batch) as each chunk is sampled (nothing to prefetch:
        the learner and the sampler share one process)."""
        for ri, req in enumerate(requests):
            for ci, chunk in enumerate(req.split(num_chunks)):
                yield ri, ci, self.worker.generate(chunk)

    def generate(self, requests, version: int) -> list:
        return [self.worker.generate(r) for r in requests]

    def sync(self, policy, version: int):
        self.worker.set_adapter(None, version)

    def metrics(self) -> dict:
        return {}

    def close(self):
        pass


def make_pool(policy, spec, sampling: Sampling, settings, seed: int, ray_cfg=None, full_weights: bool = False):
    """Ray actors when `settings.num_workers` > 0 (each building its copy from the PolicySpec `spec`;
    `full_weights`: they are sent every trained tensor, not an adapter), else a worker in this process
    sharing `policy`. `settings`: num_workers, num_cpus_per_worker, num_gpus_per_worker, max_restarts,
    max_staleness, one_step_off, weight_bucket_mb (the `rollout` config section)."""
    if settings.num_workers > 0:
        from .ray_pool import RayWorkerPool  # Ray is imported only by runs that use it
        return RayWorkerPool(spec, sampling, settings, seed, ray_cfg, full_weights=full_weights)
    return InProcessPool(RolloutWorker(policy, sampling, seed, shares_learner_policy=True))
