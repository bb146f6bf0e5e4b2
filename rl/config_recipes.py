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
