"""Reward actors: a reward model that needs its own device (a CLIP, a judge VLM) runs in a Ray actor.

Config:

    rewards:
      - name: clip
        type: ray_actor
        args: {reward: clip, args: {model: ViT-B-32, pretrained: /ckpt.bin}, num_gpus: 0.5}

The wrapped reward is built inside the actor from the registry (`reward` = its registered type,
`args` = its constructor arguments), so its weights live on the actor's device only. The driver sends
each rollout batch and gets `RewardOutput`s back. The actor gets no policy (`context.policy` is None):
rewards that judge with the trained policy itself (self_understanding) must stay in-process.

Faults: Ray restarts a dead reward actor (`max_restarts`), its `__init__` rebuilds the reward, and
the batch is scored again; after `max_restarts` restarts the run stops with an error naming the reward.
"""
from __future__ import annotations

import os

from .actors import init_ray, wait_for_restart
from .base import Reward, RewardContext, RewardOutput, register_reward, reward_types


class _RewardActorBody:
    """Body of the Ray actor: one reward built from the registry."""

    def __init__(self, reward_type: str, args: dict, num_threads: int):
        import torch
        torch.set_num_threads(max(1, num_threads))
        types = reward_types()
        self.reward = types[reward_type](**args)

    def pid(self) -> int:
        return os.getpid()

    def modalities(self) -> tuple:
        return tuple(self.reward.modalities)

    def score(self, batch, step: int) -> RewardOutput:
        return self.reward.score(batch, RewardContext(policy=None, step=step))

    def close(self):
        self.reward.close()


@register_reward("ray_actor")
class RayActorReward(Reward):
    """Runs the registered reward `reward` (with constructor `args`) in a Ray actor with its own
    resources (`num_gpus`, fractions allowed; `num_cpus`). Starts a local Ray if none is running."""

    run_async = True  # the work happens in the actor; the driver only waits

    def __init__(self, reward: str, args: dict | None = None, num_gpus: float = 0.0, num_cpus: float = 1.0,
                 max_restarts: int = 3):
        types = reward_types()
        if reward not in types or reward == "ray_actor":
            raise ValueError(f"ray_actor: unknown reward type {reward!r}; registered: "
                             f"{sorted(t for t in types if t != 'ray_actor')}")
        import ray

        self.started_ray = init_ray(None)
        self.reward_type, self.max_restarts, self.restarts = reward, max_restarts, 0
        # the class declares its modalities; the mixture asks before any batch is scored
        self.modalities = tuple(types[reward].modalities)
        cls = ray.remote(_RewardActorBody)
        self.actor = cls.options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                 max_task_retries=0).remote(reward, dict(args or {}), max(1, int(num_cpus)))
        self.pid = ray.get(self.actor.pid.remote())  # surfaces constructor errors (bad args) here

    def score(self, batch, context: RewardContext) -> RewardOutput:
        import ray
        while True:
            try:
                return ray.get(self.actor.score.remote(batch, context.step))
            except ray.exceptions.RayActorError as e:
                self._recover(e)  # then score the same batch again

    def _recover(self, err):
        pid = wait_for_restart(self.actor, f"reward actor {self.reward_type!r}", self.restarts,
                               f"max_restarts={self.max_restarts}", err)
        if pid != self.pid:
            self.pid, self.restarts = pid, self.restarts + 1
            if self.restarts > self.max_restarts:
                raise RuntimeError(f"reward actor {self.reward_type!r} was restarted {self.restarts} times "
                                   f"(> max_restarts={self.max_restarts}); giving up")

    def metrics(self) -> dict[str, float]:
        return {"restarts": float(self.restarts)}

    def close(self):
        import ray
        if not ray.is_initialized():
            return
        try:
            ray.get(self.actor.close.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - closing a dead actor
            pass
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
