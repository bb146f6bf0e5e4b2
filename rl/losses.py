"""The maths of the algorithms, in small registries the config asks (verl's `core_algos` style).

| registry                   | config key                       | built-in names                      |
| -------------------------- | -------------------------------- | ----------------------------------- |
| advantage estimators       | `grpo.advantage_estimator`       | grpo, rloo                          |
| policy losses              | `grpo.importance_sampling_level` | token (GRPO/PPO clip), sequence (GSPO) |
| loss aggregations          | `grpo.loss_type`                 | grpo, bnpo, dr_grpo, dapo           |
| DPO losses                 | `dpo.loss_type`                  | sigmoid, robust, hinge, ipo, sft    |
| sampler IS corrections     | `grpo.vllm_importance_sampling_mode` | token_/sequence_ truncate, mask |

A new entry is a decorated function (`@register_policy_loss("mine")`); configs can name it at once.
Option names and definitions follow TRL's GRPOConfig / DPOConfig; where ours differ the docstring
says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..policies.registry import Registry

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
LOSS_AGGREGATIONS = Registry("loss aggregation")
DPO_LOSSES = Registry("DPO loss")
IS_CORRECTIONS = Registry("sampler importance-sampling correction")
register_advantage_estimator = ADVANTAGE_ESTIMATORS.register
register_policy_loss = POLICY_LOSSES.register
register_loss_aggregation = LOSS_AGGREGATIONS.register
register_dpo_loss = DPO_LOSSES.register
register_is_correction = IS_CORRECTIONS.register


def lookup(table: Registry, name: str, what: str) -> Callable:
    return table.lookup(name, what)


# ----------------------------------------------------------------------------- advantages
@register_advantage_estimator("grpo")
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None = None,
                    scale_rewards: str = "group", std_floor: float = 1e-4, eps: float = 1e-4, ddof: int = 1):
    """A_i = (r_i - mean_group) / (std + eps), per group of samples sharing a prompt.

    - invalid samples (valid=False) get A = 0 and do not enter their group's mean/std;
    - a group with fewer than 2 valid samples, or whose reward std is below `std_floor`, carries no
      signal and gets A = 0 (never NaN, and no huge "illusory" advantages from a tiny std);
    - scale_rewards: "group" divides by the group std, "batch" by the std of all valid rewards,
      "none" only centres (Dr. GRPO);
    - ddof: 1 = the sample std (torch.std, TRL), 0 = the population std (np.std: flow_grpo's
      PerPromptStatTracker, which with scale_rewards "batch" is its global_std).
    Returns (advantages (B,), stats dict).
    """
    return _group_advantages(rewards, group_ids, valid, scale_rewards, std_floor, eps, leave_one_out=False, ddof=ddof)


@register_advantage_estimator("rloo")
def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor | None = None,
                    scale_rewards: str = "none", std_floor: float = 1e-4, eps: float = 1e-4, ddof: int = 1):
    """REINFORCE leave-one-out (TRL's RLOO): A_i = r_i - mean of the other valid samples of its group
    = k/(k-1) * (r_i - mean_group); scaled as `scale_rewards` says (TRL's RLOO does not scale: none)."""
    return _group_advantages(rewards, group_ids, valid, scale_rewards, std_floor, eps, leave_one_out=True, ddof=ddof)


def _group_advantages(rewards, group_ids, valid, scale_rewards, std_floor, eps, leave_one_out: bool, ddof: int = 1):
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    r = rewards.float()
    valid = torch.isfinite(r) if valid is None else (valid & torch.isfinite(r))
    adv = torch.zeros_like(r)
    batch_std = r[valid].std(correction=ddof) if valid.sum() > 1 else torch.tensor(0.0)
    flat = 0
    groups = group_ids.unique()
    for g in groups:
        members = (group_ids == g) & valid
        if members.sum() < 2:
            flat += 1
            continue
        rg = r[members]
        std = rg.std(correction=ddof)
        if std < std_floor:
            flat += 1
            continue
        centred = rg - rg.mean()
        if leave_one_out:
            k = len(rg)
            centred = centred * k / (k - 1)
        if scale_rewards == "group":
            centred = centred / (std + eps)
        elif scale_rewards == "batch":
            centred = centred / (batch_std + eps)
        adv[members] = centred
    stats = {"advantage/flat_group_fraction": flat / max(len(groups), 1),
             "advantage/abs_mean": adv[valid].abs().mean().item() if valid.any() else 0.0}
    return adv, stats


# ----------------------------------------------------------------------------- policy losses
def _clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float | None):
    """-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A), rho = exp(log_ratio); and (rho, was_clipped)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - epsilon, 1 + eps_high) * adv
    return -torch.min(unclipped, clipped), ratio, (unclipped != clipped).float()


@register_policy_loss("token")
def token_policy_loss(logp, old_logp, advantages, mask, epsilon: float = 0.2, epsilon_high: float | None = None):
    """GRPO / PPO: one importance ratio per token, rho_t = exp(logp_t - old_t) (B, T)."""
    return _clipped_surrogate(logp - old_logp, advantages, epsilon, epsilon_high)


@register_policy_loss("sequence")
def sequence_policy_loss(logp, old_logp, advantages, mask, epsilon: float = 0.2, epsilon_high: float | None = None):
    """GSPO: one ratio per sequence, rho = exp(mean over its completion tokens of logp - old) (B, 1),
    clipped like a token ratio (TRL: importance_sampling_level="sequence"). GSPO's paper uses much
    smaller clip ranges (e.g. 3e-4 / 4e-4) than token-level GRPO."""
    m = mask.float()
    log_ratio = ((logp - old_logp) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return _clipped_surrogate(log_ratio.unsqueeze(-1), advantages, epsilon, epsilon_high)


# ----------------------------------------------------------------------------- sampler/learner mismatch
# Rollout log-probs are recorded by a sampler (the KV-cached decode, a Ray worker, an engine) whose
# kernels round differently from the learner's teacher-forced pass, and for one-step-off batches it also
# ran one adapter version behind. The token was drawn from the sampler's distribution, so the learner's
# loss is reweighted by w = pi_learner_old / pi_sampler (truncated importance sampling, TRL's
# `vllm_importance_sampling_*`): w = exp(old - sampler), masked tokens contribute log-ratio 0.
def _log_is_ratio(old_logp, sampler_logp, mask, sequence: bool) -> torch.Tensor:
    d = torch.nan_to_num((old_logp - sampler_logp) * mask, nan=0.0)
    return d.sum(-1, keepdim=True) if sequence else d  # sequence: the product of the token ratios (TRL)


def _truncate(log_ratio, clip_min, clip_max):
    ratio = torch.exp(log_ratio)
    return ratio if clip_min is None and clip_max is None else ratio.clamp(min=clip_min, max=clip_max)


def _mask_outside(log_ratio, clip_min, clip_max):
    ratio = torch.exp(log_ratio)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def _is_correction(sequence: bool, bound, doc: str):
    def correction(old_logp, sampler_logp, mask, clip_min=None, clip_max=3.0):
        return bound(_log_is_ratio(old_logp, sampler_logp, mask, sequence), clip_min, clip_max)
    correction.__doc__ = doc
    return correction


for _name, _sequence, _bound, _doc in (
        ("token_truncate", False, _truncate, "w_t = clamp(exp(old_t - sampler_t), clip_min, clip_max) (B, T)."),
        ("token_mask", False, _mask_outside, "w_t = exp(old_t - sampler_t), 0 outside [clip_min, clip_max] (B, T)."),
        ("sequence_truncate", True, _truncate, "One weight per sequence, exp(sum_t old_t - sampler_t) clamped to "
                                               "[clip_min, clip_max] (B, 1)."),
        ("sequence_mask", True, _mask_outside, "One weight per sequence, exp(sum_t old_t - sampler_t), 0 outside "
                                               "[clip_min, clip_max] (B, 1).")):
    register_is_correction(_name)(_is_correction(_sequence, _bound, _doc))


def sampler_is_weights(mode: str, old_logp, sampler_logp, mask, clip_min=None, clip_max=3.0) -> torch.Tensor:
    """The registered correction `mode`'s weights (detached: the weight corrects, it is not optimised)."""
    fn = lookup(IS_CORRECTIONS, mode, "vllm_importance_sampling_mode")
    return fn(old_logp.detach(), sampler_logp.to(old_logp.device), mask.to(old_logp.device), clip_min, clip_max)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    ref_logp: torch.Tensor | None = None, epsilon: float = 0.2,
                    epsilon_high: float | None = None, beta: float = 0.0, level: str = "token",
                    mask: torch.Tensor | None = None, is_weights: torch.Tensor | None = None):
    """Per-token loss of the policy loss `level` (times the sampler correction `is_weights`, (B, T) or
    (B, 1), when given) + beta * KL_k3, and its parts (ratio, kl, was_clipped). As in TRL, the weight
    multiplies the policy term only, not the KL."""
    mask = torch.ones_like(logp) if mask is None else mask
    loss, ratio, was_clipped = lookup(POLICY_LOSSES, level, "policy loss (importance_sampling_level)")(
        logp, old_logp, advantages, mask, epsilon, epsilon_high)
    if is_weights is not None:
        loss = loss * is_weights
    kl = None
    if ref_logp is not None and beta != 0.0:
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
    return loss, ratio, kl, was_clipped


# ----------------------------------------------------------------------------- aggregations
@dataclass
class LossNorm:
    """What an aggregation may normalise by, for one modality: counts over the optimizer step's
    micro-batches (`seqs`, `tokens`) and over the whole rollout batch."""

    seqs: int  # valid sequences in this optimizer step
    tokens: float  # valid completion tokens in this optimizer step
    max_len: int  # the completion length of the batch (dr_grpo's constant)
    batch_tokens: float = 0.0  # valid completion tokens in the whole rollout batch
    steps_per_batch: int = 1  # optimizer steps the rollout batch is split into, per pass


@register_loss_aggregation("grpo")
def grpo_aggregation(per_token, mask, n: LossNorm):
    """Mean over sequences of per-sequence token means (the GRPO paper; TRL `grpo`)."""
    m = mask.float()
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / n.seqs


@register_loss_aggregation("bnpo")
def bnpo_aggregation(per_token, mask, n: LossNorm):
    """Token mean over the optimizer step's micro-batches. Differs from TRL's `bnpo`, which takes the
    mean per micro-batch and divides by the accumulation steps; equal when there is one micro-batch."""
    return (per_token * mask.float()).sum() / max(n.tokens, 1.0)


@register_loss_aggregation("dr_grpo")
def dr_grpo_aggregation(per_token, mask, n: LossNorm):
    """Token sum / (sequences * max completion length), a constant normaliser (Dr. GRPO; TRL `dr_grpo`)."""
    return (per_token * mask.float()).sum() / (n.seqs * n.max_len)


@register_loss_aggregation("dapo")
def dapo_aggregation(per_token, mask, n: LossNorm):
    """TRL's `dapo`: token sum / (the rollout batch's tokens / optimizer steps per batch), i.e. every
    token of the generation batch weighs the same, whichever optimizer step it falls in."""
    return (per_token * mask.float()).sum() / max(n.batch_tokens / max(n.steps_per_batch, 1), 1.0)


def aggregate_with(loss_type: str, per_token: torch.Tensor, mask: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    """This micro-batch's share of the loss under the registered aggregation `loss_type`: summing the
    shares of an optimizer step's micro-batches gives the full value (the normalisers span the step)."""
    return lookup(LOSS_AGGREGATIONS, loss_type, "loss_type")(per_token, mask, norm)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, num_seqs: int, num_tokens: float,
              max_len: int, batch_tokens: float | None = None, steps_per_batch: int = 1) -> torch.Tensor:
    """`aggregate_with` from plain counts (the rollout batch = this optimizer step unless given)."""
    norm = LossNorm(num_seqs, num_tokens, max_len, num_tokens if batch_tokens is None else batch_tokens,
                    steps_per_batch)
    return aggregate_with(loss_type, per_token, mask, norm)


# ----------------------------------------------------------------------------- DPO
@dataclass
class PairLogps:
    """Summed log-probs of the chosen and rejected samples of B pairs, and how many tokens each sums."""

    chosen: torch.Tensor  # (B,)
    rejected: torch.Tensor  # (B,)
    chosen_len: torch.Tensor  # (B,) float
    rejected_len: torch.Tensor  # (B,) float

    def __len__(self) -> int:
        return len(self.chosen)

    def _map(self, fn) -> "PairLogps":
        return PairLogps(*(fn(t) for t in (self.chosen, self.rejected, self.chosen_len, self.rejected_len)))

    def detach(self) -> "PairLogps":
        return self._map(lambda t: t.detach().float().cpu())

    def select(self, index) -> "PairLogps":
        index = torch.as_tensor(list(index), dtype=torch.long)
        return self._map(lambda t: t[index])

    def to(self, device) -> "PairLogps":
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(parts: list["PairLogps"]) -> "PairLogps":
        return PairLogps(*(torch.cat([getattr(p, f) for p in parts])
                           for f in ("chosen", "rejected", "chosen_len", "rejected_len")))


@dataclass
class PairTerms:
    """What a DPO loss is written in: log-ratios to the reference, their difference, lengths, NLL."""

    chosen_ratio: torch.Tensor  # log pi(chosen) - log ref(chosen)
    rejected_ratio: torch.Tensor
    delta: torch.Tensor  # chosen_ratio - rejected_ratio
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    chosen_nll: torch.Tensor  # mean NLL per token of the chosen sample


@register_dpo_loss("sigmoid")
def sigmoid_dpo(t: PairTerms, beta: float, eps: float):
    """-(1-e) log s(beta*delta) - e log s(-beta*delta): DPO, cDPO when e = label_smoothing > 0.
    (TRL 1.16's `sigmoid` ignores label_smoothing.)"""
    return -(1 - eps) * F.logsigmoid(beta * t.delta) - eps * F.logsigmoid(-beta * t.delta)


@register_dpo_loss("robust")
def robust_dpo(t: PairTerms, beta: float, eps: float):
    """rDPO: (-(1-e) log s(beta*delta) + e log s(-beta*delta)) / (1-2e)."""
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {eps}")
    return (-(1 - eps) * F.logsigmoid(beta * t.delta) + eps * F.logsigmoid(-beta * t.delta)) / (1 - 2 * eps)


@register_dpo_loss("hinge")
def hinge_dpo(t: PairTerms, beta: float, eps: float):
    """SLiC: relu(1 - beta*delta)."""
    return torch.relu(1 - beta * t.delta)


@register_dpo_loss("ipo")
def ipo_dpo(t: PairTerms, beta: float, eps: float):
    """IPO: (delta_avg - 1/(2*beta))^2 with delta_avg from per-token averages, as TRL does."""
    avg = t.chosen_ratio / t.chosen_len.clamp(min=1) - t.rejected_ratio / t.rejected_len.clamp(min=1)
    return (avg - 1 / (2 * beta)) ** 2


@register_dpo_loss("sft")
def sft_loss(t: PairTerms, beta: float, eps: float):
    """Mean NLL per token of the chosen sample."""
    return t.chosen_nll


@dataclass
class DPOOutput:
    losses: torch.Tensor  # (B,) per-pair loss, the weighted sum over loss types (mean it for the batch loss)
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi - log ref) of the chosen sample, detached
    rejected_rewards: torch.Tensor  # (B,)


def dpo_losses(policy: PairLogps, ref: PairLogps, beta: float, loss_type=("sigmoid",), loss_weights=None,
               label_smoothing: float = 0.0, rpo_alpha: float | None = None) -> DPOOutput:
    """Per-pair DPO losses from summed log-probs: the registered `loss_type`s weighted by `loss_weights`
    (TRL's multi-loss), plus rpo_alpha * NLL of the chosen sample (RPO) when set."""
    if isinstance(loss_type, str):
        loss_type = [loss_type]
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_type)
    if len(weights) != len(loss_type):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(loss_type)} loss types")
    fns = [lookup(DPO_LOSSES, name, "DPO loss_type") for name in loss_type]
    ref = ref.to(policy.chosen.device)
    chosen_ratio = policy.chosen - ref.chosen
    rejected_ratio = policy.rejected - ref.rejected
    terms = PairTerms(chosen_ratio, rejected_ratio, chosen_ratio - rejected_ratio, policy.chosen_len,
                      policy.rejected_len, -policy.chosen / policy.chosen_len.clamp(min=1))
    total = torch.zeros_like(terms.delta)
    for fn, w in zip(fns, weights):
        total = total + w * fn(terms, beta, float(label_smoothing))
    if rpo_alpha:
        total = total + rpo_alpha * terms.chosen_nll
    return DPOOutput(total, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if chosen is ranked above rejected, 0 below, 1/2 on a tie (TRL counts a tie as 0)."""
    m = chosen_rewards - rejected_rewards
    return (m > 0).float() + 0.5 * (m == 0).float()


def summarize_outputs(outs: list[tuple[str, DPOOutput]], prefix: str) -> dict:
    """<prefix>/loss, accuracy, margin, chosen/rejected reward over all pairs, and accuracy and margin
    per pair kind."""
    if not outs:
        return {}
    cat = lambda sel, f: torch.cat([getattr(o, f).detach().float().cpu() for o in sel])  # noqa: E731
    every = [o for _, o in outs]
    cr, rr = cat(every, "chosen_rewards"), cat(every, "rejected_rewards")
    m = {f"{prefix}/loss": cat(every, "losses").mean().item(),
         f"{prefix}/accuracy": preference_accuracy(cr, rr).mean().item(),
         f"{prefix}/margin": (cr - rr).mean().item(),
         f"{prefix}/chosen_reward": cr.mean().item(),
         f"{prefix}/rejected_reward": rr.mean().item(),
         f"{prefix}/pairs": len(cr)}
    for kind in {k for k, _ in outs}:
        sel = [o for k, o in outs if k == kind]
        kc, kr = cat(sel, "chosen_rewards"), cat(sel, "rejected_rewards")
        m[f"{prefix}/{kind}/accuracy"] = preference_accuracy(kc, kr).mean().item()
        m[f"{prefix}/{kind}/margin"] = (kc - kr).mean().item()
    return m
