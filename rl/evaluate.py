"""Evaluation by sampling: every task prompt, n samples with fixed seeds, scored by the reward mixture.

The training reward of a step is noisy (other prompts, other seeds every step); this one is not:
the same prompts and the same per-sample seeds at every evaluation, so two evaluations differ only
by what the adapter learned. GRPO and Flow-GRPO run it every `grpo.eval_steps`; DPO, online DPO and
Diffusion-DPO every `dpo.eval_steps`. Metrics: eval/reward/<name>/mean, eval/reward/<kind>/mean.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..rewards.base import RewardContext
from ..rewards.builtin import named_color
from ..rollouts.worker import RolloutRequest
from .runlog import save_image_grid

EVAL_SEED_STEP = 10 ** 9  # the `step` evaluation samples are seeded with: the same at every evaluation


def image_eval_request(prompts: list[str], samples_per_prompt: int) -> RolloutRequest:
    return RolloutRequest("image", list(prompts), samples_per_prompt, EVAL_SEED_STEP,
                          targets=[named_color(p) or "" for p in prompts])


def eval_requests(tasks, samples_per_prompt: int) -> list[RolloutRequest]:
    """One request per task covering all of its prompts (ImageTask / TextTask), fixed seeds."""
    reqs = []
    for task in tasks or []:
        if task.kind == "image":
            reqs.append(image_eval_request(task.prompts, samples_per_prompt))
        else:
            reqs.append(RolloutRequest("text", [q for _, q, _ in task.items], samples_per_prompt, EVAL_SEED_STEP,
                                       targets=[a for _, _, a in task.items],
                                       images=torch.stack([im for im, _, _ in task.items])))
    return reqs


@torch.no_grad()
def evaluate_samples(worker, requests: list[RolloutRequest], rewards, policy, step: int,
                     grid_path: str | Path | None = None) -> dict:
    """Sample `requests` with `worker` (its policy in eval mode) and score them: eval/reward/* metrics;
    with `grid_path`, a PNG grid of (up to 32) sampled images with their rewards."""
    if rewards is None or not requests:
        return {}
    m = {}
    for req in requests:
        batch = worker.generate(req)
        if not rewards.applicable(batch.kind):
            continue
        mix = rewards(batch, RewardContext(policy=policy, step=step))
        for name, out in mix.components.items():
            m[f"eval/reward/{name}/mean"] = out.scores[out.valid].mean().item() if out.valid.any() else float("nan")
        m[f"eval/reward/{batch.kind}/mean"] = mix.total[mix.valid].mean().item() if mix.valid.any() else float("nan")
        if batch.kind == "image" and grid_path is not None:
            k = min(len(batch), 32)
            save_image_grid(batch.images[:k], [f"{batch.prompts[i]} r={mix.total[i]:.2f}" for i in range(k)],
                            grid_path)
    return m
