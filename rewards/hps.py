"""HPSv2.1 (Human Preference Score v2.1, Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on HPD v2.

score = diag(normalize(image features) . normalize(text features)), i.e. the cosine of each image with
its own prompt, as HPSv2's `score.py` and flow_grpo's `hpsv2_scorer.py` compute it. Typical values of
the real checkpoint: ~0.2-0.35.

Weights: the checkpoint file `HPS_v2.1_compressed.pt` of the hub repo `xswu/HPSv2`, a torch pickle
`{"state_dict": <open_clip CLIP state dict>}` loaded with strict key matching into an open_clip
`ViT-H-14` built with `pretrained=None` (the peers first load the laion2B weights and then overwrite
every one of them with the checkpoint, which ends in the same model). Preprocessing is open_clip's
validation transform (resize shortest side to 224 bicubic, center crop, OpenAI mean/std), the one
HPSv2 uses. Differences: the peers run under CUDA autocast (fp16); here `dtype` decides (float32 by
default). open_clip 3.3 builds ViT-H-14 with the classic key names the checkpoint uses, but loading
the real file has not been run here (no network): the tiny test loads a file in the same format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Reward, RewardContext, RewardOutput, register_reward
from .clip import register_clip_config
from .model_utils import (chunks, load_state_dict, resolve_file, scores_with_mask, split_images, to_pil,
                          torch_dtype)


def hps_state_dict(path: str) -> dict:
    """The CLIP state dict inside an HPS checkpoint (`['state_dict']`; a bare state dict is accepted too).
    A `module.` prefix (a checkpoint saved from DistributedDataParallel) is stripped."""
    ckpt = load_state_dict(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: no state dict found (expected a dict with key 'state_dict')")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


@register_reward("hps")
class HPSReward(Reward):
    """HPSv2.1 score of (image, prompt).

    model: open_clip architecture (`ViT-H-14`); checkpoint: local file or `owner/repo/file` on the hub;
    model_config: registers a custom architecture under `model` (tiny models in tests).
    """

    modalities = ("image",)

    def __init__(self, model: str = "ViT-H-14", checkpoint: str = "xswu/HPSv2/HPS_v2.1_compressed.pt",
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 16, model_config: dict | None = None):
        import open_clip

        if model_config is not None:
            register_clip_config(model, model_config)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=None)
        state = hps_state_dict(resolve_file(checkpoint))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:  # strict, with a message that names the keys
            raise ValueError(f"HPS checkpoint {checkpoint!r} does not match open_clip {model!r}: "
                             f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
        self.model.to(device, torch_dtype(dtype)).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device, self.batch_size = device, batch_size
        self.dtype = torch_dtype(dtype)

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text features (N, D), float32."""
        imgs, txts = [], []
        for sl in chunks(len(prompts), self.batch_size):
            px = torch.stack([self.preprocess(p) for p in to_pil(images[sl])]).to(self.device, self.dtype)
            tok = self.tokenizer(list(prompts[sl])).to(self.device)
            imgs.append(F.normalize(self.model.encode_image(px).float(), dim=-1).cpu())
            txts.append(F.normalize(self.model.encode_text(tok).float(), dim=-1).cpu())
        return torch.cat(imgs), torch.cat(txts)

    def score(self, batch, context: RewardContext) -> RewardOutput:
        if len(batch) == 0:
            return RewardOutput(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        images, ok = split_images(batch.images)
        img, txt = self.embeddings(images, list(batch.prompts))
        s, valid = scores_with_mask((img * txt).sum(-1), ok)  # = diag(img @ txt.T)
        return RewardOutput(s, valid)
