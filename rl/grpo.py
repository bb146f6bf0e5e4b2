"""GRPO (`algorithm: grpo`): one step = sample -> score -> group-relative advantages -> clipped update.

    requests  = each task's prompts for this step, num_generations samples each
    scored    = sample_and_score(...)                        rollouts/pipeline.py (in-process or Ray)
    A         = advantage estimator (grpo.advantage_estimator) over each prompt's group
    update    = for each inner iteration, each optimizer step of micro-batches:
                  loss = policy loss (grpo.importance_sampling_level) + beta * KL_k3, per token,
                  aggregated per segment (grpo.loss_type): image tokens, answer tokens, a reasoned
                  rollout's plan and image apart; weighted (image/text_loss_weight)

The maths are in rl/losses.py; option names follow TRL's GRPOConfig. With one optimizer step per
rollout batch the learner's own log-probs, detached, are the "old" ones, so the first ratio is
exactly 1 (logged as ratio/first_step_max_abs_dev). The sampler's recorded log-probs differ from
the learner's by kernel rounding (bf16) and, one-step-off, by one adapter version: every step logs
that gap (sampling/*) and, with grpo.vllm_importance_sampling_correction, reweights each token's
policy loss by the truncated ratio learner/sampler (TRL's correction for vLLM rollouts).
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
from .losses import ADVANTAGE_ESTIMATORS, LossNorm, aggregate_with, grpo_token_loss, lookup, sampler_is_weights
from .registry import register_algorithm
from .tasks import build_tasks
from .trainer import StepResult, Trainer, health_metrics, index_chunks, reward_metrics


@register_algorithm("grpo")
class GRPOTrainer(Trainer):
    """GRPO on a unified policy's image and text rollouts; `train_step` is the one function to read."""

    section = "grpo"
    data_parallel = True
    samples_rollouts = True
    min_generations = 2  # a group of one sample has zero advantage: validation refuses it

    def setup(self, worker_pool=None):
        if self.rewards is None:
            raise ValueError("grpo scores rollouts with the reward mixture: configure `rewards`")
        self.tasks = self.eval_tasks = self.build_tasks()
        self.unirl = None  # UniRL's loop: the step's images become understanding questions (rl/unirl.py)
        if getattr(self.cfg, "unirl", None) is not None:
            from .unirl import UniRLLoop
            self.unirl = UniRLLoop(self.cfg.unirl, self.tasks[0].prompts, self.cfg.seed, self.policy.image_size)
            self.eval_tasks = self.tasks + self.unirl.eval_tasks()
        self.flat_streak = 0  # consecutive steps with most groups flat (watch_learning_signal)
        # In-process sampling shares the learner's policy object; a Ray pool ships adapter tensors.
        self.workers = worker_pool or make_pool(self.policy, self.spec, self.sampling, self.cfg.rollout,
                                                self.cfg.seed, self.cfg.ray, self.cfg.learner.full_finetune)

    def build_tasks(self) -> list:
        return build_tasks(self.cfg, self.policy.image_size)

    def uses_reference(self) -> bool:
        return self.opt.beta != 0.0  # the KL term

    def requests(self, step: int) -> list:
        return [task.request(step, self.cfg.rollout.num_generations) for task in self.tasks]

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        step, rc = self.step + 1, self.cfg.rollout
        requests = self.requests(step)
        upcoming = self.requests(step + 1) if step < self.max_steps else None  # for one-step-off sampling
        chunks = scoring_chunks(rc.scoring_chunks, self.rewards, requests, rc.batch_size, rc.num_workers)
        with self.sampling_weights():
            scored, times = sample_and_score(self.workers, self.rewards, self.policy, requests, step, chunks, upcoming)
        for sb in scored:
            self.set_advantages(sb)
        if self.unirl is not None:
            questions, unirl_metrics = self.unirl.extend(self, scored, step)
            scored, times = scored + questions, {**times, **unirl_metrics}
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

    def sampling_weights(self):
        """The weights rollouts are sampled with: the trained adapter (an algorithm may swap in another)."""
        return contextlib.nullcontext()

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
        sb.advantages, sb.metrics = estimator(sb.rewards, sb.batch.group_ids, sb.valid, g.scale_rewards, g.std_floor,
                                               ddof=g.std_ddof)
        # reasoning.plan_rewards / image_rewards: a segment's advantage from the rewards its tokens can
        # change (the plan does not draw the pixels; the image does not write the plan's words)
        r = getattr(self.cfg, "reasoning", None)
        segments = getattr(sb.batch, "segments", {})
        for seg, names in (("plan", r.plan_rewards if r else []), ("image", r.image_rewards if r else [])):
            if names and seg in segments and "plan" in segments:
                part = self.rewards.partial_total(sb.batch, sb.components, names)
                sb.segment_advantages[seg], stats = estimator(part, sb.batch.group_ids, sb.valid, g.scale_rewards,
                                                              g.std_floor, ddof=g.std_ddof)
                sb.metrics.update({k.replace("advantage/", f"advantage/{seg}/", 1): v for k, v in stats.items()})

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
        gap = SamplerGap()
        self.prepare_logprobs(scored, mode, several_updates, stats)
        batch_tokens = {}
        for sb, idx in micro:
            for seg, n_tok in _segment_tokens(sb, idx).items():
                batch_tokens[seg] = batch_tokens.get(seg, 0.0) + n_tok
        steps_per_batch = math.ceil(len(micro) / g.gradient_accumulation_steps)
        for it in range(g.num_iterations):
            for start in range(0, len(micro), g.gradient_accumulation_steps):
                group = micro[start:start + g.gradient_accumulation_steps]
                self.optimizer.zero_grad(set_to_none=True)
                counts = {}  # normalisers over the whole accumulation group, per segment
                for sb, idx in group:
                    for seg, n_tok in _segment_tokens(sb, idx).items():
                        n = counts.setdefault(seg, [0, 0.0])
                        n[0] += int(sb.valid[idx].sum())
                        n[1] += n_tok
                for k, (sb, idx) in enumerate(group):
                    rows, share = (idx, 1.0) if self.dist is None else self.dist.rows(idx)
                    with self.rank_sync(k == len(group) - 1):
                        loss, ratio_dev = self.micro_loss(sb, rows, share, it, counts, batch_tokens,
                                                          steps_per_batch, several_updates, stats, gap)
                    stats["loss"].append(loss.item())
                    if it == 0 and ratio_dev_first is None:  # a rank without rows gives None
                        ratio_dev_first = ratio_dev
                stats["grad_norm"].append(self.optimizer_step())
        mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
        # each optimizer step's loss is the sum of its micro-batches' shares
        return {"loss": float(np.sum(stats["loss"])) / max(len(stats["grad_norm"]), 1),
                "kl": mean(stats["kl"]), "clip_fraction": mean(stats["clip_fraction"]),
                "grad_norm": mean(stats["grad_norm"]),
                "ratio/first_step_max_abs_dev": ratio_dev_first if ratio_dev_first is not None else 0.0,
                "logprob/sampler_vs_learner_max_abs_diff": max(stats["sampler_logprob_diff"] or [0.0]),
                **gap.metrics()}

    def micro_loss(self, sb, idx, share, it, counts, batch_tokens, steps_per_batch, several_updates, stats, gap):
        """Forward + backward of rows `idx`: their share of the optimizer step's loss (normalised by the
        whole step's counts, so the ranks' shares add up to the one-rank loss). Returns the detached
        share and the largest |ratio - 1| (None on a rank without rows of this micro-batch)."""
        g, policy, mode = self.opt, self.policy, self.cfg.rollout.logprob_mode
        # Every segment (the image tokens, an answer, a reasoned rollout's plan) is aggregated on its own,
        # with normalisers over that segment's tokens only, then weighted: 576 image tokens never drown
        # a 30-token plan in one token mean (REFERENCES: keep per-modality aggregation explicit).
        weights = {"image": g.image_loss_weight, "text": g.text_loss_weight, "plan": g.text_loss_weight}
        parts = []  # per segment: (mask, ratio, kl, clipped), for the metrics

        def compute():
            b = sb.batch.select(idx)
            logp = policy.rollout_logprobs(b, mode)
            # the learner's log-probs before this update: a frozen pass when there are several
            # updates, else the detached current ones (then rho is exactly 1)
            learner_old = (logp.detach() if sb.learner_logprobs is None
                           else sb.learner_logprobs[idx].to(logp.device))
            old = learner_old if sb.old_logprobs is None else sb.old_logprobs[idx].to(logp.device)
            if not several_updates and b.version == policy.version:  # same weights: must agree
                stats["sampler_logprob_diff"].append(
                    ((logp.detach().cpu() - b.logprobs(mode)) * b.completion_mask).abs().max().item())
            ref = sb.ref_logprobs[idx].to(logp.device) if sb.ref_logprobs is not None else None
            mask = b.completion_mask.to(logp.device) * sb.valid[idx].to(logp.device)[:, None]
            is_w = None
            if g.vllm_importance_sampling_correction:  # over the whole trajectory (every segment)
                is_w = sampler_is_weights(g.vllm_importance_sampling_mode, learner_old, b.logprobs(mode),
                                          mask, g.vllm_importance_sampling_clip_min,
                                          g.vllm_importance_sampling_clip_max)
            if it == 0 and share:
                gap.add(learner_old, b.logprobs(mode), mask, is_w)
            loss = logp.new_zeros(())
            for seg, cols in b.segments.items():  # one advantage per trajectory (or per segment), a loss per segment
                if cols.stop == cols.start:
                    continue
                adv = sb.segment_advantages.get(seg, sb.advantages)[idx].to(logp.device)
                m = mask[:, cols]
                w = is_w[:, cols] if is_w is not None and is_w.shape == mask.shape else is_w
                per_tok, ratio, kl, clipped = grpo_token_loss(
                    logp[:, cols], old[:, cols], adv, ref[:, cols] if ref is not None else None, g.epsilon,
                    g.epsilon_high, g.beta, level=g.importance_sampling_level, mask=m, is_weights=w)
                n_seq, n_tok = counts[seg]
                norm = LossNorm(n_seq, n_tok, m.shape[1], batch_tokens[seg], steps_per_batch)
                loss = loss + weights[seg] * aggregate_with(g.loss_type, per_tok, m, norm)
                parts.append((m, ratio, kl, clipped))
            return loss

        loss = self.dist.loss(compute) if self.dist is not None else compute()
        (loss * (share * self.grad_scale)).backward()
        ratio_dev = None
        if share:  # a rank without rows of this micro-batch only joined the reduction
            for m, ratio, kl, clipped in parts:
                msum = m.sum().clamp(min=1)
                dev = ((ratio.detach() - 1).abs() * m).max().item()
                ratio_dev = dev if ratio_dev is None else max(ratio_dev, dev)
                stats["clip_fraction"].append(((clipped * m).sum() / msum).item())
                if kl is not None:
                    stats["kl"].append(((kl.detach() * m).sum() / msum).item())
        return loss.detach() * share, ratio_dev

    @torch.no_grad()
    def prepare_logprobs(self, scored: list[ScoredBatch], mode: str, several_updates: bool, stats: dict):
        """Reference log-probs (for the KL) and the ratio's "old" log-probs when they are not the current
        policy's own: the sampler's (a batch sampled with an older adapter) or a frozen no-grad pass."""
        for sb in scored:
            sb.ref_logprobs = sb.old_logprobs = sb.learner_logprobs = None
            if self.opt.beta != 0.0:
                with self.policy.reference():
                    sb.ref_logprobs = self.micro_logprobs(sb.batch, mode)
            if several_updates:
                sb.learner_logprobs = self.micro_logprobs(sb.batch, mode)
            stale = sb.batch.version != self.policy.version
            if stale and not self.opt.vllm_importance_sampling_correction:
                # sampled with an older adapter (rollout.one_step_off), no correction: the ratio is taken
                # against the log-probs the sampler actually used, not the learner's current ones
                sb.old_logprobs = sb.batch.logprobs(mode).clone()
            elif several_updates and not stale:
                stats["sampler_logprob_diff"].append(
                    ((sb.learner_logprobs - sb.batch.logprobs(mode)) * sb.batch.completion_mask).abs().max().item())

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


def _segment_tokens(sb: ScoredBatch, idx) -> dict[str, float]:
    """Valid completion tokens of rows `idx` of a scored batch, per loss segment."""
    mask = sb.batch.completion_mask[idx] * sb.valid[idx, None]
    return {seg: float(mask[:, cols].sum()) for seg, cols in sb.batch.segments.items()}


class SamplerGap:
    """The sampler-vs-learner log-prob gap of a step, over valid completion tokens, under TRL's metric
    names (sampling/sampling_logp_difference/{mean,max}: |learner - sampler|;
    sampling/importance_sampling_ratio/{min,mean,max}: the correction's weights, per token or per
    sequence) plus the uncorrected ratio's spread (sampling/sampler_ratio/{min,max} = exp(learner -
    sampler) before truncation: the first-step ratio a learner without the correction would see)."""

    def __init__(self):
        self.abs_sum, self.count, self.abs_max = 0.0, 0.0, 0.0
        self.log_min, self.log_max = math.inf, -math.inf
        self.weights = []

    def add(self, learner_logp, sampler_logp, mask, weights=None):
        m = mask.detach().bool().cpu()
        d = (learner_logp.detach().float().cpu() - sampler_logp.float().cpu())[m]
        if d.numel():
            self.abs_sum += float(d.abs().sum())
            self.count += d.numel()
            self.abs_max = max(self.abs_max, float(d.abs().max()))
            self.log_min, self.log_max = min(self.log_min, float(d.min())), max(self.log_max, float(d.max()))
        if weights is not None:
            w = weights.detach().float().cpu()
            self.weights.append(w[m] if w.shape == m.shape else w[m.any(-1)].flatten())

    def metrics(self) -> dict:
        if not self.count:
            return {}
        out = {"sampling/sampling_logp_difference/mean": self.abs_sum / self.count,
               "sampling/sampling_logp_difference/max": self.abs_max,
               "sampling/sampler_ratio/min": math.exp(self.log_min),
               "sampling/sampler_ratio/max": math.exp(self.log_max)}
        w = torch.cat(self.weights) if self.weights else torch.zeros(0)
        if w.numel():
            out.update({"sampling/importance_sampling_ratio/min": float(w.min()),
                        "sampling/importance_sampling_ratio/mean": float(w.mean()),
                        "sampling/importance_sampling_ratio/max": float(w.max())})
        return out
