"""Typed batches that flow policies -> rollouts -> rewards -> rl.

A rollout batch carries everything the learner needs to recompute log-probs (token ids, masks),
everything rewards need to score it (prompts, pixels, answer text), and the bookkeeping that makes
distributed sampling checkable (the adapter version it was sampled with, group ids).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


def _cat(values):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    if isinstance(values[0], list):
        return [x for v in values for x in v]
    return values[0]


class _Batch:
    """Shared helpers: length, row selection, concatenation, device moves."""

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index):
        """Rows `index` (a list of ints or a bool/long tensor) as a new batch of the same type."""
        if isinstance(index, torch.Tensor):
            index = index.nonzero().flatten().tolist() if index.dtype == torch.bool else index.tolist()
        index = list(index)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == len(self):
                out[f.name] = v[index]
            elif isinstance(v, list) and len(v) == len(self):
                out[f.name] = [v[i] for i in index]
            else:
                out[f.name] = v
        return type(self)(**out)

    @classmethod
    def concat(cls, batches):
        """Concatenate batches row-wise (they must share padded lengths, as shards of one step do)."""
        batches = [b for b in batches if len(b)] or batches[:1]
        return cls(**{f.name: _cat([getattr(b, f.name) for b in batches]) for f in fields(cls)})

    def to(self, device):
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclass
class ImageRollout(_Batch):
    """prompt -> image samples from an autoregressive image-token policy (Janus).

    `logprobs` are the log-probs of the sampled tokens under the distribution selected by
    `logprob_mode` at sampling time ("cfg": the guided distribution actually sampled from;
    "conditional": the conditional branch only). Both are recorded so either mode can be trained.
    """

    prompts: list[str]
    prompt_ids: torch.Tensor  # (B, L) left-padded prompt ending in <begin_of_image>
    prompt_mask: torch.Tensor  # (B, L) 1 = real token
    image_tokens: torch.Tensor  # (B, T) VQ codebook ids
    logprobs_cfg: torch.Tensor  # (B, T) log-prob under the guided (sampled-from) distribution
    logprobs_cond: torch.Tensor  # (B, T) log-prob under the conditional branch
    images: torch.Tensor  # (B, H, W, 3) float in [0, 1]
    group_ids: torch.Tensor  # (B,) samples of one prompt share a group id
    targets: list[str] = field(default_factory=list)  # optional per-sample ground truth (e.g. color)
    version: int = 0  # adapter version the samples were drawn with
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0

    kind = "image"

    def logprobs(self, mode: str) -> torch.Tensor:
        return self.logprobs_cfg if mode == "cfg" else self.logprobs_cond

    @property
    def completion_mask(self) -> torch.Tensor:
        # Image sequences have a fixed length: every token counts.
        return torch.ones_like(self.image_tokens, dtype=torch.float32)


@dataclass
class TextRollout(_Batch):
    """(image, question) -> answer samples from the policy's understanding side."""

    prompts: list[str]  # the questions
    images: torch.Tensor  # (B, H, W, 3) float in [0, 1], the images asked about
    prompt_ids: torch.Tensor  # (B, L) left-padded prompt incl. the expanded image placeholder
    prompt_mask: torch.Tensor  # (B, L)
    pixel_values: torch.Tensor  # (B, 3, h, w) processor output for the vision tower
    answer_ids: torch.Tensor  # (B, A) right-padded sampled answer tokens
    answer_mask: torch.Tensor  # (B, A) 1 = real answer token (up to and including EOS)
    logprobs_sampled: torch.Tensor  # (B, A) log-probs of the sampled tokens (0 where masked)
    answers: list[str]  # decoded answers
    group_ids: torch.Tensor  # (B,)
    targets: list[str] = field(default_factory=list)  # reference answers, for rule rewards
    version: int = 0
    temperature: float = 1.0

    kind = "text"

    def logprobs(self, mode: str = "cfg") -> torch.Tensor:
        return self.logprobs_sampled

    @property
    def completion_mask(self) -> torch.Tensor:
        return self.answer_mask.float()


Rollout = ImageRollout | TextRollout
