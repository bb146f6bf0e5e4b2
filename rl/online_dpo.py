"""Online DPO (`algorithm: online_dpo`) and the sample-rank-select step it shares with `uniloop pairs`.

One round: sample `rollout.num_generations` candidates per prompt of each task, score them with
the configured reward mixture, keep per prompt the best candidate as `chosen` and the worst as
`rejected`, drop the prompt when the two are not separated by more than `dpo.online_margin`
(or fewer than two candidates were validly scored), then take DPO steps on the kept pairs. Image
log-probs are those of the distribution the candidates were sampled from (`rollout.logprob_mode`
at `rollout.cfg_scale`, as for GRPO), not `dpo.logprob_mode`, which is for offline data.

Ranking follows the UnifiedReward recipe when the mixture holds a pairwise judge
(`type: judge`, mode `*_pairwise`, whose score is a win rate inside the prompt's group):
candidates in the upper half by win rate are the winners, the lower half the losers, and the
pointwise part of the mixture picks the best winner and the worst loser (separation is measured
on those pointwise scores). Without a pairwise judge the pointwise total ranks all candidates;
with only a pairwise judge the win rates do.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .algorithms import register_algorithm
from .checkpoint import resume_trainer, save_trainer
from .dpo import (DPOOutput, _chunks, build_eval_tasks, clip_and_step, dpo_losses, loss_kwargs, make_optimizer,
                  evaluate_tasks, pair_logps, reference_pair_logps, run_loop,
                  seed_everything, summarize_outputs)
from .preference_data import GenerationPair, UnderstandingPair


# ----------------------------------------------------------------------------- ranking
@dataclass
class Selection:
    """Per kept prompt: indices (into the rollout batch) of the chosen and rejected candidates."""

    chosen: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    chosen_scores: list[float] = field(default_factory=list)
    rejected_scores: list[float] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)  # group id of each kept pair
    dropped_unseparated: int = 0  # prompts whose best and worst candidates were within the margin
    dropped_invalid: int = 0  # prompts with fewer than two validly scored candidates

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def dropped(self) -> int:
        return self.dropped_unseparated + self.dropped_invalid


def select_pairs(group_ids: torch.Tensor, valid: torch.Tensor, pointwise: torch.Tensor | None,
                 margin: float = 0.0, pairwise: torch.Tensor | None = None, per_prompt: int = 1) -> Selection:
    """Best winner / worst loser per group (see the module docstring); ties keep the earlier sample.
    With `per_prompt` k > 1, also the 2nd best against the 2nd worst, ... (k pairs at most, disjoint).

    `pointwise` and `pairwise` are (B,) scores (either may be None, not both); `valid` (B,) bool.
    A pair is kept only if chosen_score - rejected_score > margin; a prompt none of whose pairs is
    kept counts as dropped.
    """
    if per_prompt < 1:
        raise ValueError(f"pairs per prompt must be >= 1, got {per_prompt}")
    if pointwise is None and pairwise is None:
        raise ValueError("select_pairs needs pointwise and/or pairwise scores")
    sel = Selection()
    order: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        order.setdefault(g, []).append(i)
    for g, members in order.items():
        ok = [i for i in members if bool(valid[i])]
        if len(ok) < 2:
            sel.dropped_invalid += 1
            continue
        if pairwise is not None and pointwise is not None:
            ranked = sorted(ok, key=lambda i: -float(pairwise[i]))  # stable: earlier sample first on ties
            half = len(ranked) // 2
            winners, losers = ranked[:half], ranked[half:]
            score = pointwise
        else:
            score = pointwise if pointwise is not None else pairwise
            winners = losers = ok
        # best first among the winners, worst first among the losers; ties keep the earlier sample
        best = sorted(winners, key=lambda i: (-float(score[i]), i))
        worst = sorted(losers, key=lambda i: (float(score[i]), i))
        kept, used = 0, set()
        for c, r in zip(best, worst):
            if kept == per_prompt or c in used or r in used or c == r:
                break
            used.update((c, r))
            if not float(score[c]) - float(score[r]) > margin:
                break  # later pairs are closer still
            sel.chosen.append(c)
            sel.rejected.append(r)
            sel.chosen_scores.append(float(score[c]))
            sel.rejected_scores.append(float(score[r]))
            sel.groups.append(g)
            kept += 1
        if kept == 0:
            sel.dropped_unseparated += 1
    return sel


def ranking_scores(mix, rewards) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split a MixtureOutput into (pointwise total, pairwise total) by the kind of each component."""
    from ..rewards.parsing import PAIRWISE_MODES

    point, pair = None, None
    for spec in rewards.specs:
        out = mix.components.get(spec.name)
        if out is None:
            continue
        part = spec.weight * torch.where(out.valid, out.scores.float(), torch.zeros(()))
        if getattr(spec.reward, "mode", None) in PAIRWISE_MODES:
            pair = part if pair is None else pair + part
        else:
            point = part if point is None else point + part
    return point, pair


def sample_rank_select(worker, rewards, request, margin: float, policy, step: int, per_prompt: int = 1):
    """Sample a request's candidates, score them, select pairs: (batch, mixture output, Selection)."""
    from ..rewards.base import RewardContext

    batch = worker.generate(request)
    mix = rewards(batch, RewardContext(policy=policy, step=step))
    point, pair = ranking_scores(mix, rewards)
    return batch, mix, select_pairs(batch.group_ids, mix.valid, point, margin, pair, per_prompt)


def pairs_from_rollout(batch, sel: Selection):
    """The selected candidates as a typed pair batch (exact sampled tokens, no re-encoding)."""
    c, r = sel.chosen, sel.rejected
    meta = [{"chosen_score": a, "rejected_score": b} for a, b in zip(sel.chosen_scores, sel.rejected_scores)]
    if batch.kind == "image":
        return GenerationPair(prompts=[batch.prompts[i] for i in c], chosen_tokens=batch.image_tokens[c].long(),
                              rejected_tokens=batch.image_tokens[r].long(), meta=meta)
    ids = lambda i: batch.answer_ids[i][batch.answer_mask[i].bool()].tolist()  # noqa: E731
    return UnderstandingPair(questions=[batch.prompts[i] for i in c], images=batch.images[c].float(),
                             chosen=[batch.answers[i] for i in c], rejected=[batch.answers[i] for i in r],
                             meta=meta, chosen_ids=[ids(i) for i in c], rejected_ids=[ids(i) for i in r])


# ----------------------------------------------------------------------------- the trainer
class OnlineDPOTrainer:
    def __init__(self, cfg):
        from ..rollouts.worker import RolloutWorker, make_policy
        from .tasks import build_tasks
        from .trainer import build_rewards

        self.cfg, self.d = cfg, cfg.dpo
        self.run_dir = Path(cfg.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        tiny_dir = self.run_dir.parent / ".tiny_models" / f"janus_seed{cfg.seed}"
        self.policy = make_policy(cfg.model, cfg.lora, tiny_dir=tiny_dir)
        self.policy.model.train()
        self.optimizer = make_optimizer(self.policy, self.d)
        self.rewards = build_rewards(cfg, self.run_dir)
        self.tasks = build_tasks(cfg, self.policy.image_size)
        self.eval_tasks = build_eval_tasks(cfg, self.policy)
        self.worker = RolloutWorker(self.policy, cfg.rollout, cfg.seed, shares_learner_policy=True)
        # Train the distribution the candidates were drawn from (as GRPO does): with CFG sampling a
        # conditional-only update is largely cancelled by the unconditional branch sharing the adapter.
        self.mode, self.cfg_scale = cfg.rollout.logprob_mode, cfg.rollout.cfg_scale
        self.step = 0

    def train_step(self) -> dict:
        d, step = self.d, self.step + 1
        t0 = time.perf_counter()
        m, pairs = {}, []
        for task in self.tasks:
            req = task.request(step, self.cfg.rollout.num_generations)
            batch, mix, sel = sample_rank_select(self.worker, self.rewards, req, d.online_margin, self.policy, step,
                                                 d.online_pairs_per_prompt)
            kind = batch.kind
            for name, out in mix.components.items():
                m[f"reward/{name}/mean"] = out.scores[out.valid].mean().item() if out.valid.any() else float("nan")
            m[f"reward/{kind}/mean"] = mix.total[mix.valid].mean().item() if mix.valid.any() else float("nan")
            m[f"online/{kind}/pairs"] = len(sel)
            m[f"online/{kind}/dropped_unseparated"] = sel.dropped_unseparated
            m[f"online/{kind}/dropped_invalid"] = sel.dropped_invalid
            if len(sel):
                gaps = [a - b for a, b in zip(sel.chosen_scores, sel.rejected_scores)]
                m[f"online/{kind}/score_gap"] = sum(gaps) / len(gaps)
                pairs.append(pairs_from_rollout(batch, sel))
        t1 = time.perf_counter()
        m["online/pairs"] = sum(len(p) for p in pairs)
        if pairs:
            refs = [PairRef(p, reference_pair_logps(self.policy, p, self.mode, self.cfg_scale)) for p in pairs]
            for _ in range(d.online_updates):
                m.update(self.update(refs))
        self.policy.version += 1
        self.step = step
        m.update({"time/rollout": t1 - t0, "time/update": time.perf_counter() - t1,
                  "adapter/version": self.policy.version})
        return m

    def update(self, refs: list["PairRef"]) -> dict:
        """One optimizer step over all pairs of the round (micro-batched, each pair weighing the same)."""
        d = self.d
        total = sum(len(r.pair) for r in refs)
        self.optimizer.zero_grad(set_to_none=True)
        outs: list[tuple[str, DPOOutput]] = []
        for r in refs:
            for idx in _chunks(len(r.pair), d.per_device_train_batch_size):
                pair = r.pair.select(idx)
                out = dpo_losses(pair_logps(self.policy, pair, self.mode, self.cfg_scale), r.ref.select(idx),
                                 **loss_kwargs(d))
                (out.losses.sum() / total).backward()
                outs.append((r.pair.kind, out))
        norm = clip_and_step(self.policy, self.optimizer, d.max_grad_norm)
        return {**summarize_outputs(outs, "dpo"), "grad_norm": norm}

    @torch.no_grad()
    def evaluate(self) -> dict:
        was_training = self.policy.model.training
        self.policy.model.eval()
        try:
            return evaluate_tasks(self.cfg, self.policy, self.eval_tasks, self.rewards, self.run_dir, self.step)
        finally:
            self.policy.model.train(was_training)

    def save(self):
        return save_trainer(self)

    def resume(self) -> bool:
        return resume_trainer(self) is not None


@dataclass
class PairRef:
    pair: object  # GenerationPair | UnderstandingPair
    ref: object  # PairLogps of the reference model


@register_algorithm("online_dpo")
def train_online_dpo(cfg, resume: bool = False) -> dict:
    """`algorithm: online_dpo`: sample -> rank -> select -> DPO, every round on fresh pairs."""
    if cfg.dpo is None:
        from .config import DPOConfig
        cfg.dpo = DPOConfig()
    if not cfg.rewards:
        raise ValueError("online_dpo ranks candidates with the reward mixture: configure `rewards`")
    if cfg.rollout.num_generations < 2:
        raise ValueError("online_dpo needs rollout.num_generations >= 2 candidates per prompt")
    trainer = OnlineDPOTrainer(cfg)
    trainer.resume_requested = resume
    return run_loop(trainer, cfg, cfg.dpo.max_steps, "online_dpo")


__all__ = ["Selection", "select_pairs", "ranking_scores", "sample_rank_select", "pairs_from_rollout",
           "OnlineDPOTrainer", "train_online_dpo"]
