"""The GRPO training loop. One step = sample -> score -> advantages -> update; see `train_step`."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..rewards.base import RewardContext, RewardMixture, RewardSpec, merge_components, reward_types
from ..rollouts.worker import RolloutWorker, concat_rollouts, make_policy
from .algorithms import register_algorithm
from .checkpoint import latest_checkpoint, resume_trainer, save_trainer
from .config import Config, save_config
from .grpo import aggregate, grpo_advantages, grpo_token_loss
from .runlog import RunLogger
from .tasks import build_tasks


def build_rewards(cfg: Config, run_dir: Path) -> RewardMixture:
    types = reward_types()
    specs = []
    for i, rc in enumerate(cfg.rewards):
        tname = rc.type or rc.name
        if tname not in types:
            raise ValueError(f"rewards[{i}] ({rc.name!r}): unknown reward type {tname!r}; "
                             f"registered: {sorted(types)}")
        args = dict(rc.args)
        try:
            reward = types[tname](**args)
        except TypeError as e:
            raise ValueError(f"rewards[{i}] ({rc.name!r}): bad args for {tname}: {e}") from None
        specs.append(RewardSpec(rc.name, rc.weight, reward, normalize=rc.normalize,
                                clip=tuple(rc.clip) if rc.clip is not None else None,
                                run_async=rc.async_scoring))
    return RewardMixture(specs, combine=cfg.reward_combine)


@dataclass
class ScoredBatch:
    """A rollout batch with its rewards and advantages: what the update consumes."""

    batch: object  # ImageRollout | TextRollout
    rewards: torch.Tensor
    valid: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)


class GRPOTrainer:
    """Holds the pieces of a run; `train_step` is the one function to read."""

    def __init__(self, cfg: Config, worker_pool=None):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _seed_everything(cfg.seed)
        tiny_dir = self.run_dir.parent / ".tiny_models" / f"janus_seed{cfg.seed}"
        self.policy = make_policy(cfg.model, cfg.lora, tiny_dir=tiny_dir)
        self.policy.model.train()
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=cfg.grpo.learning_rate, weight_decay=cfg.grpo.weight_decay,
            betas=(cfg.grpo.adam_beta1, cfg.grpo.adam_beta2))
        self.rewards = build_rewards(cfg, self.run_dir)
        self.tasks = build_tasks(cfg, self.policy.image_size)
        # In-process sampling shares the learner's policy object; a Ray pool ships adapter tensors.
        self.workers = worker_pool or InProcessPool(RolloutWorker(self.policy, cfg.rollout, cfg.seed,
                                                                  shares_learner_policy=True))
        self.step = 0
        self.invalid_streak = 0

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step + 1
        requests = [task.request(step, cfg.rollout.num_generations) for task in self.tasks]
        scored, times = sample_and_score(cfg, self.workers, self.rewards, self.policy, requests, step)
        t2 = time.perf_counter()
        update_metrics = self.update(scored)
        t3 = time.perf_counter()
        self.policy.version += 1
        self.workers.sync(self.policy, self.policy.version)
        self.step = step
        metrics = {**reward_metrics(scored, self.rewards), **update_metrics, **times, "time/update": t3 - t2,
                   "adapter/version": self.policy.version, **self.workers.metrics()}
        self.check_invalid(metrics)
        return metrics, scored

    def update(self, scored: list[ScoredBatch]) -> dict:
        """num_iterations passes over the batch, micro-batched, AdamW on the adapter."""
        g, policy, mode = self.cfg.grpo, self.policy, self.cfg.rollout.logprob_mode
        micro = [(sb, idx) for sb in scored for idx in self.micro_batches(sb.batch) if sb.valid[idx].any()]
        # With one optimizer step per rollout batch the learner's own log-probs, detached, are the
        # "old" ones (rho == 1 exactly). With more, every later micro-batch would see updated weights,
        # so the sampling-time policy is frozen in a no-grad pass first.
        several_updates = g.num_iterations > 1 or len(micro) > g.gradient_accumulation_steps
        stats = {"loss": [], "kl": [], "clip_fraction": [], "grad_norm": [], "ratio_dev_first": None,
                 "sampler_logprob_diff": []}
        with torch.no_grad():
            for sb in scored:
                sb.ref_logprobs = None
                if g.beta != 0.0:
                    with policy.reference():
                        sb.ref_logprobs = self.micro_logprobs(sb.batch, mode, grad=False)
                if sb.batch.version != policy.version:
                    # sampled with an older adapter (rollout.one_step_off): the ratio is taken against the
                    # log-probs the sampler actually used, not the learner's current ones
                    sb.old_logprobs = sb.batch.logprobs(mode).clone()
                elif several_updates:
                    sb.old_logprobs = self.micro_logprobs(sb.batch, mode, grad=False)
                    stats["sampler_logprob_diff"].append(
                        ((sb.old_logprobs - sb.batch.logprobs(mode)) * sb.batch.completion_mask).abs().max().item())
        weights = {"image": g.image_loss_weight, "text": g.text_loss_weight}
        for it in range(g.num_iterations):
            for start in range(0, len(micro), g.gradient_accumulation_steps):
                group = micro[start:start + g.gradient_accumulation_steps]
                self.optimizer.zero_grad(set_to_none=True)
                # normalisers over the whole accumulation group, per modality
                norms = {}
                for sb, idx in group:
                    n = norms.setdefault(sb.batch.kind, [0, 0.0])
                    n[0] += int(sb.valid[idx].sum())
                    n[1] += float((sb.batch.completion_mask[idx] * sb.valid[idx, None]).sum())
                for sb, idx in group:
                    b = sb.batch.select(idx)
                    valid = sb.valid[idx].to(policy.device)
                    logp = policy.rollout_logprobs(b, mode)
                    if it == 0 and sb.old_logprobs is None:
                        old = logp.detach()  # fully on-policy: rho is exactly 1 on this pass
                    else:
                        old = sb.old_logprobs[idx].to(logp.device)
                    if not several_updates and b.version == policy.version:  # same weights: must agree
                        stats["sampler_logprob_diff"].append(
                            ((logp.detach().cpu() - b.logprobs(mode)) * b.completion_mask).abs().max().item())
                    ref = sb.ref_logprobs[idx].to(logp.device) if sb.ref_logprobs is not None else None
                    per_tok, ratio, kl, clipped = grpo_token_loss(
                        logp, old, sb.advantages[idx].to(logp.device), ref, g.epsilon, g.epsilon_high, g.beta)
                    mask = b.completion_mask.to(logp.device) * valid[:, None]
                    n_seq, n_tok = norms[b.kind]
                    loss = weights[b.kind] * aggregate(per_tok, mask, g.loss_type, n_seq, n_tok, mask.shape[1])
                    loss.backward()
                    msum = mask.sum().clamp(min=1)
                    if it == 0 and stats["ratio_dev_first"] is None:
                        stats["ratio_dev_first"] = ((ratio.detach() - 1).abs() * mask).max().item()
                    stats["loss"].append(loss.item())
                    stats["clip_fraction"].append(((clipped * mask).sum() / msum).item())
                    if kl is not None:
                        stats["kl"].append(((kl.detach() * mask).sum() / msum).item())
                params = policy.trainable_parameters()
                norm = torch.nn.utils.clip_grad_norm_(params, g.max_grad_norm if g.max_grad_norm > 0 else float("inf"))
                stats["grad_norm"].append(norm.item())
                self.optimizer.step()
        mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
        # each optimizer step's loss is the sum of its micro-batches' shares
        return {"loss": float(np.sum(stats["loss"])) / max(len(stats["grad_norm"]), 1),
                "kl": mean(stats["kl"]), "clip_fraction": mean(stats["clip_fraction"]),
                "grad_norm": mean(stats["grad_norm"]),
                "ratio/first_step_max_abs_dev": stats["ratio_dev_first"] if stats["ratio_dev_first"] is not None else 0.0,
                "logprob/sampler_vs_learner_max_abs_diff": max(stats["sampler_logprob_diff"] or [0.0])}

    def micro_logprobs(self, batch, mode: str, grad: bool) -> torch.Tensor:
        out = []
        with torch.set_grad_enabled(grad):
            for idx in self.micro_batches(batch):
                out.append(self.policy.rollout_logprobs(batch.select(idx), mode).detach().cpu())
        return torch.cat(out)

    def micro_batches(self, batch) -> list[list[int]]:
        """Row indices per micro-batch; per_device_train_batch_size 0 = sized from free GPU memory."""
        size = self.cfg.grpo.per_device_train_batch_size
        if size == 0:
            from ..policies.microbatch import auto_micro_batch_size
            size = auto_micro_batch_size(self.policy, len(batch), batch.prompt_ids.shape[1],
                                         self.cfg.rollout.logprob_mode, self.cfg.rollout.cfg_scale)
        return _chunks(len(batch), size)

    def evaluate(self) -> dict:
        """eval/reward/* of every task prompt, fixed seeds (`rl.evaluate`); a grid in eval_samples/."""
        from .evaluate import eval_requests, evaluate_samples
        worker = RolloutWorker(self.policy, self.cfg.rollout, self.cfg.seed, shares_learner_policy=True)
        return evaluate_samples(worker, eval_requests(self.tasks, self.cfg.grpo.eval_samples_per_prompt),
                                self.rewards, self.policy, self.step, self.eval_grid_path())

    def eval_grid_path(self):
        if not self.cfg.logging.image_grid_every:
            return None
        return self.run_dir / "eval_samples" / f"step_{self.step:06d}.png"

    def check_invalid(self, metrics: dict):
        g = self.cfg.grpo
        if metrics.get("reward/invalid_fraction", 0.0) > g.max_invalid_fraction:
            self.invalid_streak += 1
            if self.invalid_streak >= g.invalid_patience:
                raise RuntimeError(
                    f"step {self.step}: {metrics['reward/invalid_fraction']:.0%} of samples had an invalid reward "
                    f"for {self.invalid_streak} consecutive steps (limit grpo.max_invalid_fraction="
                    f"{g.max_invalid_fraction}); see reward/<name>/invalid in {self.run_dir / 'metrics.jsonl'}")
        else:
            self.invalid_streak = 0

    # ------------------------------------------------------------------ checkpoints
    def save(self):
        return save_trainer(self, invalid_streak=self.invalid_streak)

    def resume(self) -> bool:
        state = resume_trainer(self)
        if state is None:
            return False
        self.invalid_streak = state["invalid_streak"]
        self.workers.sync(self.policy, self.policy.version)
        return True


def sample_and_score(cfg: Config, workers, rewards: RewardMixture, policy, requests, step: int):
    """Sample the step's rollouts chunk by chunk and start scoring each chunk as soon as it is sampled,
    so that async rewards (judges, reward actors) score chunk i while chunk i+1 samples.

    Chunks are contiguous runs of whole prompt groups with their own per-sample seeds; merged back,
    the batch, its rewards and its advantages are those of sampling and scoring it in one piece.
    Returns one ScoredBatch per request and the step's timing metrics.
    """
    context = RewardContext(policy=policy, step=step)
    n_chunks = scoring_chunks(cfg.rollout, rewards, requests)
    pending, sampling, t0 = {}, 0.0, time.perf_counter()
    stream = workers.generate_stream(requests, policy.version, n_chunks)
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
        scored.append(grpo_scored(cfg.grpo, batch, mix))
    t2 = time.perf_counter()
    busy = rewards.pop_busy_seconds()
    times = {"time/rollout": sampling, "time/reward": (t1 - t0 - sampling) + (t2 - t1),
             "time/reward_wait": t2 - t1, "rollout/scoring_chunks": float(n_chunks)}
    times.update({f"time/reward/{name}": sec for name, sec in busy.items()})
    return scored, times


def scoring_chunks(rollout_cfg, rewards: RewardMixture, requests) -> int:
    """rollout.scoring_chunks, with 0 = one chunk per forward batch of every worker (at least 2) when a
    reward runs async: chunking then costs no batch efficiency."""
    if rollout_cfg.scoring_chunks > 0:
        return rollout_cfg.scoring_chunks
    if not rewards.has_async or not requests:
        return 1
    samples = max(len(r.prompts) * r.num_generations for r in requests)
    per_chunk = max(1, rollout_cfg.batch_size) * max(1, rollout_cfg.num_workers)
    return max(2, math.ceil(samples / per_chunk))


def grpo_scored(g, batch, mix) -> ScoredBatch:
    """Group-relative advantages of a scored batch (`g`: the grpo config)."""
    adv, stats = grpo_advantages(mix.total, batch.group_ids, mix.valid, g.scale_rewards, g.std_floor)
    sb = ScoredBatch(batch, mix.total, mix.valid, adv, metrics=stats)
    sb.components = mix.components
    return sb


class InProcessPool:
    """The default engine: one worker in this process, sharing the learner's policy."""

    def __init__(self, worker: RolloutWorker):
        self.worker = worker

    def generate_stream(self, requests, version: int, num_chunks: int = 1):
        """Yield (request index, chunk index, batch) as each chunk is sampled."""
        for ri, req in enumerate(requests):
            for ci, chunk in enumerate(req.split(num_chunks)):
                yield ri, ci, self.worker.generate(chunk)

    def sync(self, policy, version: int):
        self.worker.set_adapter(None, version)

    def metrics(self) -> dict:
        return {}

    def close(self):
        pass


def reward_metrics(scored: list[ScoredBatch], mixture: RewardMixture) -> dict:
    m = {}
    all_r = torch.cat([sb.rewards[sb.valid] for sb in scored])
    n_all = sum(len(sb.batch) for sb in scored)
    m["reward/mean"] = all_r.mean().item() if len(all_r) else float("nan")
    m["reward/std"] = all_r.std().item() if len(all_r) > 1 else 0.0
    m["reward/invalid_fraction"] = 1 - len(all_r) / max(n_all, 1)
    for sb in scored:
        kind = sb.batch.kind
        m[f"reward/{kind}/mean"] = sb.rewards[sb.valid].mean().item() if sb.valid.any() else float("nan")
        for name, out in sb.components.items():
            m[f"reward/{name}/mean"] = out.scores[out.valid].mean().item() if out.valid.any() else float("nan")
            m[f"reward/{name}/invalid"] = int((~out.valid).sum())
        for k, v in sb.metrics.items():
            m[f"{k}/{kind}"] = v
    m.update(mixture.metrics())
    return m


def _chunks(n: int, size: int):
    size = max(1, size)
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_grid(logger: RunLogger, step: int, scored: list[ScoredBatch], max_images: int = 16):
    for sb in scored:
        if sb.batch.kind != "image":
            continue
        # a few samples of every prompt: one row per group
        groups = sb.batch.group_ids.unique().tolist()
        per = max(1, max_images // max(len(groups), 1))
        idx = [i for g in groups for i in (sb.batch.group_ids == g).nonzero().flatten().tolist()[:per]]
        # per-component breakdown under each image: "r=0.71 color=.80 self_understanding=.42"
        comps = getattr(sb, "components", {}) or {}
        caps = [f"{sb.batch.prompts[i]} r={sb.rewards[i]:.2f} "
                + " ".join(f"{n[:6]}={c.scores[i]:.2f}" for n, c in comps.items()) for i in idx]
        logger.save_grid(step, sb.batch.images[idx], caps, cols=per)


def make_worker_pool(cfg: Config):
    """Ray actors when rollout.num_workers > 0 (the Ray module registers itself), else in-process."""
    if cfg.rollout.num_workers > 0:
        from ..rollouts.ray_pool import RayWorkerPool
        return RayWorkerPool(cfg)
    return None


@register_algorithm("grpo")
def train_grpo(cfg: Config, resume: bool = False) -> dict:
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    return run_rl_loop(cfg, GRPOTrainer(cfg, worker_pool=make_worker_pool(cfg)), resume, desc="grpo")


def run_rl_loop(cfg: Config, trainer, resume: bool, desc: str) -> dict:
    """Step a trainer (anything with train_step/save/resume/step/workers/rewards) to grpo.max_steps,
    with metrics, sample grids, checkpoints and a progress bar; returns the first-vs-last summary."""
    from tqdm.auto import tqdm

    run_dir = Path(cfg.output_dir)
    logger = RunLogger(run_dir, tensorboard=cfg.logging.tensorboard)
    if resume and trainer.resume():
        logger.truncate_after(trainer.step)
        print(f"resumed from step {trainer.step} ({latest_checkpoint(run_dir)})")
    bar = tqdm(total=cfg.grpo.max_steps, initial=trainer.step, desc=desc, disable=not cfg.logging.progress_bar,
               dynamic_ncols=True)
    every = cfg.grpo.eval_steps
    try:
        if every and trainer.step == 0:
            logger.log(0, trainer.evaluate())  # the baseline the later evaluations compare against
        while trainer.step < cfg.grpo.max_steps:
            metrics, scored = trainer.train_step()
            step = trainer.step
            evaluated = bool(every) and (step % every == 0 or step == cfg.grpo.max_steps)
            if evaluated:
                metrics.update(trainer.evaluate())
            if step % cfg.logging.log_every == 0 or step == cfg.grpo.max_steps or evaluated:
                logger.log(step, metrics)
            if cfg.logging.image_grid_every and (step % cfg.logging.image_grid_every == 0 or step == 1):
                sample_grid(logger, step, scored)
            if (cfg.logging.save_every and step % cfg.logging.save_every == 0) or step == cfg.grpo.max_steps:
                trainer.save()
            bar.update(1)
            bar.set_postfix({k.split("/")[1]: f"{v:.3f}" for k, v in metrics.items()
                             if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2
                             and isinstance(v, float) and math.isfinite(v)})
    finally:
        bar.close()
        logger.close()
        trainer.workers.close()
        trainer.rewards.close()
    summary = summarize(run_dir / "metrics.jsonl")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize(metrics_path: Path) -> dict:
    """First vs last 10% of steps for every reward metric: the 'did it learn' numbers."""
    rows = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    if not rows:
        return {}
    out = {"steps": rows[-1]["step"]}
    rows, evals = [r for r in rows if r["step"] > 0], rows  # step 0 holds the baseline evaluation only
    k = max(1, len(rows) // 10)
    keys = sorted({key for r in rows for key in r if key.startswith("reward/") and key.endswith("/mean")})
    for key in keys:
        first = [r[key] for r in rows[:k] if r.get(key) is not None]
        last = [r[key] for r in rows[-k:] if r.get(key) is not None]
        if first and last:
            out[key] = {"first_10pct": float(np.mean(first)), "last_10pct": float(np.mean(last))}
    # evaluations (grpo.eval_steps): the first against the last, same prompts and seeds
    for key in sorted({key for r in evals for key in r if key.startswith("eval/reward/")}):
        vals = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if vals:
            out[key] = {"initial": vals[0][1], "final": vals[-1][1], "initial_step": vals[0][0],
                        "final_step": vals[-1][0]}
    return out
