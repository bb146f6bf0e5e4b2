"""Flow-GRPO: GRPO on a flow-matching generator through its SDE sampler (`algorithm: flow_grpo`).

One step = sample (SDE, every transition's log-prob recorded) -> score with the reward mixture ->
group-relative advantages (the same `grpo_advantages` as the Janus loop) -> for each trained
transition k of each sample, the clipped-ratio loss

    rho = exp(log p_theta(x_{k+1} | x_k) - log p_old(x_{k+1} | x_k))
    L   = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps_high)) + beta * KL_k,  A clipped to +-adv_clip_max
    KL_k = ||mean_theta - mean_ref||^2 / (2 std_k^2)   (closed form: both transitions are Gaussians
                                                        with the same std; mean over dimensions;
                                                        flow.kl_form flow_grpo: times (-dt), the official form)

all in float32. The "old" log-probs are the ones recorded while sampling, so the ratio on the first
inner step of an on-policy update is 1 up to float error: that is checked and logged
(`ratio/first_step_max_abs_dev`), as is the sampler-vs-learner log-prob difference.

Variants (README "Flow-GRPO variants"): an SDE window (flow.sde_window_*: only those steps are
stochastic and trained, ODE elsewhere; Flow-GRPO-Fast, MixGRPO), CPS steps (flow.sde_type), CFG-free
training (flow.cfg_scale 1) or a detached unconditional branch (flow.detach_uncond), and an EMA of the
adapter (flow.ema_*) for evaluation and optionally sampling.

Options: `flow` (model, sampling: num_steps, cfg_scale, noise_level, trained transitions, adv clip),
`grpo` (learning_rate, beta, epsilon, epsilon_high, num_iterations, batch sizes, max_steps,
scale_rewards, std_floor), `rollout.num_generations` (group size), `lora` (r, alpha, dropout,
init_adapter), `image_task`, `rewards`, `logging`.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..policies.batches import ScoredBatch
from ..policies.flow_sde import gaussian_mean_kl
from .config import FlowConfig
from .ema import AdapterEMA, flow_grpo_decay
from .grpo import GRPOTrainer
from .registry import register_algorithm
from .tasks import ImageTask
from .trainer import accumulation_groups


def flow_grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                   epsilon_high: float | None = None, adv_clip_max: float = 5.0, kl: torch.Tensor | None = None,
                   beta: float = 0.0):
    """Per-sample loss of one transition, and (ratio, was_clipped). All inputs (B,), fp32."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(logp.float() - old_logp.float())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - epsilon, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    if kl is not None and beta != 0.0:
        loss = loss + beta * kl.float()
    return loss, ratio, (unclipped != clipped).float()


def trained_transitions(flow: FlowConfig, seed: int, step: int) -> list[int]:
    """The transitions trained at `step`: the explicit list, or a seeded random fraction of them."""
    if flow.train_timesteps:
        return sorted(set(flow.train_timesteps))
    K = flow.num_steps
    k = max(1, int(round(flow.train_timestep_fraction * K)))
    if k >= K:
        return list(range(K))
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + 17) % (2 ** 63))
    return sorted(torch.randperm(K, generator=g)[:k].tolist())


def transition_indices(flow: FlowConfig, batch, seed: int, step: int) -> list[torch.Tensor]:
    """The trained transitions of each row, one (B,) index tensor per trained position: with an SDE window
    the window's steps (they may start at a different step per row), else `trained_transitions`."""
    B = len(batch)
    if flow.sde_window_size:
        starts = batch.stochastic_steps().float().argmax(dim=1)  # first stochastic step of each row
        return [starts + w for w in range(flow.sde_window_size)]
    return [torch.full((B,), j, dtype=torch.long) for j in trained_transitions(flow, seed, step)]


def transition_kl(flow: FlowConfig, batch, idx: torch.Tensor, mean, mean_ref, std) -> torch.Tensor:
    """The KL term of transition `idx` per row, in the form flow.kl_form names (0 on deterministic steps).

    exact: ||mu - mu_ref||^2 / (2 std^2) with the transition's std sigma_t*sqrt(-dt); flow_grpo: the same with
    sigma_t alone, i.e. exact * (-dt). For CPS both use its noise std (flow_grpo's std_dev_t there).
    """
    safe = torch.where(std > 0, std, torch.ones_like(std))
    kl = torch.where(std > 0, gaussian_mean_kl(mean, mean_ref, safe), torch.zeros_like(std))
    if flow.kl_form == "flow_grpo" and batch.sde_type == "sde":
        rows = torch.arange(len(batch))
        kl = kl * (batch.sigmas[rows, idx] - batch.sigmas[rows, idx + 1]).to(kl.device)
    return kl


@register_algorithm("flow_grpo")
class FlowGRPOTrainer(GRPOTrainer):
    """GRPO's step (rl/grpo.py) on a flow-matching policy: one image task, the update per transition."""

    policy_section = "flow"
    default_sections = {"flow": FlowConfig}

    def setup(self, worker_pool=None):
        self.rank_setup()
        super().setup(worker_pool)

    def rank_setup(self):
        f = self.cfg.flow  # the EMA follows every optimizer step: on learner ranks it lives there
        self.ema = AdapterEMA(self.policy, flow_grpo_decay(f.ema_decay), f.ema_update_every) if f.ema_decay else None

    def build_tasks(self) -> list:
        if self.cfg.image_task is None:
            raise ValueError(f"algorithm: {self.cfg.algorithm} needs an `image_task` (prompts to generate)")
        if self.cfg.rollout.num_generations < 2:
            raise ValueError("rollout.num_generations must be >= 2: GRPO compares samples of one prompt")
        return [ImageTask.from_config(self.cfg.image_task, self.cfg.seed)]

    # ------------------------------------------------------------------ EMA of the adapter
    def sampling_weights(self):
        if self.ema is not None and self.cfg.flow.ema_for == "eval_and_sampling":
            return self.ema.swapped()
        return contextlib.nullcontext()

    def new_version(self):
        with self.sampling_weights():  # Ray workers get the weights they sample with
            super().new_version()

    def evaluate(self) -> dict:
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
            return super().evaluate()

    def optimizer_step(self) -> float:
        norm = super().optimizer_step()
        if self.ema is not None:
            self.ema.step()
        return norm

    def extra_state(self) -> dict:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_extra_state(self, state: dict):
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    # ------------------------------------------------------------------ the update
    def update(self, scored: list[ScoredBatch]) -> dict:
        """num_iterations passes over the valid samples; each optimizer step accumulates the gradients
        of `gradient_accumulation_steps` micro-batches over every trained transition (Flow-GRPO)."""
        (sb,), step = scored, self.step + 1
        g, f, policy = self.opt, self.cfg.flow, self.policy
        batch = sb.batch
        rows = sb.valid.nonzero().flatten().tolist()
        stats = {"loss": [], "kl": [], "clip_fraction": [], "grad_norm": [], "approx_kl": [],
                 "ratio_dev_first": None, "sampler_diff": []}
        if not rows:
            return {"loss": 0.0, "update/skipped": 1}
        n_trained = 0
        for it in range(g.num_iterations):
            # global micro-batches (per_device_train_batch_size rows on each learner rank), each rank its rows
            groups = accumulation_groups(rows, g.per_device_train_batch_size * self.learner_world,
                                         g.gradient_accumulation_steps)
            for start, group in enumerate(groups):
                n_rows = sum(len(m) for m in group)  # the normaliser of the whole optimizer step
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for mi, idx in enumerate(group):
                    mine, share = self.rank_rows(idx)
                    b = batch.select(mine)
                    adv = sb.advantages[mine].to(policy.device)
                    transitions = transition_indices(f, b, self.cfg.seed, step)
                    n_trained = len(transitions)
                    for ti, j in enumerate(transitions):
                        held = []

                        def compute():
                            held.append(self.transition_loss(b, j, adv))
                            return held[0][0].sum() / (n_rows * len(transitions))

                        last = mi == len(group) - 1 and ti == len(transitions) - 1
                        step_loss += self.rank_backward(compute, share, last).item()
                        if not share:  # a rank without rows of this micro-batch only joined the reduction
                            continue
                        _, ratio, clipped, kl, logp, old = held[0]
                        if it == 0 and start == 0:
                            dev = (ratio.detach() - 1).abs().max().item()
                            stats["ratio_dev_first"] = max(stats["ratio_dev_first"] or 0.0, dev)
                            stats["sampler_diff"].append((logp.detach() - old).abs().max().item())
                        stats["clip_fraction"].append(clipped.mean().item())
                        stats["approx_kl"].append(0.5 * ((logp.detach() - old) ** 2).mean().item())
                        if kl is not None:
                            stats["kl"].append(kl.detach().mean().item())
                stats["grad_norm"].append(self.optimizer_step())
                stats["loss"].append(step_loss)
        mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
        return {"loss": mean(stats["loss"]), "kl": mean(stats["kl"]), "clip_fraction": mean(stats["clip_fraction"]),
                "approx_kl": mean(stats["approx_kl"]), "grad_norm": mean(stats["grad_norm"]),
                "ratio/first_step_max_abs_dev": stats["ratio_dev_first"] or 0.0,
                "logprob/sampler_vs_learner_max_abs_diff": max(stats["sampler_diff"] or [0.0]),
                "flow/trained_transitions": n_trained}

    def transition_loss(self, b, j: torch.Tensor, adv: torch.Tensor):
        """Flow-GRPO's per-sample loss of transition j (B,) of micro-batch b, with its parts:
        (loss, ratio, was_clipped, kl or None, logp, old logp)."""
        g, f, policy = self.opt, self.cfg.flow, self.policy
        mean_ref = None
        if g.beta != 0.0:
            with torch.no_grad(), policy.reference():
                _, mean_ref, _ = policy.transition_logprobs(b, j, detach_uncond=f.detach_uncond)
        logp, mean, std = policy.transition_logprobs(b, j, detach_uncond=f.detach_uncond)
        old = b.logprobs[torch.arange(len(b)), j].to(logp.device)
        kl = transition_kl(f, b, j, mean, mean_ref, std) if mean_ref is not None else None
        per, ratio, clipped = flow_grpo_loss(logp, old, adv, g.epsilon, g.epsilon_high, f.adv_clip_max, kl, g.beta)
        return per, ratio, clipped, kl, logp, old
