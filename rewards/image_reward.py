"""ImageReward (Xu et al. 2023, THUDM): BLIP ViT-L image encoder -> BLIP text encoder cross-attending
to the image -> the [CLS] state -> 768-1024-128-64-16-1 MLP (no activations).

score = (mlp - 0.16717362830052426) / 1.0333394966054072, as `ImageReward.score` of the pip package
`image-reward` 1.5 (whose install needs CLIP from a GitHub zip, so it is not used here). Rebuilt on
transformers' BLIP classes: `BlipVisionModel` (= BLIP's ViT) and `BlipTextModel` (= BLIP's med.py
BertModel; its self-attention is run bidirectionally, `is_decoder=False`, with the cross-attention
layers on, which is med.py's `mode="multimodal"`). Like the reference: the prompt is tokenized by
`bert-base-uncased` with BLIP's two added tokens ([DEC], [ENC]), padded to max_length 35 and
truncated; the first token stays [CLS] (ImageReward does not swap in [ENC]); images: resize the
shortest side to 224 bicubic, center crop 224, OpenAI CLIP mean/std.

The official checkpoint `THUDM/ImageReward/ImageReward.pt` is a state dict of BLIP-original module
names, mapped here to the transformers names (`OFFICIAL_TO_HF`):

    blip.visual_encoder.cls_token               -> vision.embeddings.class_embedding
    blip.visual_encoder.pos_embed               -> vision.embeddings.position_embedding
    blip.visual_encoder.patch_embed.proj.*      -> vision.embeddings.patch_embedding.*
    blip.visual_encoder.blocks.N.norm1/norm2.*  -> vision.encoder.layers.N.layer_norm1/layer_norm2.*
    blip.visual_encoder.blocks.N.attn.qkv.*     -> vision.encoder.layers.N.self_attn.qkv.*  (same q|k|v layout)
    blip.visual_encoder.blocks.N.attn.proj.*    -> vision.encoder.layers.N.self_attn.projection.*
    blip.visual_encoder.blocks.N.mlp.fc1/fc2.*  -> vision.encoder.layers.N.mlp.fc1/fc2.*
    blip.visual_encoder.norm.*                  -> vision.post_layernorm.*
    blip.text_encoder.<rest>                    -> text.<rest>  (med.py and BlipText share names)
    mlp.layers.{0,2,4,6,7}.*                    -> mlp.layers.{0,2,4,6,7}.*
    ignored: blip.vision_proj.*, blip.text_proj.* (ITC heads, unused by the score), *.position_ids

The text config comes from the checkpoint's `med_config.json` (bert-base, vocab 30524,
cross-attention width = the ViT width 1024); the ViT is BLIP's `vit="large"`: patch 16, width 1024,
24 layers, 16 heads, MLP 4096, LayerNorm eps 1e-6. The tiny test writes a checkpoint with these
official key names (spelled out independently in the test) and loads it through this mapping; loading
the real 1.8 GB file has not been run here (no network), so a mismatch in the real file would show as
the error that names missing/unexpected keys, not as silent random weights.
"""
from __future__ import annotations

import json
import re

import torch
from torch import nn

from .aesthetic import AestheticMLP
from .base import Reward, RewardContext, RewardOutput, register_reward
from .model_utils import chunks, load_state_dict, resolve_file, scores_with_mask, split_images, to_pil, torch_dtype

MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
BLIP_VIT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")

OFFICIAL_TO_HF = [  # (regex on the official name, replacement); the first match wins
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.", r"vision.encoder.layers.\1.mlp.\2."),
    (r"^blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    (r"^blip\.text_encoder\.", "text."),
    (r"^mlp\.layers\.", "mlp.layers."),
]
IGNORED = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")


def convert_official_state_dict(state: dict) -> dict:
    """Official ImageReward.pt names -> the names of `ImageRewardModel` (see the module docstring)."""
    out, unknown = {}, []
    for key, value in state.items():
        if IGNORED.search(key):
            continue
        for pattern, repl in OFFICIAL_TO_HF:
            if re.search(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in the ImageReward checkpoint: {unknown[:8]}")
    return out


def text_config_from_med(med: dict, encoder_width: int):
    """transformers BlipTextConfig from BLIP's med_config.json (a BertConfig with `encoder_width`)."""
    from transformers import BlipTextConfig

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
            "layer_norm_eps", "initializer_range", "pad_token_id")
    kw = {k: med[k] for k in keys if k in med}
    # is_decoder=True only makes transformers build the cross-attention layers; the forward below runs
    # the self-attention bidirectionally (is_decoder=False), as BLIP's encoder does
    return BlipTextConfig(**kw, encoder_hidden_size=encoder_width, is_decoder=True)


class ImageRewardModel(nn.Module):
    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)

    def cls_features(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """The text encoder's [CLS] state after cross-attending to the image (what the MLP reads)."""
        img = self.vision(pixel_values=pixel_values).last_hidden_state
        att = torch.ones(img.shape[:-1], dtype=torch.long, device=img.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=img,
                        encoder_attention_mask=att, is_decoder=False)
        return out.last_hidden_state[:, 0, :].float()

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        return (self.mlp(self.cls_features(pixel_values, input_ids, attention_mask)).squeeze(-1) - MEAN) / STD


def blip_tokenizer(name: str):
    """bert-base-uncased plus BLIP's [DEC] (bos) and [ENC] tokens, as BLIP's `init_tokenizer` makes it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():
        tok.add_tokens(["[ENC]"], special_tokens=True)
    return tok


def image_transform(size: int):
    """ImageReward's `_transform(224)`: PIL bicubic resize of the shortest side, center crop, normalise."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


@register_reward("image_reward")
class ImageRewardScore(Reward):
    """ImageReward of (image, prompt); roughly N(0, 1) over its training prompts, higher = preferred.

    checkpoint / med_config: local files or `owner/repo/file` on the hub; tokenizer: hub id or directory;
    vision: overrides of the ViT config (BLIP ViT-L by default; tiny models in tests).
    """

    modalities = ("image",)

    def __init__(self, checkpoint: str = "THUDM/ImageReward/ImageReward.pt",
                 med_config: str = "THUDM/ImageReward/med_config.json", tokenizer: str = "bert-base-uncased",
                 vision: dict | None = None, device: str = "cpu", dtype: str = "float32", batch_size: int = 16,
                 max_length: int = 35):
        from transformers import BlipVisionConfig

        vcfg = BlipVisionConfig(**{**BLIP_VIT_LARGE, **(vision or {})})
        with open(resolve_file(med_config)) as f:
            tcfg = text_config_from_med(json.load(f), vcfg.hidden_size)
        self.model = ImageRewardModel(vcfg, tcfg)
        state = convert_official_state_dict(load_state_dict(resolve_file(checkpoint)))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"ImageReward checkpoint {checkpoint!r} does not fit the model: missing "
                             f"{missing[:8]}, unexpected {unexpected[:8]}")
        self.model.to(device, torch_dtype(dtype)).eval().requires_grad_(False)
        self.model.mlp.float()  # the reference feeds the MLP float32 [CLS] features
        self.tokenizer = blip_tokenizer(tokenizer)
        self.transform = image_transform(vcfg.image_size)
        self.device, self.dtype, self.batch_size, self.max_length = device, torch_dtype(dtype), batch_size, max_length

    def inputs(self, images: torch.Tensor, prompts: list[str]) -> dict:
        px = torch.stack([self.transform(p) for p in to_pil(images)]).to(self.device, self.dtype)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"pixel_values": px, "input_ids": tok["input_ids"].to(self.device),
                "attention_mask": tok["attention_mask"].to(self.device)}

    @torch.no_grad()
    def raw_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = [self.model(**self.inputs(images[sl], prompts[sl])).float().cpu()
               for sl in chunks(len(prompts), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, batch, context: RewardContext) -> RewardOutput:
        images, ok = split_images(batch.images)
        s, valid = scores_with_mask(self.raw_scores(images, list(batch.prompts)), ok)
        return RewardOutput(s, valid)
