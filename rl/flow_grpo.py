"""Flow-GRPO: GRPO on a flow-matching generator through its SDE sampler (`algorithm: flow_grpo`).

One step = sample (SDE, every transition's log-prob recorded) -> score with the reward mixture ->
group-relative advantages (the same `grpo_advantages` as the Janus loop) -> for each trained
transition k of each sample, the clipped-ratio loss

    rho = exp(log p_theta(x_{k+1} | x_k) - log p_old(x_{k+1} | x_k))
    L   = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps_high)) + beta * KL_k,  A clipped to +-adv_clip_max
    KL_k = ||mean_theta - mean_ref||^2 / (2 std_k^2)   (closed form: both transitions are Gaussians
                                                        with the same std; mean over dimensions)

all in float32. The "old" log-probs are the ones recorded while sampling, so the ratio on the first
inner step of an on-policy update is 1 up to float error: that is checked and logged
(`ratio/first_step_max_abs_dev`), as is the sampler-vs-learner log-prob difference.

Options: `flow` (model, sampling: num_steps, cfg_scale, noise_level, trained transitions, adv clip),
`grpo` (learning_rate, beta, epsilon, epsilon_high, num_iterations, batch sizes, max_steps,
scale_rewards, std_floor), `rollout.num_generations` (group size), `lora` (r, alpha, dropout,
init_adapter), `image_task`, `rewards`, `logging`.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..policies.flow import gaussian_mean_kl
from ..rollouts.flow_worker import FlowRolloutWorker, default_tiny_dir, make_flow_policy
from .algorithms import register_algorithm
from .config import Config, FlowConfig, save_config
from .tasks import ImageTask
from .trainer import (GRPOTrainer, InProcessPool, ScoredBatch, _chunks, _seed_everything, build_rewards, reward_metrics,
                      run_rl_loop, sample_and_score)


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


class FlowGRPOTrainer:
    """Holds the pieces of a Flow-GRPO run; `train_step` is the one function to read."""

    def __init__(self, cfg: Config, worker_pool=None):
        if cfg.image_task is None:
            raise ValueError("algorithm: flow_grpo needs an `image_task` (prompts to generate)")
        if cfg.rollout.num_generations < 2:
            raise ValueError("rollout.num_generations must be >= 2: GRPO compares samples of one prompt")
        self.cfg = cfg
        self.flow = cfg.flow or FlowConfig()
        self.run_dir = Path(cfg.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _seed_everything(cfg.seed)
        self.policy = make_flow_policy(self.flow, cfg.lora, tiny_dir=default_tiny_dir(cfg.output_dir, cfg.seed),
                                       seed=cfg.seed)
        self.policy.transformer.train()
        g = cfg.grpo
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=g.learning_rate,
                                           weight_decay=g.weight_decay, betas=(g.adam_beta1, g.adam_beta2))
        self.rewards = build_rewards(cfg, self.run_dir)
        self.task = ImageTask(cfg.image_task, cfg.seed)
        self.workers = worker_pool or InProcessPool(FlowRolloutWorker(self.policy, self.flow, cfg.seed,
                                                                      shares_learner_policy=True))
        self.step = 0
        self.invalid_streak = 0

    # ------------------------------------------------------------------ one step
    def train_step(self) -> tuple[dict, list[ScoredBatch]]:
        cfg, step = self.cfg, self.step + 1
        request = self.task.request(step, cfg.rollout.num_generations)
        (sb,), times = sample_and_score(cfg, self.workers, self.rewards, self.policy, [request], step)
        t2 = time.perf_counter()
        update_metrics = self.update(sb, step)
        t3 = time.perf_counter()
        self.policy.version += 1
        self.workers.sync(self.policy, self.policy.version)
        self.step = step
        metrics = {**reward_metrics([sb], self.rewards), **update_metrics, **times, "time/update": t3 - t2,
                   "adapter/version": self.policy.version, **self.workers.metrics()}
        self.check_invalid(metrics)
        return metrics, [sb]

    def update(self, sb: ScoredBatch, step: int) -> dict:
        """num_iterations passes over the valid samples; each optimizer step accumulates the gradients
        of `gradient_accumulation_steps` micro-batches over every trained transition (Flow-GRPO)."""
        g, f, policy = self.cfg.grpo, self.flow, self.policy
        batch = sb.batch
        transitions = trained_transitions(f, self.cfg.seed, step)
        rows = sb.valid.nonzero().flatten().tolist()
        stats = {"loss": [], "kl": [], "clip_fraction": [], "grad_norm": [], "approx_kl": [],
                 "ratio_dev_first": None, "sampler_diff": []}
        if not rows:
            return {"loss": 0.0, "update/skipped": 1}
        for it in range(g.num_iterations):
            micro = [[rows[i] for i in chunk] for chunk in _chunks(len(rows), g.per_device_train_batch_size)]
            for start in range(0, len(micro), g.gradient_accumulation_steps):
                group = micro[start:start + g.gradient_accumulation_steps]
                n_rows = sum(len(m) for m in group)
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for idx in group:
                    b = batch.select(idx)
                    adv = sb.advantages[idx].to(policy.device)
                    for j in transitions:
                        mean_ref = None
                        if g.beta != 0.0:
                            with torch.no_grad(), policy.reference():
                                _, mean_ref, _ = policy.transition_logprobs(b, j)
                        logp, mean, std = policy.transition_logprobs(b, j)
                        old = b.logprobs[:, j].to(logp.device)
                        kl = gaussian_mean_kl(mean, mean_ref, std) if mean_ref is not None else None
                        per, ratio, clipped = flow_grpo_loss(logp, old, adv, g.epsilon, g.epsilon_high,
                                                             f.adv_clip_max, kl, g.beta)
                        loss = per.sum() / (n_rows * len(transitions))
                        loss.backward()
                        step_loss += loss.item()
                        if it == 0 and start == 0:
                            dev = (ratio.detach() - 1).abs().max().item()
                            stats["ratio_dev_first"] = max(stats["ratio_dev_first"] or 0.0, dev)
                            stats["sampler_diff"].append((logp.detach() - old).abs().max().item())
                        stats["clip_fraction"].append(clipped.mean().item())
                        stats["approx_kl"].append(0.5 * ((logp.detach() - old) ** 2).mean().item())
                        if kl is not None:
                            stats["kl"].append(kl.detach().mean().item())
                params = policy.trainable_parameters()
                norm = torch.nn.utils.clip_grad_norm_(params, g.max_grad_norm if g.max_grad_norm > 0 else float("inf"))
                stats["grad_norm"].append(norm.item())
                stats["loss"].append(step_loss)
                self.optimizer.step()
        mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
        return {"loss": mean(stats["loss"]), "kl": mean(stats["kl"]), "clip_fraction": mean(stats["clip_fraction"]),
                "approx_kl": mean(stats["approx_kl"]), "grad_norm": mean(stats["grad_norm"]),
                "ratio/first_step_max_abs_dev": stats["ratio_dev_first"] or 0.0,
                "logprob/sampler_vs_learner_max_abs_diff": max(stats["sampler_diff"] or [0.0]),
                "flow/trained_transitions": len(transitions)}

    check_invalid = GRPOTrainer.check_invalid  # same invalid-reward abort rule as the Janus loop
    eval_grid_path = GRPOTrainer.eval_grid_path

    def evaluate(self) -> dict:
        """eval/reward/* of every prompt, fixed seeds (grpo.eval_steps; `rl.evaluate`)."""
        from .evaluate import eval_requests, evaluate_samples
        worker = FlowRolloutWorker(self.policy, self.flow, self.cfg.seed, shares_learner_policy=True)
        return evaluate_samples(worker, eval_requests([self.task], self.cfg.grpo.eval_samples_per_prompt),
                                self.rewards, self.policy, self.step, self.eval_grid_path())

    # ------------------------------------------------------------------ checkpoints
    save = GRPOTrainer.save  # adapter, optimizer, version, RNG, step, invalid-reward streak
    resume = GRPOTrainer.resume


def make_flow_worker_pool(cfg: Config):
    """Ray actors sampling the flow policy when rollout.num_workers > 0, else None (in-process)."""
    if cfg.rollout.num_workers > 0:
        from ..rollouts.ray_pool import RayWorkerPool
        return RayWorkerPool(cfg)
    return None


@register_algorithm("flow_grpo")
def train_flow_grpo(cfg: Config, resume: bool = False) -> dict:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.flow is None:
        cfg.flow = FlowConfig()
    save_config(cfg, run_dir / "config.yaml")
    return run_rl_loop(cfg, FlowGRPOTrainer(cfg, worker_pool=make_flow_worker_pool(cfg)), resume,
                       desc="flow_grpo")
