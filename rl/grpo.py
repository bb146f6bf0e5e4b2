"""GRPO: group-relative advantages and the clipped-ratio policy loss.

Option names follow TRL's GRPOConfig (beta, epsilon, epsilon_high, loss_type, scale_rewards).
"""
from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None = None,
                    scale_rewards: str = "group", std_floor: float = 1e-4, eps: float = 1e-4):
    """A_i = (r_i - mean_group) / (std + eps), per group of samples sharing a prompt.

    - invalid samples (valid=False) get A = 0 and do not enter their group's mean/std;
    - a group with fewer than 2 valid samples, or whose reward std is below `std_floor`, carries no
      signal and gets A = 0 (never NaN, and no huge "illusory" advantages from a tiny std);
    - scale_rewards: "group" divides by the group std, "batch" by the std of all valid rewards,
      "none" only centres (Dr. GRPO).
    Returns (advantages (B,), stats dict).
    """
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    r = rewards.float()
    valid = torch.isfinite(r) if valid is None else (valid & torch.isfinite(r))
    adv = torch.zeros_like(r)
    batch_std = r[valid].std() if valid.sum() > 1 else torch.tensor(0.0)
    flat = 0
    groups = group_ids.unique()
    for g in groups:
        members = (group_ids == g) & valid
        if members.sum() < 2:
            flat += 1
            continue
        rg = r[members]
        std = rg.std()
        if std < std_floor:
            flat += 1
            continue
        centred = rg - rg.mean()
        if scale_rewards == "group":
            centred = centred / (std + eps)
        elif scale_rewards == "batch":
            centred = centred / (batch_std + eps)
        adv[members] = centred
    stats = {"advantage/flat_group_fraction": flat / max(len(groups), 1),
             "advantage/abs_mean": adv[valid].abs().mean().item() if valid.any() else 0.0}
    return adv, stats


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    ref_logp: torch.Tensor | None = None, epsilon: float = 0.2,
                    epsilon_high: float | None = None, beta: float = 0.0):
    """Per-token loss -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) + beta*KL_k3, and its parts."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - epsilon, 1 + eps_high) * adv
    loss = -torch.min(unclipped, clipped)
    kl = None
    if ref_logp is not None and beta != 0.0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3: unbiased, always >= 0
        loss = loss + beta * kl
    was_clipped = (unclipped != clipped).float()
    return loss, ratio, kl, was_clipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, num_seqs: int, num_tokens: float,
              max_len: int) -> torch.Tensor:
    """Sum this micro-batch's share of the loss so that accumulating micro-batches gives the full-batch
    value: grpo = mean over sequences of per-sequence token means; bnpo = token mean over the batch;
    dr_grpo = token sum / (num_seqs * max_len), a constant normaliser."""
    m = mask.float()
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / num_seqs
    if loss_type == "bnpo":
        return (per_token * m).sum() / max(num_tokens, 1.0)
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (num_seqs * max_len)
    raise ValueError(f"unknown loss_type {loss_type!r}; use grpo, bnpo or dr_grpo")
