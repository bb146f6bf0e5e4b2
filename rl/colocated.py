"""learner.mode colocated (verl's hybrid engine): the learner ranks sample the step's rollouts.

    driver: requests -> shard over the ranks -> each rank samples with the weights it trains -> reassemble
            -> score -> advantages -> update on the same ranks -> the driver loads rank 0's tensors

The sharding, reassembly in in-process row order, staleness check and metrics are the Ray rollout
pool's (rollouts/ray_pool.py); what differs is that the samplers are the trainers. After an update
they already hold the new weights (DDP ranks are equal), so a sync only tells them the new version:
no tensors move to samplers (sync/bytes 0), and no GPU holds a second copy of the policy for
sampling. A rank that dies stops the run as in split mode; --resume continues from the last
checkpoint.
"""
from __future__ import annotations

import dataclasses
import time

from ..rollouts.ray_pool import RayWorkerPool, _ActorSlot


class ColocatedPool(RayWorkerPool):
    def __init__(self, group, sampling, rollout_cfg, seed: int):
        """`group`: the LearnerGroup whose ranks sample; `sampling` and `seed`: as an in-process worker's."""
        self.group, self.ray_cfg, self.started_ray = group, None, False
        self.full_weights, self._full_source = False, None  # nothing is sent: the ranks hold the weights
        self.rc = dataclasses.replace(rollout_cfg, max_restarts=0, one_step_off=False)
        infos = group._get([h.set_sampling.remote(sampling, seed) for h in group.ranks])
        self.slots = [_ActorSlot(i, h, info["pid"], info["node_id"])
                      for i, (h, info) in enumerate(zip(group.ranks, infos))]
        self.version, self.box, self.restarts = 0, [None], 0
        self._sync_stats, self._pending_acks, self._last, self._prefetch = {}, None, {}, None

    def sync(self, policy, version: int):
        """The ranks trained the weights they sample with: they only learn the new version."""
        t0 = time.perf_counter()
        self.group._get([h.set_version.remote(version) for h in self.group.ranks])
        self.version = version
        self._sync_stats = {"sync/bytes": 0.0, "sync/seconds": time.perf_counter() - t0}

    def _recover(self, index: int, err: BaseException):
        raise RuntimeError(f"learner rank {index} died while sampling ({err.__class__.__name__}); restart the run "
                           f"with --resume: it continues from the last checkpoint on any number of ranks") from err

    def close(self):  # the ranks belong to the LearnerGroup, which closes them
        self._cancel_prefetch()
        self.slots = []
