"""The base trainer: what every algorithm shares, written once.

An algorithm is a `Trainer` subclass registered with `@register_algorithm("name")` (rl/registry.py)
that implements `train_step() -> StepResult` and, where it needs to, `setup()`, `evaluate()` and
`prepare_config()`. The base class holds the run: seeding, the run directory, the policy (built from
a `PolicySpec` by the policies registry, which owns the tiny-model rule), the optimizer (from the
shared optimizer fields of the algorithm's config section), the one `optimizer_step`, the reward
mixture, the invalid-reward abort, sampling-based evaluation, and checkpoints. `rl/loop.py` runs any
trainer: log, evaluate, checkpoint, summarise.

Order of construction (it fixes the random draws of a seed): seed -> policy (its LoRA init draws)
-> optimizer -> rewards -> the algorithm's own setup (tasks, data, rollout workers).
"""
from __future__ import annotations

import contextlib
import random
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ..policies.batches import ScoredBatch
from ..policies.registry import LoraSpec, PolicySpec, build_policy, detect_family
from ..rewards.base import RewardMixture, build_mixture
from ..rollouts.worker import RolloutWorker, Sampling
from .checkpoint import latest_checkpoint, resume_trainer, save_trainer
from .distributed import (LEARNER_DIR, LearnerGroup, combine_metrics, dcp_restore, train_decoder_weights,
                          trainable_state)
from .evaluate import eval_requests, evaluate_samples
from .rundir import RunAborted


class StepResult(NamedTuple):
    """What one training step returns to the loop (unpacks as `metrics, samples = trainer.train_step()`)."""

    metrics: dict[str, float]
    samples: Sequence[ScoredBatch] = ()  # the step's scored rollouts (sample grids)


class Trainer:
    """Subclasses set `section` (the config section with their optimizer and schedule) and
    `policy_section` (`model`: a unified model; `flow`: a flow-matching generator)."""

    section = "grpo"
    policy_section = "model"
    # Evaluate before the first and after the last step even when the section's eval_steps is 0
    # (the preference learners: held-out pair accuracy is their "did it learn" number).
    eval_at_ends = False
    # Runs on learner.num_workers > 1 ranks (rl/distributed.py): its `update(scored)` takes this
    # rank's rows through `self.dist` and scales its loss by `self.grad_scale`.
    data_parallel = False
    samples_rollouts = False  # samples with `self.workers` every step (learner.mode colocated can then shard it)
    dist = None  # a RankContext on a learner rank; None in the driver / the in-process learner

    def __init__(self, cfg, worker_pool=None, policy=None):
        self.prepare_config(cfg)
        self.cfg = cfg
        self.opt = getattr(cfg, self.section)  # an OptimizerConfig subclass: GRPOConfig | DPOConfig
        self.run_dir = Path(cfg.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.spec = policy_spec(cfg, self.policy_section)
        self.policy = policy or build_policy(self.spec)
        if cfg.learner.full_finetune:
            train_decoder_weights(self.policy)
            if self.uses_reference():  # no adapter to disable: the starting weights are the reference
                self.policy.freeze_reference()
        self.policy.model.train()
        self.optimizer = make_optimizer(self.policy, self.opt)
        self.rewards: RewardMixture | None = build_mixture(cfg.rewards, cfg.reward_combine) if cfg.rewards else None
        self.sampling = sampling_settings(cfg, self.policy_section)
        self.workers = None  # a rollout pool, for the algorithms that sample while training
        self.eval_tasks = None  # the tasks `evaluate` samples (None = no sampling evaluation)
        self.step = 0
        self.invalid_streak = 0
        self.learners = None
        self.setup(worker_pool)
        if cfg.learner.num_workers > 1:
            self.learners = LearnerGroup(self)  # the ranks start from this policy's tensors
            if cfg.learner.mode == "colocated" and self.samples_rollouts:  # the ranks sample (rl/colocated.py)
                self.workers.close()
                self.workers = self.learners.rollout_pool(self.sampling, cfg.rollout, cfg.seed)

    @classmethod
    def for_rank(cls, cfg, spec: PolicySpec, dist):
        """The learner half of a trainer on one learner rank: seed -> policy (the driver's resolved
        `spec`) -> DDP / FSDP2 -> optimizer; no rewards, tasks or rollout workers."""
        self = cls.__new__(cls)
        self.cfg, self.opt, self.spec, self.dist = cfg, getattr(cfg, cls.section), spec, dist
        self.run_dir, self.step, self.workers, self.rewards, self.learners = Path(cfg.output_dir), 0, None, None, None
        seed_everything(cfg.seed)
        self.policy = build_policy(spec)
        if cfg.learner.full_finetune:
            train_decoder_weights(self.policy)
        self.policy.model.train()
        dist.wrap(self.policy, cfg.learner)
        if cfg.learner.full_finetune and self.uses_reference():  # this rank's shards of the starting weights
            self.policy.freeze_reference()
        self.optimizer = make_optimizer(self.policy, self.opt)
        self.rank_setup()
        return self

    def rank_setup(self):
        """On a learner rank, after its optimizer: the update's own state (an EMA that follows every
        optimizer step). Rank 0's `extra_state()` goes back to the driver after every update, and the
        driver's reaches the ranks at start and on resume."""

    def uses_reference(self) -> bool:
        """Does the update read reference log-probs (`policy.reference()`)? Full fine-tuning then keeps a
        frozen copy of the trained weights."""
        return True

    # Config sections the algorithm needs, built with these defaults when a recipe leaves them out.
    default_sections: dict = {}

    # ------------------------------------------------------------------ what algorithms override
    @classmethod
    def prepare_config(cls, cfg):
        """Fill the config sections the algorithm needs but the recipe left out (before saving it)."""
        for name, make in cls.default_sections.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, make())

    def setup(self, worker_pool=None):
        """The algorithm's own pieces: tasks, data, rollout workers."""

    def train_step(self) -> StepResult:
        raise NotImplementedError

    def start_metrics(self) -> dict:
        """Logged at step 0 with the first evaluation (e.g. the data's size)."""
        return {}

    # ------------------------------------------------------------------ shared machinery
    @property
    def max_steps(self) -> int:
        return self.opt.max_steps

    @property
    def grad_scale(self) -> float:
        """DDP and FSDP2 average gradients over ranks; each rank's loss is its share of the global one."""
        return float(self.dist.world) if self.dist is not None else 1.0

    def run_update(self, scored) -> dict:
        """The update of one step's data (`scored`: what `update` takes): in-process, or on the learner
        ranks (then this policy gets the updated tensors)."""
        return self.learners.update(self, scored) if self.learners is not None else self.update(scored)

    # ------------------------------------------------------------------ the seam every algorithm's update uses
    # An `update(data)` written with these runs unchanged on 1 rank and on N: the driver cuts the step
    # into global micro-batches (`learner_world` x per_device_train_batch_size rows), every rank takes
    # its rows of each, normalises by the global counts, and the ranks' shares add up to the 1-rank loss.
    @property
    def learner_world(self) -> int:
        """Ranks that share each micro-batch (learner.num_workers; 1 in-process)."""
        return self.dist.world if self.dist is not None else self.cfg.learner.num_workers

    def rank_rows(self, idx) -> tuple[list[int], float]:
        """This rank's rows of a global micro-batch and the weight of its loss (all rows, 1.0 in-process)."""
        return (list(idx), 1.0) if self.dist is None else self.dist.rows(list(idx))

    def rank_sync(self, last: bool):
        """On a learner rank: the gradient all-reduce waits for the optimizer step's last micro-batch."""
        return self.dist.no_sync(last) if self.dist is not None else contextlib.nullcontext()

    def rank_backward(self, compute, share: float, last: bool) -> torch.Tensor:
        """Forward (`compute()`: this rank's rows' part of the optimizer step's global loss) and backward,
        through DDP on a rank; returns the detached share."""
        with self.rank_sync(last):
            loss = self.dist.loss(compute) if self.dist is not None else compute()
            (loss * (share * self.grad_scale)).backward()
        return loss.detach() * share

    @classmethod
    def combine_rank_metrics(cls, per_rank: list[dict]) -> dict:
        """The ranks' `update` results as the one-rank result (the driver's side of `run_update`)."""
        return combine_metrics(per_rank)

    def optimizer_step(self) -> float:
        """Clip the gradient norm (max_grad_norm, 0 = off), step AdamW; returns the norm before clipping."""
        params = self.policy.trainable_parameters()
        limit = self.opt.max_grad_norm if self.opt.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        self.optimizer.step()
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor

    def check_invalid(self, metrics: dict, scored: list[ScoredBatch] = ()):
        """Stop the run (RunAborted, the step's metrics attached so the loop logs them first) when too many
        rewards stay invalid (grpo.max_invalid_fraction / invalid_patience), naming the rewards at fault
        and their most common causes."""
        g = self.opt
        if metrics.get("reward/invalid_fraction", 0.0) > g.max_invalid_fraction:
            self.invalid_streak += 1
            if self.invalid_streak >= g.invalid_patience:
                causes = "; ".join(f"{name}: {n} invalid ({', '.join(f'{c} x{k}' for c, k in top)})"
                                   for name, (n, top) in invalid_causes(scored).items())
                raise RunAborted(
                    f"step {self.step}: {metrics['reward/invalid_fraction']:.0%} of samples had an invalid reward "
                    f"for {self.invalid_streak} consecutive steps (limit grpo.max_invalid_fraction="
                    f"{g.max_invalid_fraction}). {causes or 'see reward/<name>/invalid'} "
                    f"(metrics: {self.run_dir / 'metrics.jsonl'})", metrics)
        else:
            self.invalid_streak = 0

    def eval_due(self, step: int) -> bool:
        """Evaluate at `step`? Every `eval_steps` steps, at step 0 and after the last step (when eval_steps
        is set or the algorithm always evaluates its ends)."""
        every = self.opt.eval_steps
        if every and step % every == 0:
            return True
        return (step == 0 or step == self.max_steps) and (bool(every) or self.eval_at_ends)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """eval/reward/* of every eval task prompt, sampled with fixed seeds (`rl.evaluate`), the model
        in eval mode; a grid in eval_samples/."""
        was_training = self.policy.model.training
        self.policy.model.eval()
        try:
            return self.evaluate_samples()
        finally:
            self.policy.model.train(was_training)

    def evaluate_samples(self) -> dict:
        n = self.opt.eval_samples_per_prompt
        if not self.eval_tasks or self.rewards is None or n <= 0:
            return {}
        worker = RolloutWorker(self.policy, self.sampling, self.cfg.seed, shares_learner_policy=True)
        out = self.run_dir / "eval_samples"
        grid = out / f"step_{self.step:06d}.png" if self.cfg.logging.image_grid_every else None
        return evaluate_samples(worker, eval_requests(self.eval_tasks, n), self.rewards, self.policy, self.step, grid,
                                table_path=out / f"step_{self.step:06d}.json")

    def new_version(self):
        """After an update: the adapter has a new version, and the rollout workers get it."""
        self.policy.version += 1
        if self.workers is not None:
            self.workers.sync(self.policy, self.policy.version)

    def extra_state(self) -> dict:
        """What an algorithm adds to its checkpoints' state.pt (e.g. an EMA of the adapter)."""
        return {}

    def load_extra_state(self, state: dict):
        """Restore what `extra_state` saved."""

    def save(self):
        extra = {"invalid_streak": self.invalid_streak, **self.extra_state()}
        if self.cfg.learner.full_finetune:  # no adapter: the trained tensors themselves
            extra["weights"] = trainable_state(self.policy)
        if self.learners is None:
            return save_trainer(self, **extra)
        self.learners.pull_optimizer(self)
        return save_trainer(self, write_extra=lambda tmp: self.learners.save((tmp / LEARNER_DIR).absolute()), **extra)

    def resume(self) -> bool:
        state = resume_trainer(self)
        if state is None:
            return False
        self.invalid_streak = state.get("invalid_streak", 0)
        self.load_extra_state(state)
        ckpt = latest_checkpoint(self.run_dir)
        if self.learners is not None:
            self.learners.restore(self, ckpt)
        elif (ckpt / LEARNER_DIR).exists():  # a run that had ranks, resumed in-process: their state is the truth
            dcp_restore(self.policy.model, self.optimizer, ckpt / LEARNER_DIR)
        if self.workers is not None:
            self.workers.sync(self.policy, self.policy.version)
        return True

    def close(self):
        if self.learners is not None:
            self.learners.close()
        if self.workers is not None:
            self.workers.close()
        if self.rewards is not None:
            self.rewards.close()


# ----------------------------------------------------------------------------- config -> pieces
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(policy, opt) -> torch.optim.Optimizer:
    """AdamW on the trainable (adapter) parameters, from a section's shared optimizer fields."""
    params = policy.trainable_parameters()
    if not params:
        raise ValueError("the policy has no trainable parameters (is the LoRA adapter attached?)")
    return torch.optim.AdamW(params, lr=opt.learning_rate, weight_decay=opt.weight_decay,
                             betas=(opt.adam_beta1, opt.adam_beta2))


def default_tiny_dir(cfg, family: str) -> str:
    """Tiny models are shared by the runs of one parent directory (built once per family and seed)."""
    return str(Path(cfg.output_dir).parent / ".tiny_models" / f"{family}_seed{cfg.seed}")


def policy_spec(cfg, section: str = "model") -> PolicySpec:
    """The PolicySpec of a run: the unified model of `model` (+ `lora`), or the flow generator of `flow`."""
    lora = cfg.lora
    if section == "flow":
        f = cfg.flow
        return PolicySpec("sd3", f.name_or_path,
                          load={"dtype": f.dtype, "device": f.device, "max_sequence_length": f.max_sequence_length,
                                "load_t5": f.load_t5},
                          lora=LoraSpec(lora.r, lora.alpha, lora.dropout, list(f.lora_target_modules), lora.init_adapter),
                          gradient_checkpointing=f.gradient_checkpointing, tiny=dict(f.tiny or {}),
                          tiny_dir=f.tiny_dir or default_tiny_dir(cfg, "sd3"), seed=cfg.seed)
    m = cfg.model
    lora = None if cfg.learner.full_finetune else lora
    family = m.family if m.family != "auto" else (detect_family(m.name_or_path) or "janus")
    targets = lora.target_modules if lora else None
    if targets and "," in targets:
        targets = [t.strip() for t in targets.split(",")]
    return PolicySpec(family, m.name_or_path,
                      load={"dtype": m.dtype, "device": m.device, "quantization": m.quantization,
                            "attn_implementation": m.attn_implementation, **m.load_args},
                      lora=lora and LoraSpec(lora.r, lora.alpha, lora.dropout, targets, lora.init_adapter),
                      gradient_checkpointing=m.gradient_checkpointing, tiny=dict(m.tiny or {}),
                      tiny_dir=m.tiny_dir or default_tiny_dir(cfg, family), seed=cfg.seed)


def sampling_settings(cfg, section: str = "model") -> Sampling:
    """How rollout workers sample: `rollout` settings for a unified model, `flow` ones for a flow model."""
    if section == "flow":
        f = cfg.flow
        return Sampling(image={"num_steps": f.num_steps, "cfg_scale": f.cfg_scale, "noise_level": f.noise_level,
                               "height": f.resolution or None, "width": f.resolution or None,
                               "batch_size": f.sample_batch_size, "sde_type": f.sde_type,
                               "sde_window": f.sde_window()})
    r = cfg.rollout
    return Sampling(image={"cfg_scale": r.cfg_scale, "temperature": r.temperature, "top_k": r.top_k,
                           "sampler": r.sampler},
                    text={"max_new_tokens": r.max_new_tokens, "temperature": r.temperature},
                    batch_size=r.batch_size,
                    reasoning=cfg.reasoning.sampling() if getattr(cfg, "reasoning", None) is not None else None)


def reward_metrics(scored: list[ScoredBatch], mixture: RewardMixture) -> dict:
    """reward/mean, std, invalid_fraction over the step; per kind and per component the mean over valid
    samples and the invalid count; each batch's own statistics (advantage/...) per kind."""
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


def invalid_causes(scored: list[ScoredBatch], top: int = 3) -> dict[str, tuple[int, list[tuple[str, int]]]]:
    """Per reward with invalid samples: how many, and its most common causes (the reward's own per-sample
    error strings, e.g. a judge's "HTTP 500" or "no 'Final Score'", else a non-finite score)."""
    counts: dict[str, Counter] = {}
    for sb in scored:
        for name, out in sb.components.items():
            errors = next((v for k, v in out.details.items() if "error" in k and isinstance(v, list)), None)
            for i in (~out.valid).nonzero().flatten().tolist():
                why = (errors[i] if errors is not None and i < len(errors) and errors[i] else "non-finite score")
                counts.setdefault(name, Counter())[str(why)[:80]] += 1
    return {name: (sum(c.values()), c.most_common(top)) for name, c in counts.items()}


def health_metrics(scored: list[ScoredBatch]) -> dict:
    """Is there a learning signal? health/flat_group_fraction: the share of prompt groups whose rewards
    are all equal (zero advantage: TRL's frac_reward_zero_std); entropy/<kind>: the mean entropy of
    the distributions the sampled tokens were drawn from (a collapsing policy shows it falling)."""
    m, groups, flat = {}, 0, 0.0
    for sb in scored:
        g = len(sb.batch.group_ids.unique())
        groups += g
        flat += sb.metrics.get("advantage/flat_group_fraction", 0.0) * g
        segments = sb.batch.segment_entropy() if hasattr(sb.batch, "segment_entropy") else {}
        for name, (ent, mask) in segments.items():
            m[f"entropy/{name}"] = float((ent * mask).sum() / mask.sum().clamp(min=1))
    m["health/flat_group_fraction"] = flat / max(groups, 1)
    return m


def accumulation_groups(rows: list[int], micro_size: int, accumulation: int) -> list[list[list[int]]]:
    """`rows` in micro-batches of micro_size, `accumulation` micro-batches per optimizer step."""
    micro = [[rows[i] for i in chunk] for chunk in index_chunks(len(rows), micro_size)]
    return [micro[i:i + accumulation] for i in range(0, len(micro), max(1, accumulation))]


def index_chunks(n: int, size: int) -> list[list[int]]:
    """[0, n) in consecutive chunks of `size` (at least 1)."""
    size = max(1, size)
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]
