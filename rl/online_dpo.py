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

import torch

from ..policies.batches import GenerationPair, ScoredBatch, UnderstandingPair
from ..rewards.base import RewardContext
from ..rewards.parsing import PAIRWISE_MODES
from ..rollouts.pipeline import make_pool, sample_and_score
from .dpo import PairChunk, PreferenceTrainer, update_metrics
from .pair_logps import reference_pair_logps
from .registry import register_algorithm
from .tasks import build_tasks
from .trainer import StepResult, index_chunks, reward_metrics


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


def ranking_scores(components: dict, rewards) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split the component outputs of a mixture into (pointwise total, pairwise total) by the kind of
    each component (a pairwise judge scores win rates inside the prompt's group)."""
    point, pair = None, None
    for spec in rewards.specs:
        out = components.get(spec.name)
        if out is None:
            continue
        part = spec.weight * torch.where(out.valid, out.scores.float(), torch.zeros(()))
        if getattr(spec.reward, "mode", None) in PAIRWISE_MODES:
            pair = part if pair is None else pair + part
        else:
            point = part if point is None else point + part
    return point, pair


def select_pairs_of(sb: ScoredBatch, rewards, margin: float, per_prompt: int = 1) -> Selection:
    """The pairs of a scored batch (see `select_pairs`), ranked by the mixture's pointwise and pairwise parts."""
    point, pair = ranking_scores(sb.components, rewards)
    return select_pairs(sb.batch.group_ids, sb.valid, point, margin, pair, per_prompt)


def sample_rank_select(worker, rewards, request, margin: float, policy, step: int, per_prompt: int = 1):
    """Sample a request's candidates, score them, select pairs: (batch, mixture output, Selection)."""
    batch = worker.generate(request)
    mix = rewards(batch, RewardContext(policy=policy, step=step))
    sel = select_pairs_of(ScoredBatch(batch, mix.total, mix.valid, mix.components), rewards, margin, per_prompt)
    return batch, mix, sel


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
@register_algorithm("online_dpo")
class OnlineDPOTrainer(PreferenceTrainer):
    """Each round: sample -> score -> select pairs -> `dpo.online_updates` DPO steps on them."""

    min_generations = 2  # a pair needs two candidates per prompt
    samples_rollouts = True

    def setup(self, worker_pool=None):
        if self.rewards is None:
            raise ValueError("online_dpo ranks candidates with the reward mixture: configure `rewards`")
        if self.cfg.rollout.num_generations < 2:
            raise ValueError("online_dpo needs rollout.num_generations >= 2 candidates per prompt")
        self.tasks = self.eval_tasks = build_tasks(self.cfg, self.policy.image_size)
        self.workers = worker_pool or make_pool(self.policy, self.spec, self.sampling, self.cfg.rollout,
                                                self.cfg.seed, self.cfg.ray, self.cfg.learner.full_finetune)

    def train_step(self) -> StepResult:
        d, step = self.opt, self.step + 1
        t0 = time.perf_counter()
        requests = [task.request(step, self.cfg.rollout.num_generations) for task in self.tasks]
        scored, _ = sample_and_score(self.workers, self.rewards, self.policy, requests, step)
        m, pairs = reward_metrics(scored, self.rewards), []
        for sb in scored:
            sel = select_pairs_of(sb, self.rewards, d.online_margin, d.online_pairs_per_prompt)
            kind = sb.batch.kind
            m[f"online/{kind}/pairs"] = len(sel)
            m[f"online/{kind}/dropped_unseparated"] = sel.dropped_unseparated
            m[f"online/{kind}/dropped_invalid"] = sel.dropped_invalid
            if len(sel):
                gaps = [a - b for a, b in zip(sel.chosen_scores, sel.rejected_scores)]
                m[f"online/{kind}/score_gap"] = sum(gaps) / len(gaps)
                pairs.append(pairs_from_rollout(sb.batch, sel))
        t1 = time.perf_counter()
        m["online/pairs"] = sum(len(p) for p in pairs)
        if pairs:
            # the reference of the whole round before any update (the same on every rank)
            mode, cfg_scale = self.logprob_settings()
            size = self.micro_size()
            chunks = [PairChunk(p.kind, p.select(idx), reference_pair_logps(self.policy, p.select(idx), mode, cfg_scale))
                      for p in pairs for idx in index_chunks(len(p), size)]
            m.update(update_metrics(self.run_update((chunks, d.online_updates))))
        self.new_version()
        self.step = step
        m.update({"time/rollout": t1 - t0, "time/update": time.perf_counter() - t1,
                  "adapter/version": self.policy.version})
        return StepResult(m, scored)

    def logprob_settings(self) -> tuple[str, float]:
        # Train the distribution the candidates were drawn from (as GRPO does): with CFG sampling a
        # conditional-only update is largely cancelled by the unconditional branch sharing the adapter.
        return self.cfg.rollout.logprob_mode, self.cfg.rollout.cfg_scale


__all__ = ["Selection", "select_pairs", "select_pairs_of", "ranking_scores", "sample_rank_select",
           "pairs_from_rollout", "OnlineDPOTrainer"]
