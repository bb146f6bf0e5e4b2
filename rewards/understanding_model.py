"""The modular unified route's judge: a SEPARATE understanding model rewards the generator's images.

In a unified model (Janus) "the model's own understanding rewards its generation" is the
`self_understanding` reward. When generation and understanding are separate networks (a
flow-matching generator next to an understanding model, as in MetaQuery / BLIP3-o style systems),
the same reward is computed by asking the understanding model instead: P(yes) / (P(yes) + P(no))
for "Does this image show <prompt>?", optionally one question per object phrase, averaged.

The understanding model is a Janus checkpoint (hub id, local directory, or `tiny`) loaded through
`JanusPolicy`, once, lazily on the first batch, frozen. For any other transformers VLM use the
`judge` reward (`backend: local`), which runs an image-text-to-text model as a grader.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .base import RewardContext, RewardOutput, register_reward
from .self_understanding import SelfUnderstandingReward


@register_reward("understanding_model")
class UnderstandingModelReward(SelfUnderstandingReward):
    """self_understanding, asked to a separate, frozen understanding model instead of the policy."""

    modalities = ("image",)
    uses_policy = False  # asks its own frozen model, so it may run in the background (async_scoring)

    def __init__(self, model: str = "tiny", dtype: str = "float32", device: str = "cpu", tiny_dir: str = "",
                 question: str = "Does this image show {prompt}? Answer yes or no.", batch_size: int = 32,
                 questions: str = "prompt", object_question: str = "Does this image show {object}? Answer yes or no.",
                 questions_file: str | None = None, seed: int = 0):
        super().__init__(question=question, judge="policy", batch_size=batch_size, questions=questions,
                         object_question=object_question, questions_file=questions_file)
        self.model_name, self.dtype, self.device = model, dtype, device
        self.tiny_dir, self.seed = tiny_dir, seed
        self._judge = None

    @property
    def judge_model(self):
        """The understanding model (a JanusPolicy without adapter), loaded on first use."""
        if self._judge is None:
            from ..policies.janus import JanusPolicy
            path = self.model_name
            if path == "tiny":
                from ..policies.tiny import build_tiny_janus
                path = build_tiny_janus(self.tiny_dir or Path("runs") / ".tiny_models" / f"janus_seed{self.seed}",
                                        seed=self.seed)
            self._judge = JanusPolicy.from_pretrained(path, dtype=self.dtype, device=self.device)
        return self._judge

    @torch.no_grad()
    def score(self, batch, context: RewardContext) -> RewardOutput:
        # The trained policy in `context` is the generator; the question goes to the other model.
        return super().score(batch, RewardContext(policy=self.judge_model, step=context.step))

    def close(self):
        self._judge = None
