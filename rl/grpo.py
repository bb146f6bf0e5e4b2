"""GRPO (`algorithm: grpo`): one step = sample -> score -> group-relative advantages -> clipped update.

    requests  = each task's prompts for this step, num_generations samples each
    scored    = sample_and_score(...)                        rollouts/pipeline.py (in-process or Ray)
    A         = advantage estimator (grpo.advantage_estimator) over each prompt's group
    update    = for each inner iteration, each optimizer step of micro-batches:
                  loss = policy loss (grpo.importance_sampling_level) + beta * KL_k3, per token,
                  aggregated per modality (grpo.loss_type), weighted (image/text_loss_weight)

The maths are in rl/losses.py; option names follow TRL's GRPOConfig. With one optimizer step per
rollout batch the learner's own log-probs, detached, are the "old" ones, so the first ratio is
exactly 1 (logged as ratio/first_step_max_abs_dev).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time

import numpy as np
import torch

from ..policies.batches import ScoredBatch
from ..policies.microbatch import auto_micro_batch_size
from ..rollouts.pipeline import make_pool, sample_and_score, scoring_chunks
from .losses import ADVANTAGE_ESTIMATORS, LossNorm, aggregate_with, grpo_token_loss, lookup
from .registry import register_algorithm
from .tasks import build_tasks
from .trainer import StepResult, Trainer, health_metrics, index_chunks, reward_metrics


@register_algorithm("grpo")
class GRPOTrainer(Trainer):
    """GRPO on a unified policy's image and text rollouts; `train_step` is the one function to read."""

    section = "grpo"
    data_parallel = True
    min_generations = 2  # a group of one sample has zero advantage: validation refuses it

    def setup(self, worker_pool=None):
        if self.rewards is None:
            raise ValueError("grpo scores rollouts with the reward mixture: configure `rewards`")
        self.tasks = self.eval_tasks = self.build_tasks()
        self.flat_streak = 0  # consecutive steps with most groups flat (watch_learning_signal)
        # In-process sampling shares the learner's policy object; a Ray pool ships adapter tensors.
        self.workers = worker_pool or make_pool(self.policy, self.spec, self.sampling, self.cfg.rollout,
                                                self.cfg.seed, self.cfg.ray)

    def build_tasks(self) -> list:
        return build_tasks(self.cfg, self.policy.image_size)

    def requests(self, step: int) -> list:
        return [task.request(step, self.cfg.rollout.num_generations) for task in self.tasks]

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        step, rc = self.step + 1, self.cfg.rollout
        requests = self.requests(step)
        upcoming = self.requests(step + 1) if step < self.max_steps else None  # for one-step-off sampling
        chunks = scoring_chunks(rc.scoring_chunks, self.rewards, requests, rc.batch_size, rc.num_workers)
        scored, times = sample_and_score(self.workers, self.rewards, self.policy, requests, step, chunks, upcoming)
        for sb in scored:
            self.set_advantages(sb)
        t0 = time.perf_counter()
        update_metrics = self.run_update(scored)
        t1 = time.perf_counter()
        self.new_version()
        self.step = step
        metrics = {**reward_metrics(scored, self.rewards), **health_metrics(scored), **update_metrics, **times,
                   "time/update": t1 - t0, "adapter/version": self.policy.version, **self.workers.metrics()}
        self.check_invalid(metrics, scored)
        self.watch_learning_signal(metrics)
        return StepResult(metrics, scored)

    def watch_learning_signal(self, metrics: dict):
        """Warn when most groups have had identical rewards for grpo.flat_group_patience steps: their
        advantages are 0, so the run is not learning from them (collapse, too easy or too hard a task)."""
        g, flat = self.opt, metrics["health/flat_group_fraction"]
        self.flat_streak = self.flat_streak + 1 if flat >= g.flat_group_warning else 0
        if g.flat_group_patience and self.flat_streak and self.flat_streak % g.flat_group_patience == 0:
            ent = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("entropy/"))
            print(f"warning: step {self.step}: no learning signal: {flat:.0%} of groups have identical rewards "
                  f"(for {self.flat_streak} steps; {ent}). The policy may have collapsed onto one output per prompt: "
                  f"see README 'Training health'", file=sys.stderr, flush=True)

    def set_advantages(self, sb: ScoredBatch):
        g = self.opt
        estimator = lookup(ADVANTAGE_ESTIMATORS, g.advantage_estimator, "advantage_estimator")
        sb.advantages, sb.metrics = estimator(sb.rewards, sb.batch.group_ids, sb.valid, g.scale_rewards, g.std_floor)

    def update(self, scored: list[ScoredBatch]) -> dict:
        """num_iterations passes over the batch, micro-batched, one optimizer step per accumulation group."""
        g, mode = self.opt, self.cfg.rollout.logprob_mode
        micro = [(sb, idx) for sb in scored for idx in self.micro_batches(sb.batch) if sb.valid[idx].any()]
        # With one optimizer step per rollout batch the learner's own log-probs, detached, are the
        # "old" ones (rho == 1 exactly). With more, every later micro-batch would see updated weights,
        # so the sampling-time policy is frozen in a no-grad pass first.
        several_updates = g.num_iterations > 1 or len(micro) > g.gradient_accumulation_steps
        stats = {"loss": [], "kl": [], "clip_fraction": [], "grad_norm": [], "sampler_logprob_diff": []}
        ratio_dev_first = None
        self.prepare_logprobs(scored, mode, several_updates, stats)
        batch_tokens = {}
        for sb, idx in micro:
            batch_tokens[sb.batch.kind] = batch_tokens.get(sb.batch.kind, 0.0) + _tokens(sb, idx)
        steps_per_batch = math.ceil(len(micro) / g.gradient_accumulation_steps)
        for it in range(g.num_iterations):
            for start in range(0, len(micro), g.gradient_accumulation_steps):
                group = micro[start:start + g.gradient_accumulation_steps]
                self.optimizer.zero_grad(set_to_none=True)
                counts = {}  # normalisers over the whole accumulation group, per modality
                for sb, idx in group:
                    n = counts.setdefault(sb.batch.kind, [0, 0.0])
                    n[0] += int(sb.valid[idx].sum())
                    n[1] += _tokens(sb, idx)
                for k, (sb, idx) in enumerate(group):
                    rows, share = (idx, 1.0) if self.dist is None else self.dist.rows(idx)
                    with self.rank_sync(k == len(group) - 1):
                        loss, ratio, kl, clipped, mask = self.micro_loss(sb, rows, share, it, counts, batch_tokens,
                                                                          steps_per_batch, several_updates, stats)
                    stats["loss"].append(loss.item())
                    if not share:  # a rank without rows of this micro-batch: it only joined the reduction
                        continue
                    if it == 0 and ratio_dev_first is None:
                        ratio_dev_first = ((ratio.detach() - 1).abs() * mask).max().item()
                    msum = mask.sum().clamp(min=1)
                    stats["clip_fraction"].append(((clipped * mask).sum() / msum).item())
                    if kl is not None:
                        stats["kl"].append(((kl.detach() * mask).sum() / msum).item())
                stats["grad_norm"].append(self.optimizer_step())
        mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
        # each optimizer step's loss is the sum of its micro-batches' shares
        return {"loss": float(np.sum(stats["loss"])) / max(len(stats["grad_norm"]), 1),
                "kl": mean(stats["kl"]), "clip_fraction": mean(stats["clip_fraction"]),
                "grad_norm": mean(stats["grad_norm"]),
                "ratio/first_step_max_abs_dev": ratio_dev_first if ratio_dev_first is not None else 0.0,
                "logprob/sampler_vs_learner_max_abs_diff": max(stats["sampler_logprob_diff"] or [0.0])}

    def rank_sync(self, last: bool):
        """On a learner rank: the gradient all-reduce waits for the optimizer step's last micro-batch."""
        return self.dist.no_sync(last) if self.dist is not None else contextlib.nullcontext()

    def micro_loss(self, sb, idx, share, it, counts, batch_tokens, steps_per_batch, several_updates, stats):
        """Forward + backward of rows `idx`: their share of the optimizer step's loss (normalised by the
        whole step's counts, so the ranks' shares add up to the one-rank loss)."""
        g, policy, mode = self.opt, self.policy, self.cfg.rollout.logprob_mode
        weights = {"image": g.image_loss_weight, "text": g.text_loss_weight}
        out = {}

        def compute():
            b = sb.batch.select(idx)
            logp = policy.rollout_logprobs(b, mode)
            # fully on-policy: the detached current log-probs are the old ones, rho is exactly 1
            old = logp.detach() if it == 0 and sb.old_logprobs is None else sb.old_logprobs[idx].to(logp.device)
            if not several_updates and b.version == policy.version:  # same weights: must agree
                stats["sampler_logprob_diff"].append(
                    ((logp.detach().cpu() - b.logprobs(mode)) * b.completion_mask).abs().max().item())
            ref = sb.ref_logprobs[idx].to(logp.device) if sb.ref_logprobs is not None else None
            mask = b.completion_mask.to(logp.device) * sb.valid[idx].to(logp.device)[:, None]
            per_tok, out["ratio"], out["kl"], out["clipped"] = grpo_token_loss(
                logp, old, sb.advantages[idx].to(logp.device), ref, g.epsilon, g.epsilon_high, g.beta,
                level=g.importance_sampling_level, mask=mask)
            n_seq, n_tok = counts[b.kind]
            norm = LossNorm(n_seq, n_tok, mask.shape[1], batch_tokens[b.kind], steps_per_batch)
            out["mask"] = mask
            return weights[b.kind] * aggregate_with(g.loss_type, per_tok, mask, norm)

        loss = self.dist.loss(compute) if self.dist is not None else compute()
        (loss * (share * self.grad_scale)).backward()
        return loss.detach() * share, out["ratio"], out["kl"], out["clipped"], out["mask"]

    @torch.no_grad()
    def prepare_logprobs(self, scored: list[ScoredBatch], mode: str, several_updates: bool, stats: dict):
        """Reference log-probs (for the KL) and the ratio's "old" log-probs when they are not the current
        policy's own: the sampler's (a batch sampled with an older adapter) or a frozen no-grad pass."""
        for sb in scored:
            sb.ref_logprobs = None
            if self.opt.beta != 0.0:
                with self.policy.reference():
                    sb.ref_logprobs = self.micro_logprobs(sb.batch, mode)
            if sb.batch.version != self.policy.version:
                # sampled with an older adapter (rollout.one_step_off): the ratio is taken against the
                # log-probs the sampler actually used, not the learner's current ones
                sb.old_logprobs = sb.batch.logprobs(mode).clone()
            elif several_updates:
                sb.old_logprobs = self.micro_logprobs(sb.batch, mode)
                stats["sampler_logprob_diff"].append(
                    ((sb.old_logprobs - sb.batch.logprobs(mode)) * sb.batch.completion_mask).abs().max().item())

    def micro_logprobs(self, batch, mode: str) -> torch.Tensor:
        return torch.cat([self.policy.rollout_logprobs(batch.select(idx), mode).detach().cpu()
                          for idx in self.micro_batches(batch)])

    def micro_batches(self, batch) -> list[list[int]]:
        """Row indices per micro-batch; per_device_train_batch_size 0 = sized from free GPU memory. On N
        learner ranks a micro-batch holds N x per_device_train_batch_size rows, a slice per rank (TRL's
        meaning of "per device")."""
        size = self.opt.per_device_train_batch_size
        if size == 0:
            size = auto_micro_batch_size(self.policy, len(batch), batch.prompt_ids.shape[1],
                                         self.cfg.rollout.logprob_mode, self.cfg.rollout.cfg_scale)
        return index_chunks(len(batch), size * (self.dist.world if self.dist is not None else 1))


def _tokens(sb: ScoredBatch, idx) -> float:
    """Valid completion tokens of rows `idx` of a scored batch."""
    return float((sb.batch.completion_mask[idx] * sb.valid[idx, None]).sum())
