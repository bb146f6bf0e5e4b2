"""Offline DPO on preference pairs, for both sides of a unified model (`algorithm: dpo`).

    pairs     = the step's slice of an epoch-shuffled stream over the training set (resume-safe)
    per pair  : log pi(chosen), log pi(rejected)          rl/pair_logps.py (teacher forcing)
                log ref(chosen), log ref(rejected)         the adapter disabled (or precomputed once)
    delta     = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
    loss      = the registered dpo.loss_type(s) of delta   rl/losses.py (TRL's names and formulas)
    update    = every pair weighs the same in the step's mean; one optimizer step (on 1 rank or on
                learner.num_workers ranks, each taking its rows of every micro-batch)

Implicit rewards are beta * (log pi - log ref); `dpo/accuracy` is the fraction of pairs whose chosen
reward is above the rejected one, a tie counting one half (so an untrained adapter, equal to the
reference, reads exactly 0.5 instead of 0). Evaluation: the loss and accuracy on held-out pairs, and,
when the recipe has tasks and rewards, the reward of what the policy now *generates*.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..policies.batches import GENERATION, UNDERSTANDING
from .config import DPOConfig
from .losses import DPOOutput, PairLogps, dpo_losses, summarize_outputs
from .pair_logps import ReferenceTable, pair_logps, reference_pair_logps
from .preference_sets import load_run_data
from .registry import register_algorithm
from .tasks import build_tasks
from .trainer import StepResult, Trainer, index_chunks


def loss_kwargs(d) -> dict:
    """dpo_losses keyword arguments from a DPOConfig."""
    return dict(beta=d.beta, loss_type=d.loss_type, loss_weights=d.loss_weights,
                label_smoothing=d.label_smoothing, rpo_alpha=d.rpo_alpha)


def epoch_order(n: int, seed: int, k: int) -> int:
    """The k-th item of a stream over n items: epoch e = k // n is a seeded permutation (resume-safe)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + k // n))
    return int(perm[k % n])


@dataclass
class PairChunk:
    """One global micro-batch of a preference step: pairs of one kind, their reference log-probs when
    known beforehand (else computed from the frozen reference), and per-pair draws (Diffusion-DPO's
    flow time and noise) made on the driver, so every rank uses the one-rank values of its rows."""

    kind: str
    pairs: object  # GenerationPair | UnderstandingPair | LatentPairs
    ref: PairLogps | None = None
    t: torch.Tensor | None = None
    noise: torch.Tensor | None = None


class PreferenceTrainer(Trainer):
    """What the DPO-family trainers share: the `dpo` section, the step's pairs as global micro-batches
    (`PairChunk`) that `update` turns into one optimizer step (on 1 rank or on learner.num_workers), the
    dpo/* metrics of the step's pairs, evaluation at the first and last step."""

    section = "dpo"
    eval_at_ends = True
    data_parallel = True
    default_sections = {"dpo": DPOConfig}

    def logprob_settings(self) -> tuple[str, float]:
        """(log-prob mode, CFG scale) the pairs' log-probs are taken with."""
        return self.opt.logprob_mode, self.opt.cfg_scale

    def micro_size(self) -> int:
        """Pairs per global micro-batch: per_device_train_batch_size on each rank."""
        return self.opt.per_device_train_batch_size * self.learner_world

    def chunk_logps(self, chunk: PairChunk, rows: list[int]) -> PairLogps:
        mode, cfg_scale = self.logprob_settings()
        return pair_logps(self.policy, chunk.pairs.select(rows), mode, cfg_scale)

    def chunk_reference(self, chunk: PairChunk, rows: list[int]) -> PairLogps:
        if chunk.ref is not None:
            return chunk.ref.select(rows)
        mode, cfg_scale = self.logprob_settings()
        return reference_pair_logps(self.policy, chunk.pairs.select(rows), mode, cfg_scale)

    def update(self, work) -> dict:
        """`work` = (chunks, updates): `updates` optimizer steps, each over every chunk with every pair
        weighing the same; this rank's rows of each chunk. Returns the last step's per-pair outputs (for
        `combine_rank_metrics`) and gradient norm."""
        chunks, updates = work
        total = sum(len(c.pairs) for c in chunks)
        d, result = self.opt, {}
        for _ in range(updates):
            self.optimizer.zero_grad(set_to_none=True)
            outs = []
            for k, chunk in enumerate(chunks):
                rows, share = self.rank_rows(range(len(chunk.pairs)))
                ref = self.chunk_reference(chunk, rows)
                held = []

                def compute():
                    held.append(dpo_losses(self.chunk_logps(chunk, rows), ref, **loss_kwargs(d)))
                    return held[0].losses.sum() / total

                self.rank_backward(compute, share, k == len(chunks) - 1)
                if share:
                    out = held[0]
                    outs.append((k, chunk.kind, DPOOutput(out.losses.detach().cpu(), out.chosen_rewards.detach().cpu(),
                                                          out.rejected_rewards.detach().cpu())))
            result = {"outs": outs, "grad_norm": self.optimizer_step()}
        return result

    @classmethod
    def combine_rank_metrics(cls, per_rank: list[dict]) -> dict:
        """Every rank's pair outputs, chunk by chunk in rank order (the one-rank order of the pairs)."""
        outs = sorted(((k, r, kind, o) for r, m in enumerate(per_rank) for k, kind, o in m["outs"]),
                      key=lambda x: x[:2])
        return {"outs": [(None, kind, o) for _, _, kind, o in outs], "grad_norm": per_rank[0]["grad_norm"]}

    def finish_step(self, result: dict, step: int, t0: float, **extra) -> StepResult:
        """After the update: new adapter version, the step's dpo/* metrics."""
        self.new_version()
        self.step = step
        return StepResult({**update_metrics(result), "time/update": time.perf_counter() - t0, **extra})


def update_metrics(result: dict) -> dict:
    """The dpo/* metrics of `PreferenceTrainer.update`'s result (+ the learner ranks' own, when it ran there)."""
    outs = [(kind, o) for _, kind, o in result.get("outs", [])]
    rest = {k: v for k, v in result.items() if k != "outs"}
    return {**summarize_outputs(outs, "dpo"), "grad_norm": 0.0, **rest}


@register_algorithm("dpo")
class DPOTrainer(PreferenceTrainer):
    """Offline DPO: a fixed set of pairs, an epoch-shuffled order, AdamW on the adapter."""

    def setup(self, worker_pool=None):
        d = self.opt
        self.train_set, self.eval_set, self.data_info = load_run_data(self.cfg, self.policy, self.run_dir)
        self.items = ([(GENERATION, i) for i in range(len(self.train_set.generation))]
                      + [(UNDERSTANDING, i) for i in range(len(self.train_set.understanding))])
        bs = d.precompute_ref_batch_size or d.per_device_eval_batch_size
        self.train_ref = (ReferenceTable.compute(self.policy, self.train_set, d.logprob_mode, d.cfg_scale, bs,
                                                 self.run_dir / "cache" / "ref_logps_train.pt")
                          if d.precompute_ref_log_probs else None)
        # Held-out pairs are scored at every evaluation: their reference never changes, compute it once.
        self.eval_ref = ReferenceTable.compute(self.policy, self.eval_set, d.logprob_mode, d.cfg_scale, bs,
                                               None) if len(self.eval_set) else None
        if self.cfg.image_task is not None or self.cfg.text_task is not None:
            self.eval_tasks = build_tasks(self.cfg, self.policy.image_size)
        print(f"dpo: {len(self.train_set.generation)} generation + {len(self.train_set.understanding)} "
              f"understanding training pairs, {len(self.eval_set)} held out")

    def start_metrics(self) -> dict:
        return dict(self.data_info)

    def pairs(self, kind: str):
        return self.train_set.generation if kind == GENERATION else self.train_set.understanding

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        d, step = self.opt, self.step + 1
        size = self.micro_size()
        per_step = size * d.gradient_accumulation_steps
        picks = [self.items[epoch_order(len(self.items), self.cfg.seed, n)]
                 for n in range((step - 1) * per_step, step * per_step)]
        chunks, t0 = [], time.perf_counter()
        for start in range(0, per_step, size):
            micro = picks[start:start + size]
            for kind in (GENERATION, UNDERSTANDING):
                idx = [i for k, i in micro if k == kind]
                if idx:
                    ref = self.train_ref.get(kind, idx) if self.train_ref is not None else None
                    chunks.append(PairChunk(kind, self.pairs(kind).select(idx), ref))
        return self.finish_step(self.run_update((chunks, 1)), step, t0)

    # ------------------------------------------------------------------ evaluation
    def evaluate_samples(self) -> dict:
        """Held-out pairs first (eval/dpo/*), then the tasks' samples (eval/reward/*)."""
        d, outs = self.opt, []
        if self.eval_ref is not None:
            for kind, data in ((GENERATION, self.eval_set.generation), (UNDERSTANDING, self.eval_set.understanding)):
                for idx in index_chunks(len(data), d.per_device_eval_batch_size):
                    if not idx:
                        continue
                    pair = data.select(idx)
                    lp = pair_logps(self.policy, pair, d.logprob_mode, d.cfg_scale)
                    outs.append((kind, dpo_losses(lp, self.eval_ref.get(kind, idx), **loss_kwargs(d))))
        return {**summarize_outputs(outs, "eval/dpo"), **super().evaluate_samples()}
