"""DiffusionNFT (`algorithm: diffusion_nft`): online RL on the forward process, without likelihoods or CFG.

One step = sample with the "old" adapter (an EMA of the trained one) by the deterministic ODE, keep only
each sample's final latent x0 -> score with the reward mixture -> group-relative advantages A (as
GRPO) -> for `flow.nft_timesteps` forward-process times t per sample (from the sampling schedule):

    x_t = (1 - t) x0 + t eps,   v = v_theta(x_t, t | prompt) (no CFG),   v_old: the old adapter's
    v+ = beta v + (1 - beta) v_old        v- = (1 + beta) v_old - beta v         x0(u) = x_t - t u
    r  = clamp(1/2 + clip(A, +-c) / (2c), 0, 1)                              c = flow.adv_clip_max (5)
    L  = c * [r ||x0(v+) - x0||^2 / w+ + (1 - r) ||x0(v-) - x0||^2 / w-] / beta + k ||v - v_ref||^2

(means over dimensions; w = the detached mean |x0(u) - x0|, at least 1e-5; k = flow.nft_kl_weight to the
adapter-free base). After the update the old adapter moves: old <- d old + (1 - d) theta with
d = min(nft_old_decay_rate * step, nft_old_decay_max). So no trajectory, no log-prob and no CFG pass
is needed, and any sampler could be used; the official code (NVlabs/DiffusionNFT, train_nft_sd3.py)
samples with DPM-Solver 2, uniloop with the Euler ODE of the same schedule.

Rewards, prompts, rollout workers (in-process or Ray: they get the old adapter) and checkpoints (with
the old adapter) are Flow-GRPO's (rl/flow_grpo.py).
"""
from __future__ import annotations

import numpy as np
import torch

from ..policies.batches import ScoredBatch
from .ema import AdapterEMA, linear_decay
from .flow_grpo import FlowGRPOTrainer
from .registry import register_algorithm
from .trainer import accumulation_groups


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             advantages: torch.Tensor, beta: float = 1.0, adv_clip_max: float = 5.0,
             v_ref: torch.Tensor | None = None, kl_weight: float = 0.0):
    """Per-sample DiffusionNFT loss (B,) and the optimality probability r (B,); all fp32."""
    dims = tuple(range(1, x0.dim()))
    t = t.float().view((-1,) + (1,) * (x0.dim() - 1))
    v, v_old, x_t, x0 = v.float(), v_old.float(), x_t.float(), x0.float()
    r = ((advantages.float().clamp(-adv_clip_max, adv_clip_max) / adv_clip_max) / 2 + 0.5).clamp(0, 1)

    def weighted_error(u):
        x0_pred = x_t - t * u
        with torch.no_grad():  # an adaptive per-sample scale, not trained through
            w = (x0_pred - x0).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        return ((x0_pred - x0) ** 2 / w).mean(dim=dims)

    positive = weighted_error(beta * v + (1 - beta) * v_old)
    negative = weighted_error((1 + beta) * v_old - beta * v)
    loss = adv_clip_max * (r * positive + (1 - r) * negative) / beta
    if v_ref is not None and kl_weight:
        loss = loss + kl_weight * ((v - v_ref.float()) ** 2).mean(dim=dims)
    return loss, r


@register_algorithm("diffusion_nft")
class DiffusionNFTTrainer(FlowGRPOTrainer):
    """Flow-GRPO's prompts, rewards, advantages, workers and checkpoints; the NFT update."""

    def setup(self, worker_pool=None):
        self.sampling.image["sde_type"] = "ode"  # deterministic sampling: no log-probs needed
        self.sampling.image["sde_window"] = None
        super().setup(worker_pool)

    def rank_setup(self):
        super().rank_setup()
        f = self.cfg.flow
        # the sampling (old) policy: equal to the trained one at step 0; on learner ranks each rank keeps
        # one (the update reads it), rank 0's returns to the driver, which samples with it
        self.old = AdapterEMA(self.policy, linear_decay(f.nft_old_decay_rate, f.nft_old_decay_max))

    def sampling_weights(self):
        return self.old.swapped()

    def extra_state(self) -> dict:
        return {**super().extra_state(), "nft_old": self.old.state_dict()}

    def load_extra_state(self, state: dict):
        super().load_extra_state(state)
        if "nft_old" in state:
            self.old.load_state_dict(state["nft_old"])

    def forward_times(self, batch, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """nft_timesteps draws per row of (t (B,), eps (B, C, h, w)), seeded by (seed, step)."""
        f = self.cfg.flow
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step * 7919 + 31) % (2 ** 63))
        x0 = batch.latents[:, -1]
        times = batch.sigmas[:, :-1]  # the schedule's times, t = 0 excluded
        out = []
        for _ in range(f.nft_timesteps):
            k = torch.randint(times.shape[1], (len(batch),), generator=g)
            out.append((times[torch.arange(len(batch)), k], torch.randn(x0.shape, generator=g)))
        return out

    def update(self, scored: list[ScoredBatch]) -> dict:
        (sb,), step = scored, self.step + 1
        g, f, policy = self.opt, self.cfg.flow, self.policy
        rows = sb.valid.nonzero().flatten().tolist()
        if not rows:
            self.old.step()
            return {"loss": 0.0, "update/skipped": 1}
        draws = self.forward_times(sb.batch, step)
        stats = {"loss": [], "grad_norm": [], "kl": [], "r": []}
        dev = policy.device
        for _ in range(g.num_iterations):
            # global micro-batches (per_device_train_batch_size rows on each learner rank), each rank its rows
            groups = accumulation_groups(rows, g.per_device_train_batch_size * self.learner_world,
                                         g.gradient_accumulation_steps)
            for group in groups:
                n_rows = sum(len(m) for m in group)  # the normaliser of the whole optimizer step
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for mi, idx in enumerate(group):
                    mine, share = self.rank_rows(idx)
                    b = sb.batch.select(mine)
                    x0 = b.latents[:, -1].to(dev)
                    adv = sb.advantages[mine].to(dev)
                    for di, (t_all, eps_all) in enumerate(draws):
                        t, eps = t_all[mine].to(dev), eps_all[mine].to(dev)
                        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
                        # the frozen velocities first: swapping the old adapter in writes the weights
                        with torch.no_grad():
                            with self.old.swapped():
                                v_old = policy.velocity(x_t, t, b.prompts, 1.0)
                            v_ref = None
                            if f.nft_kl_weight:
                                with policy.reference():
                                    v_ref = policy.velocity(x_t, t, b.prompts, 1.0)
                        held = []

                        def compute():
                            v = policy.velocity(x_t, t, b.prompts, 1.0)
                            per, r = nft_loss(v, v_old, x_t, x0, t, adv, f.nft_beta, f.adv_clip_max, v_ref,
                                              f.nft_kl_weight)
                            held.append((v.detach(), r.detach()))
                            return per.sum() / (n_rows * len(draws))

                        last = mi == len(group) - 1 and di == len(draws) - 1
                        step_loss += self.rank_backward(compute, share, last).item()
                        if not share:  # a rank without rows of this micro-batch only joined the reduction
                            continue
                        v, r = held[0]
                        stats["r"].append(r.mean().item())
                        if v_ref is not None:
                            stats["kl"].append(((v - v_ref) ** 2).mean().item())
                stats["grad_norm"].append(self.optimizer_step())
                stats["loss"].append(step_loss)
        decay = self.old.step()
        mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
        return {"loss": mean(stats["loss"]), "kl": mean(stats["kl"]), "grad_norm": mean(stats["grad_norm"]),
                "nft/r_mean": mean(stats["r"]), "nft/old_decay": decay if decay is not None else 0.0}
