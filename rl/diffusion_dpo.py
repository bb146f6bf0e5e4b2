"""Diffusion-DPO on a flow-matching generator (`algorithm: diffusion_dpo`).

For a pair (prompt, chosen image x_w, rejected image x_l), both images are VAE-encoded to latents
once. Each step draws per pair one flow time t and one noise e, shared by the two images, and
compares the flow-matching errors of the policy and of the reference (adapter disabled):

    x_t = (1 - t) x_0 + t e,   err(x_0) = mean ||v_theta(x_t, t | prompt) - (e - x_0)||^2
    loss = -log sigmoid( -beta/2 * [ (err_w - err_l) - (ref_err_w - ref_err_l) ] )

This is DPO with "log-likelihood" -err/2 per image, so the pairs go through the same `dpo_losses`
as token DPO (`dpo.loss_type`: sigmoid = Diffusion-DPO above; hinge, ipo, robust and an `sft` term
= the flow-matching loss on the chosen image work the same way). Before the first update the
policy equals the reference and the sigmoid loss is exactly log 2.

Data: `preference_data` (the documented JSONL / `datasets` format of generation pairs, or the
synthetic color set); understanding pairs, if present, are ignored (a flow model does not answer).
Options: `flow` (model, sampling for evaluation, dpo_timestep_sampling), `dpo` (beta, loss_type,
learning rate, batch sizes, max_steps, eval_steps, eval_samples_per_prompt), `lora`, `rewards` +
`image_task` (what evaluation samples are scored with).
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..policies.flow import FlowPolicy
from ..rollouts.flow_worker import FlowRolloutWorker, default_tiny_dir, make_flow_policy
from .algorithms import register_algorithm
from .checkpoint import resume_trainer, save_trainer
from .config import FlowConfig
from .dpo import (PairLogps, finish_dpo_step, dpo_losses, loss_kwargs, make_optimizer, run_loop,
                  read_train_eval, summarize_outputs)

EVAL_NOISE_SEED = 12345  # held-out pairs are scored with the same (t, noise) at every evaluation


@dataclass
class LatentPairs:
    """Generation pairs as a flow model sees them: prompts and the two images' latents."""

    prompts: list[str]
    chosen: torch.Tensor  # (B, C, h, w) latents in the transformer's space
    rejected: torch.Tensor  # (B, C, h, w)
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index) -> "LatentPairs":
        index = list(index)
        return LatentPairs([self.prompts[i] for i in index], self.chosen[index], self.rejected[index],
                           [self.meta[i] for i in index])


# ----------------------------------------------------------------------------- the loss
def sample_flow_times(n: int, generator: torch.Generator, how: str = "uniform") -> torch.Tensor:
    """Flow times t in (0, 1): uniform, or logit-normal (sigmoid of a standard normal, SD3's choice)."""
    if how == "uniform":
        t = torch.rand(n, generator=generator)
    elif how == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling {how!r}; use uniform or logit_normal")
    return t.clamp(1e-3, 1 - 1e-3)


def flow_matching_errors(policy: FlowPolicy, latents: torch.Tensor, prompts: list[str], t: torch.Tensor,
                         noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of the conditional velocity against e - x_0, in fp32 (grad if enabled)."""
    dev = policy.device
    x0, e, tt = latents.to(dev).float(), noise.to(dev).float(), t.to(dev).float()
    tb = tt.view(-1, *([1] * (x0.dim() - 1)))
    xt = (1 - tb) * x0 + tb * e
    v = policy.velocity(xt, tt, prompts, cfg_scale=1.0)
    return ((v - (e - x0)) ** 2).mean(dim=tuple(range(1, x0.dim())))


def diffusion_pair_logps(policy: FlowPolicy, pair: LatentPairs, t: torch.Tensor, noise: torch.Tensor) -> PairLogps:
    """-err/2 of the chosen and rejected latents (one forward for both; same t and noise per pair)."""
    B = len(pair)
    errs = flow_matching_errors(policy, torch.cat([pair.chosen, pair.rejected]), pair.prompts * 2,
                                t.repeat(2), noise.repeat(2, *([1] * (noise.dim() - 1))))
    ones = torch.ones(B, device=errs.device)
    return PairLogps(-errs[:B] / 2, -errs[B:] / 2, ones, ones)


def diffusion_dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                       beta: float) -> torch.Tensor:
    """The Diffusion-DPO sigmoid loss per pair, written out (what `dpo_losses` computes for `sigmoid`)."""
    inside = -beta / 2 * ((err_w - err_l) - (ref_err_w - ref_err_l))
    return -torch.nn.functional.logsigmoid(inside)


# ----------------------------------------------------------------------------- data
def load_latent_pairs(cfg, policy: FlowPolicy, run_dir: Path) -> tuple[LatentPairs, LatentPairs, dict]:
    """Train and held-out generation pairs of `preference_data`, images encoded to latents (validated up front)."""
    from .dpo import write_synthetic_preference_set

    pd = cfg.preference_data
    if pd is None:
        raise ValueError("algorithm: diffusion_dpo needs a `preference_data` section (train files or `synthetic`)")
    train_src, eval_src = list(pd.train), list(pd.eval)
    if pd.synthetic is not None:
        scfg = dataclasses.replace(pd.synthetic, kinds=["generation"])  # a flow model only generates
        tr, ev = write_synthetic_preference_set(scfg, run_dir / "synthetic_pairs", cfg.seed, policy.image_size,
                                                policy.image_size)
        train_src.append(str(tr))
        if ev is not None:
            eval_src.append(str(ev))
    if not train_src:
        raise ValueError("preference_data.train is empty and no `synthetic` set is configured")
    train, held = read_train_eval(pd, train_src, eval_src, cfg.seed)
    if not train.generation:
        raise ValueError(f"no generation pairs (prompt, chosen image, rejected image) in {train.source}")
    info = {"data/train_pairs": len(train.generation), "data/eval_pairs": len(held.generation),
            "data/skipped_records": train.skipped + held.skipped,
            "data/ignored_understanding_pairs": len(train.understanding) + len(held.understanding)}
    return encode_records(policy, train.generation), encode_records(policy, held.generation), info


def encode_records(policy: FlowPolicy, records, batch_size: int = 16) -> LatentPairs:
    """Load each record's two images at the policy's resolution and VAE-encode them."""
    from .preference_data import load_image_tensor

    size = policy.image_size
    C = policy.latent_channels
    f = policy.vae_scale_factor
    if not records:
        empty = torch.zeros(0, C, size // f, size // f)
        return LatentPairs([], empty, empty.clone(), [])
    chosen, rejected = [], []
    for i in range(0, len(records), batch_size):
        part = records[i:i + batch_size]
        cw = torch.stack([load_image_tensor(r.chosen, size, r.where, "chosen") for r in part])
        rl = torch.stack([load_image_tensor(r.rejected, size, r.where, "rejected") for r in part])
        chosen.append(policy.encode_images(cw))
        rejected.append(policy.encode_images(rl))
    return LatentPairs([r.prompt for r in records], torch.cat(chosen), torch.cat(rejected),
                       [dict(r.meta) for r in records])


def pairs_from_tensors(policy: FlowPolicy, prompts: list[str], chosen: torch.Tensor,
                       rejected: torch.Tensor) -> LatentPairs:
    """LatentPairs from in-memory images ((B, H, W, 3) in [0, 1]), e.g. pairs built by a script."""
    return LatentPairs(list(prompts), policy.encode_images(chosen), policy.encode_images(rejected),
                       [{} for _ in prompts])


# ----------------------------------------------------------------------------- the trainer
class DiffusionDPOTrainer:
    """Offline Diffusion-DPO: a fixed set of latent pairs, an epoch-shuffled order, AdamW on the adapter."""

    def __init__(self, cfg, policy: FlowPolicy | None = None):
        self.cfg, self.d = cfg, cfg.dpo
        self.flow = cfg.flow or FlowConfig()
        self.run_dir = Path(cfg.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.policy = policy or make_flow_policy(
            self.flow, cfg.lora, tiny_dir=default_tiny_dir(cfg.output_dir, cfg.seed), seed=cfg.seed)
        self.policy.transformer.train()
        self.optimizer = make_optimizer(self.policy, self.d)
        self.step = 0
        self.rewards = None
        self.eval_prompts: list[str] = []

    def setup_data(self):
        self.train_set, self.eval_set, self.data_info = load_latent_pairs(self.cfg, self.policy, self.run_dir)
        if self.cfg.image_task is not None:
            from .tasks import read_prompts
            it = self.cfg.image_task
            self.eval_prompts = list(it.prompts) + (read_prompts(it.prompts_file) if it.prompts_file else [])
        else:  # sample the pairs' own prompts
            self.eval_prompts = sorted(set(self.train_set.prompts) | set(self.eval_set.prompts))

    def pair_indices(self, step: int) -> list[int]:
        """The pairs of `step`: epoch e of the stream is a seeded permutation (resume-safe)."""
        per_step = self.d.per_device_train_batch_size * self.d.gradient_accumulation_steps
        N = len(self.train_set)
        out = []
        for n in range((step - 1) * per_step, step * per_step):
            perm = torch.randperm(N, generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + n // N))
            out.append(int(perm[n % N]))
        return out

    def pair_terms(self, pair: LatentPairs, generator: torch.Generator):
        t = sample_flow_times(len(pair), generator, self.flow.dpo_timestep_sampling)
        noise = torch.randn(pair.chosen.shape, generator=generator)
        with torch.no_grad(), self.policy.reference():
            ref = diffusion_pair_logps(self.policy, pair, t, noise).detach()
        return diffusion_pair_logps(self.policy, pair, t, noise), ref

    def train_step(self) -> dict:
        d, step = self.d, self.step + 1
        picks = self.pair_indices(step)
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step * 7919 + 3) % (2 ** 63))
        self.optimizer.zero_grad(set_to_none=True)
        outs, t0 = [], time.perf_counter()
        for start in range(0, len(picks), d.per_device_train_batch_size):
            pair = self.train_set.select(picks[start:start + d.per_device_train_batch_size])
            lp, ref = self.pair_terms(pair, g)
            out = dpo_losses(lp, ref, **loss_kwargs(d))
            (out.losses.sum() / len(picks)).backward()  # every pair weighs the same in the step's mean
            outs.append(("generation", out))
        return finish_dpo_step(self, outs, step, t0)

    @torch.no_grad()
    def evaluate(self) -> dict:
        m = {}
        tr = self.policy.transformer
        was_training = tr.training
        tr.eval()
        try:
            if len(self.eval_set):
                g = torch.Generator().manual_seed(EVAL_NOISE_SEED)
                outs = []
                for start in range(0, len(self.eval_set), self.d.per_device_eval_batch_size):
                    pair = self.eval_set.select(range(start, min(start + self.d.per_device_eval_batch_size,
                                                                 len(self.eval_set))))
                    lp, ref = self.pair_terms(pair, g)
                    outs.append(("generation", dpo_losses(lp, ref, **loss_kwargs(self.d))))
                m.update(summarize_outputs(outs, "eval/dpo"))
            m.update(self.sample_and_score())
        finally:
            tr.train(was_training)
        return m

    def sample_and_score(self) -> dict:
        """Sample every evaluation prompt with fixed seeds and score with the reward mixture."""
        from .evaluate import evaluate_samples, image_eval_request

        n = self.d.eval_samples_per_prompt
        if self.rewards is None or n <= 0 or not self.eval_prompts:
            return {}
        worker = FlowRolloutWorker(self.policy, self.flow, self.cfg.seed, shares_learner_policy=True)
        requests = [image_eval_request(self.eval_prompts, n)]
        grid = (self.run_dir / "eval_samples" / f"step_{self.step:06d}.png") if self.cfg.logging.image_grid_every else None
        return evaluate_samples(worker, requests, self.rewards, self.policy, self.step, grid)

    def save(self):
        return save_trainer(self)

    def resume(self) -> bool:
        return resume_trainer(self) is not None


def eval_reward_trend(metrics_path: Path) -> dict:
    """First vs last 10% of the evaluations for every eval/reward metric (the 'did it learn' numbers)."""
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if any(k.startswith("eval/reward/") for k in r)]
    out = {}
    if len(rows) < 2:
        return out
    k = max(1, len(rows) // 10)
    for key in sorted({key for r in rows for key in r if key.startswith("eval/reward/")}):
        first = [r[key] for r in rows[:k] if r.get(key) is not None]
        last = [r[key] for r in rows[-k:] if r.get(key) is not None]
        if first and last:
            out[key] = {"first_10pct": float(np.mean(first)), "last_10pct": float(np.mean(last))}
    return out


@register_algorithm("diffusion_dpo")
def train_diffusion_dpo(cfg, resume: bool = False) -> dict:
    """`algorithm: diffusion_dpo`: offline Diffusion-DPO on the generation pairs of `preference_data`."""
    if cfg.dpo is None:
        from .config import DPOConfig
        cfg.dpo = DPOConfig(beta=5000.0)
    if cfg.flow is None:
        cfg.flow = FlowConfig()
    trainer = DiffusionDPOTrainer(cfg)
    trainer.resume_requested = resume
    trainer.setup_data()
    if cfg.rewards:
        from .trainer import build_rewards
        trainer.rewards = build_rewards(cfg, trainer.run_dir)
    print(f"diffusion_dpo: {len(trainer.train_set)} training pairs, {len(trainer.eval_set)} held out")
    summary = run_loop(trainer, cfg, cfg.dpo.max_steps, "diffusion_dpo", on_start=lambda: dict(trainer.data_info))
    summary.update(eval_reward_trend(Path(cfg.output_dir) / "metrics.jsonl"))
    (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
