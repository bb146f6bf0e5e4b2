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
import time
from pathlib import Path

import torch

from ..policies.batches import LatentPairs
from ..policies.flow import FlowPolicy
from .config import DPOConfig, FlowConfig
from .dpo import PairChunk, PreferenceTrainer, epoch_order, loss_kwargs
from .losses import PairLogps, dpo_losses, summarize_outputs
from .preference_data import load_image_tensor
from .preference_sets import read_run_records, write_synthetic_preference_set
from .registry import register_algorithm
from .tasks import ImageTask
from .trainer import StepResult, index_chunks

EVAL_NOISE_SEED = 12345  # held-out pairs are scored with the same (t, noise) at every evaluation


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
    def synthetic(scfg, out_dir):  # a flow model only generates: generation pairs at its resolution
        return write_synthetic_preference_set(dataclasses.replace(scfg, kinds=["generation"]), out_dir, cfg.seed,
                                              policy.image_size, policy.image_size)

    train, held = read_run_records(cfg, run_dir, "diffusion_dpo", synthetic)
    if not train.generation:
        raise ValueError(f"no generation pairs (prompt, chosen image, rejected image) in {train.source}")
    info = {"data/train_pairs": len(train.generation), "data/eval_pairs": len(held.generation),
            "data/skipped_records": train.skipped + held.skipped,
            "data/ignored_understanding_pairs": len(train.understanding) + len(held.understanding)}
    return encode_records(policy, train.generation), encode_records(policy, held.generation), info


def encode_records(policy: FlowPolicy, records, batch_size: int = 16) -> LatentPairs:
    """Load each record's two images at the policy's resolution and VAE-encode them."""
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
@register_algorithm("diffusion_dpo")
class DiffusionDPOTrainer(PreferenceTrainer):
    """Offline Diffusion-DPO: a fixed set of latent pairs, an epoch-shuffled order, AdamW on the adapter."""

    policy_section = "flow"
    # Diffusion-DPO's beta scale: it multiplies mean squared velocity errors, not log-prob sums
    default_sections = {"dpo": lambda: DPOConfig(beta=5000.0), "flow": FlowConfig}

    def setup(self, worker_pool=None):
        self.train_set, self.eval_set, self.data_info = load_latent_pairs(self.cfg, self.policy, self.run_dir)
        # evaluation samples the image task's prompts, else the pairs' own prompts
        if self.cfg.image_task is not None:
            self.eval_tasks = [ImageTask.from_config(self.cfg.image_task, self.cfg.seed)]
        else:
            prompts = sorted(set(self.train_set.prompts) | set(self.eval_set.prompts))
            self.eval_tasks = [ImageTask(prompts, len(prompts), self.cfg.seed)]
        print(f"diffusion_dpo: {len(self.train_set)} training pairs, {len(self.eval_set)} held out")

    def start_metrics(self) -> dict:
        return dict(self.data_info)

    def draw(self, n: int, shape, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One flow time and one noise per pair, from `generator` (shared by the pair's two images)."""
        t = sample_flow_times(n, generator, self.cfg.flow.dpo_timestep_sampling)
        return t, torch.randn(shape, generator=generator)

    def pair_terms(self, pair: LatentPairs, generator: torch.Generator):
        """Policy and reference -err/2 of a pair batch, one (t, noise) per pair drawn from `generator`."""
        chunk = PairChunk("generation", pair, None, *self.draw(len(pair), pair.chosen.shape, generator))
        rows = list(range(len(pair)))
        return self.chunk_logps(chunk, rows), self.chunk_reference(chunk, rows)

    def chunk_logps(self, chunk: PairChunk, rows: list[int]) -> PairLogps:
        return diffusion_pair_logps(self.policy, chunk.pairs.select(rows), chunk.t[rows], chunk.noise[rows])

    def chunk_reference(self, chunk: PairChunk, rows: list[int]) -> PairLogps:
        with torch.no_grad(), self.policy.reference():
            return self.chunk_logps(chunk, rows).detach()

    def train_step(self) -> StepResult:
        d, step = self.opt, self.step + 1
        size = self.micro_size()
        per_step = size * d.gradient_accumulation_steps
        picks = [epoch_order(len(self.train_set), self.cfg.seed, n) for n in range((step - 1) * per_step, step * per_step)]
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step * 7919 + 3) % (2 ** 63))
        chunks, t0 = [], time.perf_counter()
        for start in range(0, len(picks), size):  # (t, noise) drawn here, in order: the same on any rank count
            pair = self.train_set.select(picks[start:start + size])
            chunks.append(PairChunk("generation", pair, None, *self.draw(len(pair), pair.chosen.shape, g)))
        return self.finish_step(self.run_update((chunks, 1)), step, t0)

    def evaluate_samples(self) -> dict:
        """Held-out pairs with the same (t, noise) at every evaluation (eval/dpo/*), then samples."""
        outs = []
        if len(self.eval_set):
            g = torch.Generator().manual_seed(EVAL_NOISE_SEED)
            for idx in index_chunks(len(self.eval_set), self.opt.per_device_eval_batch_size):
                lp, ref = self.pair_terms(self.eval_set.select(idx), g)
                outs.append(("generation", dpo_losses(lp, ref, **loss_kwargs(self.opt))))
        return {**summarize_outputs(outs, "eval/dpo"), **super().evaluate_samples()}
