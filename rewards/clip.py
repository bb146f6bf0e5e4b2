"""CLIP score with open_clip: any architecture, weights from a local file or a pretrained tag."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Reward, RewardContext, RewardOutput, register_reward


@register_reward("clip")
class ClipReward(Reward):
    """cosine(image, prompt) of a CLIP model; `clipscore: true` gives CLIPScore = 2.5 * max(cos, 0).

    model: an open_clip architecture name (`ViT-B-32`) or a `hf-hub:` id.
    pretrained: a pretrained tag (`openai`), a local weights file, or null for random weights
    (tests). model_config: a dict registered as a custom architecture named `model` (tiny CLIPs).
    """

    modalities = ("image",)

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = "openai", device: str = "cpu",
                 clipscore: bool = False, batch_size: int = 64, model_config: dict | None = None):
        import open_clip

        if model_config is not None:
            register_clip_config(model, model_config)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device, self.clipscore, self.batch_size = device, clipscore, batch_size
        vc = self.model.visual
        size = getattr(vc, "image_size", 224)
        self.size = size[0] if isinstance(size, (tuple, list)) else size
        pp = getattr(vc, "preprocess_cfg", {}) or {}
        self.mean = torch.tensor(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1)
        self.std = torch.tensor(pp.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1)

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        sims = []
        for i in range(0, len(texts), self.batch_size):
            px = images[i:i + self.batch_size].permute(0, 3, 1, 2).float()
            px = F.interpolate(px, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
            px = ((px - self.mean) / self.std).to(self.device)
            img = F.normalize(self.model.encode_image(px).float(), dim=-1)
            txt = F.normalize(self.model.encode_text(self.tokenizer(texts[i:i + self.batch_size]).to(self.device)).float(), dim=-1)
            sims.append((img * txt).sum(-1).cpu())
        return torch.cat(sims)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text-tower embeddings (N, D), batched."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[i:i + self.batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tok).float(), dim=-1).cpu())
        return torch.cat(out)

    def text_cosine(self, a: list[str], b: list[str]) -> torch.Tensor:
        """cosine(text a_i, text b_i) through the text tower (cycle-consistency captions vs prompts)."""
        if len(a) != len(b):
            raise ValueError(f"text_cosine needs equal lengths, got {len(a)} and {len(b)}")
        return (self.encode_texts(a) * self.encode_texts(b)).sum(-1)

    def score(self, batch, context: RewardContext) -> RewardOutput:
        cos = self.cosine(batch.images, batch.prompts)
        return RewardOutput.from_scores(2.5 * cos.clamp(min=0) if self.clipscore else cos)


def register_clip_config(name: str, config: dict):
    """Register a custom open_clip architecture (e.g. a tiny CLIP for tests) under `name`."""
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS[name] = config


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
