"""UniRL's loop and PairUni's pair-aware advantages, on top of GRPO (the `unirl:` section).

    images   = this step's image rollouts (sampled and scored as usual: the generation half)
    question = for each prompt group, its first `images_per_prompt` images + `unirl.question`,
               reference answer = the image prompt's target (its ground truth, not what was drawn)
    answers  = sampled by the same policy, scored by the reward mixture (exact_match): the
               understanding half, a text batch of its own
    update   = one GRPO update over both batches (rl/grpo.py)

Early on the images are noise and the questions' labels say what the image *should* show: the
understanding side learns from the prompts' labels, and the labels become true as generation learns.

PairUni: a pair is (a generation group, the understanding groups asked about its images). With a
similarity s in [0, 1] per pair (`pair_similarity`: given per prompt, or the cosine of the input
embeddings of the image prompt and of "question answer"), every advantage of the pair's samples is
multiplied by s: well-aligned pairs train at full strength, loosely related ones less.
"""
from __future__ import annotations

import torch

from ..policies.batches import ScoredBatch
from ..rollouts.pipeline import sample_and_score
from ..rollouts.worker import RolloutRequest
from .config import TextTaskConfig
from .tasks import TextTask

QUESTION_INDEX_OFFSET = 1_000_000  # the questions' prompt indices (seeds, group ids) apart from a text_task's


def understanding_request(sb: ScoredBatch, question: str, images_per_prompt: int, num_generations: int,
                          step: int) -> tuple[RolloutRequest | None, list[int]]:
    """The questions about an image batch's first `images_per_prompt` images of every group (rows with a
    target only), and each question's generation group id (its pair)."""
    b = sb.batch
    rows, pairs, seen = [], [], {}
    for i, g in enumerate(b.group_ids.tolist()):
        target = b.targets[i] if b.targets else ""
        if not target or not bool(sb.valid[i]) or seen.get(g, 0) >= images_per_prompt:
            continue
        seen[g] = seen.get(g, 0) + 1
        rows.append(i)
        pairs.append(g)
    if not rows:
        return None, []
    req = RolloutRequest("text", [question] * len(rows), num_generations, step,
                         prompt_indices=[QUESTION_INDEX_OFFSET + k for k in range(len(rows))],
                         targets=[b.targets[i] for i in rows], images=b.images[rows].float())
    return req, pairs


def embedding_similarity(policy, texts_a: list[str], texts_b: list[str]) -> torch.Tensor:
    """Cosine of the mean input embeddings (special tokens left out) of texts_a[i] and texts_b[i],
    clamped to [0, 1]."""
    tok, emb = policy.tokenizer, policy.model.get_input_embeddings()
    special = set(tok.all_special_ids)

    def mean_embedding(text):
        ids = [t for t in tok.encode(text, add_special_tokens=False) if t not in special]
        with torch.no_grad():
            return emb(torch.tensor(ids or [tok.unk_token_id], device=emb.weight.device)).float().mean(0).cpu()

    a = torch.stack([mean_embedding(t) for t in texts_a])
    b = torch.stack([mean_embedding(t) for t in texts_b])
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(0.0, 1.0)


def scale_pair_advantages(gen: ScoredBatch, und: ScoredBatch, pairs: list[int], similarity: dict[int, float]):
    """PairUni: each generation group g's advantages, and those of every question about its images
    (`pairs[k]` is question k's group; an understanding batch has num_generations rows per question),
    times similarity[g]. A group without a similarity keeps its advantages."""
    gen_scale = torch.tensor([similarity.get(g, 1.0) for g in gen.batch.group_ids.tolist()], dtype=gen.advantages.dtype)
    gen.advantages = gen.advantages * gen_scale
    gen.segment_advantages = {seg: a * gen_scale for seg, a in gen.segment_advantages.items()}  # reasoning.*_rewards
    per_question = len(und.batch) // max(len(pairs), 1)
    und_scale = torch.tensor([similarity.get(pairs[i // per_question], 1.0) for i in range(len(und.batch))],
                             dtype=und.advantages.dtype)
    und.advantages = und.advantages * und_scale


class UniRLLoop:
    """The `unirl` section at work inside a GRPO step: `extend` adds the understanding batches."""

    def __init__(self, cfg, image_prompts: list[str], seed: int, image_size: int):
        self.cfg, self.seed, self.image_size = cfg, seed, image_size
        self.data_similarity = dict(zip(image_prompts, cfg.similarities))

    def eval_tasks(self) -> list:
        """The held-out understanding check: solid-color images of `eval_colors`, asked `question`."""
        if not self.cfg.eval_colors:
            return []
        task_cfg = TextTaskConfig(synthetic_colors=list(self.cfg.eval_colors), question=self.cfg.question,
                                  prompts_per_step=len(self.cfg.eval_colors))
        return [TextTask(task_cfg, self.seed, self.image_size)]

    def similarity(self, policy, gen: ScoredBatch, pairs: list[int]) -> dict[int, float]:
        """Per generation group id: its pair similarity."""
        mode, b = self.cfg.pair_similarity, gen.batch
        first = {}
        for i, g in enumerate(b.group_ids.tolist()):
            first.setdefault(g, i)
        groups = sorted(set(pairs))
        if mode == "data":
            return {g: float(self.data_similarity.get(b.prompts[first[g]], 1.0)) for g in groups}
        answers = [f"{self.cfg.question} {b.targets[first[g]]}" for g in groups]
        sims = embedding_similarity(policy, [b.prompts[first[g]] for g in groups], answers)
        return dict(zip(groups, sims.tolist()))

    def extend(self, trainer, scored: list[ScoredBatch], step: int) -> tuple[list[ScoredBatch], dict]:
        """Sample and score the questions about this step's images (advantages set, pair-scaled)."""
        n = self.cfg.num_generations or trainer.cfg.rollout.num_generations
        out, metrics = [], {}
        for sb in [s for s in scored if s.batch.kind == "image"]:
            req, pairs = understanding_request(sb, self.cfg.question, self.cfg.images_per_prompt, n, step)
            if req is None:
                continue
            with trainer.sampling_weights():
                (und,), times = sample_and_score(trainer.workers, trainer.rewards, trainer.policy, [req], step)
            trainer.set_advantages(und)
            if self.cfg.pair_similarity != "none":
                sim = self.similarity(trainer.policy, sb, pairs)
                scale_pair_advantages(sb, und, pairs, sim)
                metrics["unirl/pair_similarity/mean"] = sum(sim.values()) / len(sim)
            metrics["time/unirl_rollout"] = metrics.get("time/unirl_rollout", 0.0) + times["time/rollout"]
            metrics["unirl/questions"] = metrics.get("unirl/questions", 0.0) + len(pairs)
            out.append(und)
        return out, metrics
