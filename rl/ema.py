"""An exponential moving average of the adapter (LoRA) weights, swapped in where it is used.

flow_grpo keeps one for evaluation (train.ema, decay 0.9, updated every 8 optimizer steps, warm-up
min(decay, (1 + n) / (10 + n))); DiffusionNFT samples with one (its "old" policy, decay
min(0.001 * n, 0.5)). Both are `AdapterEMA` with a different decay function. Only the trainable
tensors are averaged (the frozen base is shared), so it costs one adapter's memory.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch


def flow_grpo_decay(decay: float) -> Callable[[int], float]:
    """flow_grpo's EMAModuleWrapper warm-up: early updates follow the weights closely."""
    return lambda n: min(decay, (1 + n) / (10 + n))


def linear_decay(rate: float, limit: float) -> Callable[[int], float]:
    """DiffusionNFT's schedule: decay 0 (old = current) at step 0, rising by `rate` per step to `limit`."""
    return lambda n: min(rate * n, limit)


class AdapterEMA:
    """shadow <- decay_n * shadow + (1 - decay_n) * weights, at optimizer steps n with (n + 1) % every == 0."""

    def __init__(self, policy, decay_fn: Callable[[int], float], update_every: int = 1):
        self.params = list(policy.trainable_parameters())
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay_fn = decay_fn
        self.update_every = max(1, int(update_every))
        self.updates = 0  # optimizer steps seen

    @torch.no_grad()
    def step(self) -> float | None:
        """Call after each optimizer step; returns the decay used, or None when this step did not update."""
        n, self.updates = self.updates, self.updates + 1
        if (n + 1) % self.update_every:
            return None
        decay = float(self.decay_fn(n))
        for s, p in zip(self.shadow, self.params):
            s.mul_(decay).add_(p.detach(), alpha=1 - decay)
        return decay

    @contextlib.contextmanager
    def swapped(self):
        """The EMA weights in the policy for the duration of the block; the trained ones back after."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)

    def state_dict(self) -> dict:
        return {"shadow": [s.cpu() for s in self.shadow], "updates": self.updates}

    def load_state_dict(self, state: dict):
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
        self.updates = int(state["updates"])
