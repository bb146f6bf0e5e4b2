"""OCR reward: how exactly the image writes the text quoted in its prompt.

score = 1 - min(Levenshtein(recognized, target), len(target)) / len(target), 1 if the target occurs in
the recognized text, both with spaces removed and lower-cased: flow_grpo's `ocr.py` formula. The
target is the text between the first pair of double quotes of the prompt (`prompt.split('"')[1]` as
flow_grpo takes it; typographic quotes “...” are accepted when no ASCII pair exists). With
`use_targets: true` the sample's non-empty `targets` entry is the text instead (rollout jobs with a
`target` field); it is off by default because training image tasks put the prompt's color word there.

Difference from flow_grpo: flow_grpo reads the image with PaddleOCR (a text detector + recognizer;
not pip-installable offline here). This reward runs a transformers image-to-text OCR model
(`VisionEncoderDecoderModel`, TrOCR style: `microsoft/trocr-base-printed`, `microsoft/trocr-large-printed`)
on the whole image. TrOCR is a single-line recognizer without a detector, so on images with
text in a small region or on several lines it reads less than PaddleOCR would; scores of the two are
not interchangeable. Also: a prompt without quoted text or with an empty one is invalid here (flow_grpo
raises IndexError / divides by zero), and a failing OCR call raises instead of scoring 0.
"""
from __future__ import annotations

import re

import torch

from .base import Reward, RewardContext, RewardOutput, register_reward
from .model_utils import chunks, split_images, to_pil, torch_dtype

_CURLY = re.compile(r"\u201c([^\u201d]*)\u201d")


def quoted_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes, or None when there is no such pair."""
    parts = prompt.split('"')
    if len(parts) >= 3:
        return parts[1]
    m = _CURLY.search(prompt)
    return m.group(1) if m else None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_accuracy(recognized: str, target: str) -> float | None:
    """flow_grpo's OCR reward for one image; None when the target is empty (no score exists)."""
    rec = recognized.replace(" ", "").lower()
    tgt = target.replace(" ", "").lower()
    if not tgt:
        return None
    dist = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt)


@register_reward("ocr")
class OcrReward(Reward):
    """OCR accuracy of the prompt's quoted text. model/processor: hub id or local directory."""

    modalities = ("image",)

    def __init__(self, model: str = "microsoft/trocr-base-printed", processor: str | None = None,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 8, max_new_tokens: int = 48,
                 num_beams: int = 1, use_targets: bool = False):
        from transformers import AutoProcessor, VisionEncoderDecoderModel

        self.processor = AutoProcessor.from_pretrained(processor or model)
        self.model = VisionEncoderDecoderModel.from_pretrained(model, dtype=torch_dtype(dtype))
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size = device, batch_size
        self.max_new_tokens, self.num_beams, self.use_targets = max_new_tokens, num_beams, use_targets

    @torch.no_grad()
    def recognize(self, images: torch.Tensor) -> list[str]:
        """The OCR model's reading of each image (greedy or beam search, special tokens dropped)."""
        texts = []
        dtype = next(self.model.parameters()).dtype
        for sl in chunks(len(images), self.batch_size):
            px = self.processor(images=to_pil(images[sl]), return_tensors="pt")["pixel_values"]
            ids = self.model.generate(pixel_values=px.to(self.device, dtype), max_new_tokens=self.max_new_tokens,
                                      num_beams=self.num_beams, do_sample=False)
            texts += self.processor.batch_decode(ids, skip_special_tokens=True)
        return texts

    def target(self, batch, i: int) -> str | None:
        if self.use_targets and batch.targets and i < len(batch.targets) and batch.targets[i]:
            return batch.targets[i]
        return quoted_text(batch.prompts[i])

    def score(self, batch, context: RewardContext) -> RewardOutput:
        images, ok = split_images(batch.images)
        targets = [self.target(batch, i) for i in range(len(batch))]
        todo = [i for i in range(len(batch)) if ok[i] and targets[i] and targets[i].replace(" ", "")]
        read = self.recognize(images[todo]) if todo else []
        scores = torch.full((len(batch),), float("nan"))
        texts: list[str | None] = [None] * len(batch)
        for i, text in zip(todo, read):
            texts[i] = text
            acc = ocr_accuracy(text, targets[i])
            if acc is not None:
                scores[i] = acc
        return RewardOutput(scores, torch.isfinite(scores), details={"ocr_text": texts})
