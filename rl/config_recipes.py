"""Config sections of the unified-model recipes (kept apart from rl/config.py, which holds the core
sections): `reasoning` (T2I-R1's plan-then-image rollouts)."""
from __future__ import annotations

from dataclasses import dataclass

from ..policies.reasoning import DEFAULT_IMAGE_PROMPT, DEFAULT_INSTRUCTION
from .config_loader import ConfigError, uf


@dataclass
class ReasoningConfig:
    """Think, then draw (`reasoning:`; T2I-R1): each image_task rollout first samples a text plan, then
    the image conditioned on prompt + plan; GRPO trains both segments with the trajectory's advantage
    (weights grpo.text_loss_weight / grpo.image_loss_weight, each segment aggregated on its own)."""

    enabled: bool = uf(True, "Sample the plan; false = the ablation: the same run with no plan (the image sees "
                       "the raw prompt).")
    instruction: str = uf(DEFAULT_INSTRUCTION, "The plan's prompt; `{prompt}` is the image prompt (T2I-R1's "
                          "reasoning_prompt.txt asks for objects, attributes and relations in 50 words or less).")
    max_new_tokens: int = uf(64, "Plan length cap in tokens (T2I-R1: 1024).", ge=1)
    stop: list[str] = uf(help="Strings (single tokens) that end a plan besides EOS, e.g. ['.'].", factory=list)
    image_prompt: str = uf(DEFAULT_IMAGE_PROMPT, "The generation prompt the image is sampled from; `{prompt}` and "
                           "`{plan}` (T2I-R1: '{prompt}. {plan}').")
    temperature: float | None = uf(None, "Plan sampling temperature (null = rollout.temperature; 0 = greedy).", ge=0)
    plan_rewards: list[str] = uf(help="Names of the rewards whose weighted sum gives the plan segment's advantage "
                                 "(empty = T2I-R1: the whole mixture, one advantage per trajectory). E.g. "
                                 "[plan_target]: the plan's tokens are credited only for what the plan says, not "
                                 "for an image that came out right whatever the plan was.", factory=list)
    image_rewards: list[str] = uf(help="Names of the rewards whose weighted sum gives the image segment's advantage "
                                  "(empty = the whole mixture).", factory=list)

    def _validate(self, prefix, src):
        for key, names in (("instruction", ("{prompt}",)), ("image_prompt", ("{prompt}", "{plan}"))):
            missing = [n for n in names if n not in getattr(self, key)]
            if missing:
                raise ConfigError(f"{src.where(f'{prefix}.{key}')}: key '{prefix}.{key}' must contain "
                                  f"{' and '.join(missing)}")

    def sampling(self) -> dict:
        """Keyword arguments of the policy's `sample_reasoned_images`."""
        return {"enabled": self.enabled, "instruction": self.instruction, "max_new_tokens": self.max_new_tokens,
                "stop": list(self.stop), "image_prompt": self.image_prompt, "plan_temperature": self.temperature}


@dataclass
class UniRLConfig:
    """UniRL's loop (`unirl:`): each step's generated images, with their prompts, become understanding
    questions answered by the same policy and rewarded against the prompt's ground truth (exact_match);
    generation and understanding train in the same GRPO step. PairUni's pair-aware advantages scale a
    generation group and the understanding groups asked about its images by their pair's similarity."""

    question: str = uf("What color is this image? Answer in one word.", "The understanding question asked about "
                       "every selected generated image; its reference answer is the image prompt's target.")
    images_per_prompt: int = uf(4, "Generated images per prompt group that become questions (the group's first "
                                "ones, in sample order).", ge=1)
    num_generations: int = uf(0, "Answers sampled per question (0 = rollout.num_generations).", ge=0)
    eval_colors: list[str] = uf(help="Solid-color images asked `question` at every evaluation, not trained on: the "
                                "understanding side's held-out exact match (eval/reward/exact_match).", factory=list)
    pair_similarity: str = uf("none", "PairUni: `none`; `data` (unirl.similarities, one per image_task prompt); "
                              "`embedding` (cosine of the mean input embeddings of the image prompt and of "
                              "question + reference answer, clamped to [0, 1]). Each pair's generation group and "
                              "its understanding groups get advantages x similarity.",
                              choices=["none", "data", "embedding"])
    similarities: list[float] = uf(help="Per image_task prompt, the pair similarity in [0, 1] (pair_similarity: "
                                   "data).", factory=list)

    def _validate(self, prefix, src):
        if self.pair_similarity == "data" and not self.similarities:
            raise ConfigError(f"{src.where(f'{prefix}.similarities')}: key '{prefix}.similarities' is needed by "
                              f"pair_similarity: data (one value per image_task prompt)")
        bad = [s for s in self.similarities if not 0.0 <= s <= 1.0]
        if bad:
            raise ConfigError(f"{src.where(f'{prefix}.similarities')}: key '{prefix}.similarities' values must be in "
                              f"[0, 1], got {bad[0]}")
