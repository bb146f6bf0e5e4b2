"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences.

score = logit_scale.exp() * cos(image, prompt) / 26, exactly flow_grpo's `pickscore_scorer.py`
(processor `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, model `yuvalkirstain/PickScore_v1`); the 1/26
brings the real checkpoint's typical scores (~21-23) near 1. Text is padded and truncated to 77
tokens as there; images go through the processor as 8-bit RGB, as flow_grpo hands it PIL images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Reward, RewardContext, RewardOutput, register_reward
from .model_utils import chunks, pooled, scores_with_mask, split_images, to_pil, torch_dtype


def load_clip(model: str, processor: str | None, device: str, dtype: str):
    """A transformers CLIPModel + its processor, by hub id or local directory (the same call for both)."""
    from transformers import AutoProcessor, CLIPModel

    proc = AutoProcessor.from_pretrained(processor or model)
    net = CLIPModel.from_pretrained(model, dtype=torch_dtype(dtype)).to(device).eval().requires_grad_(False)
    return net, proc


@torch.no_grad()
def clip_embeddings(net, proc, pil_images, texts, device, max_length: int = 77):
    """L2-normalised (image, text) embeddings, float32, of a transformers CLIP."""
    dtype = next(net.parameters()).dtype
    px = proc(images=pil_images, return_tensors="pt")["pixel_values"].to(device, dtype)
    img = F.normalize(pooled(net.get_image_features(pixel_values=px)).float(), dim=-1)
    if texts is None:
        return img, None
    tok = proc(text=list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    tok = {k: v.to(device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
    txt = F.normalize(pooled(net.get_text_features(**tok)).float(), dim=-1)
    return img, txt


@register_reward("pickscore")
class PickScoreReward(Reward):
    """PickScore of (image, prompt). model/processor: hub ids or local directories (save_pretrained)."""

    modalities = ("image",)

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 16, divisor: float = 26.0):
        self.model, self.processor = load_clip(model, processor, device, dtype)
        self.device, self.batch_size, self.divisor = device, batch_size, float(divisor)

    @torch.no_grad()
    def raw_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = []
        scale = self.model.logit_scale.exp().float()
        for sl in chunks(len(prompts), self.batch_size):
            img, txt = clip_embeddings(self.model, self.processor, to_pil(images[sl]), prompts[sl], self.device)
            out.append((scale * (img * txt).sum(-1) / self.divisor).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, batch, context: RewardContext) -> RewardOutput:
        images, ok = split_images(batch.images)
        s, valid = scores_with_mask(self.raw_scores(images, list(batch.prompts)), ok)
        return RewardOutput(s, valid)
