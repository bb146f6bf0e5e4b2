"""LAION aesthetic predictor ("improved aesthetic predictor", sac+logos+ava1-l14-linearMSE).

score = MLP(normalize(CLIP ViT-L/14 image embedding)), the MLP being 768-1024-128-64-16-1 Linear
layers with dropout and NO activations in between (the reference comments its ReLUs out; so does
flow_grpo's `aesthetic_scorer.py` and TRL's DDPO scorer). The whole predictor is therefore one affine
map of the normalised embedding, which the test checks. Roughly 1-10, higher = prettier.

Weights: the MLP state dict (keys `layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7`, the
Dropouts taking the odd indices), e.g. `trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth` on the
hub or a local `sac+logos+ava1-l14-linearMSE.pth`; CLIP: `openai/clip-vit-large-patch14`.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Reward, RewardContext, RewardOutput, register_reward
from .model_utils import chunks, load_state_dict, resolve_file, scores_with_mask, split_images, to_pil
from .pickscore import clip_embeddings, load_clip


class AestheticMLP(nn.Module):
    """The predictor head, module for module as in the reference so its state dict loads unchanged."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


@register_reward("aesthetic")
class AestheticReward(Reward):
    """Aesthetic score of the image (the prompt is not used)."""

    modalities = ("image",)

    def __init__(self, clip_model: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 predictor: str = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth", device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32):
        self.model, self.processor = load_clip(clip_model, processor, device, dtype)
        self.mlp = AestheticMLP(self.model.config.projection_dim)
        # strict: a file for another head shape or key layout fails here, not with silent random weights
        self.mlp.load_state_dict(load_state_dict(resolve_file(predictor)), strict=True)
        self.mlp.to(device).eval().requires_grad_(False)  # the head stays float32, as in flow_grpo
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def raw_scores(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for sl in chunks(len(images), self.batch_size):
            img, _ = clip_embeddings(self.model, self.processor, to_pil(images[sl]), None, self.device)
            out.append(self.mlp(img).squeeze(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, batch, context: RewardContext) -> RewardOutput:
        images, ok = split_images(batch.images)
        s, valid = scores_with_mask(self.raw_scores(images), ok)
        return RewardOutput(s, valid)
