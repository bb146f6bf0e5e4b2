"""The rollout worker: owns a policy copy, takes adapter weights with a version, returns rollouts.

It holds no training state (no optimizer, no step counter), so the same class runs in-process and
inside a Ray actor. Every sample's randomness derives from (seed, step, prompt index, sample index)
through `sample_seed`, so the rollouts of a step do not depend on how prompts are sharded.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..policies.batches import ImageRollout, TextRollout


def sample_seed(seed: int, step: int, kind: str, prompt_index: int, sample_index: int) -> int:
    key = f"{seed}/{step}/{kind}/{prompt_index}/{sample_index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


@dataclass
class RolloutRequest:
    """What to sample in one step for one task: prompts (and images for text tasks), n each.

    `prompt_indices` are the prompts' positions in the whole step, so a shard keeps its seeds and
    group ids when the request is split across workers.
    """

    kind: str  # "image" or "text"
    prompts: list[str]
    num_generations: int
    step: int
    prompt_indices: list[int] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    images: torch.Tensor | None = None  # (P, H, W, 3) for text tasks

    def __post_init__(self):
        if not self.prompt_indices:
            self.prompt_indices = list(range(len(self.prompts)))

    def shard(self, num_shards: int) -> list["RolloutRequest"]:
        """Round-robin over prompts (shard s gets prompts s, s + n, ...): balanced work per worker."""
        return [self.subset(idx) for s in range(num_shards) if (idx := list(range(s, len(self.prompts), num_shards)))]

    def split(self, num_chunks: int) -> list["RolloutRequest"]:
        """Contiguous runs of whole prompts, in order (at most one chunk per prompt): concatenating the
        chunks' rollouts gives the rows of the whole request in the same order."""
        P = len(self.prompts)
        n = max(1, min(num_chunks, P))
        bounds = [round(i * P / n) for i in range(n + 1)]
        return [self.subset(list(range(a, b))) for a, b in zip(bounds, bounds[1:])]

    def subset(self, idx: list[int]) -> "RolloutRequest":
        """The request for the prompts at positions `idx` (they keep their seeds and group ids)."""
        return RolloutRequest(
            kind=self.kind, prompts=[self.prompts[i] for i in idx], num_generations=self.num_generations,
            step=self.step, prompt_indices=[self.prompt_indices[i] for i in idx],
            targets=[self.targets[i] for i in idx] if self.targets else [],
            images=self.images[idx] if self.images is not None else None)


def make_policy(model_cfg, lora_cfg=None, tiny_dir: str | Path | None = None):
    """Build the Janus policy a config describes (hub id, local path, or `tiny`), with its LoRA adapter."""
    from ..policies.janus import JanusPolicy
    from ..policies.tiny import build_tiny_janus

    path = model_cfg.name_or_path
    if path == "tiny":
        path = build_tiny_janus(model_cfg.tiny_dir or tiny_dir or "runs/tiny_model", **(model_cfg.tiny or {}))
    policy = JanusPolicy.from_pretrained(path, dtype=model_cfg.dtype, device=model_cfg.device,
                                         quantization=model_cfg.quantization,
                                         attn_implementation=model_cfg.attn_implementation)
    if lora_cfg is not None:
        if lora_cfg.init_adapter:
            policy.load_adapter(lora_cfg.init_adapter, trainable=True)
        else:
            targets = lora_cfg.target_modules
            if "," in targets:
                targets = [t.strip() for t in targets.split(",")]
            policy.add_lora(r=lora_cfg.r, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout, target_modules=targets)
    if model_cfg.gradient_checkpointing:
        policy.gradient_checkpointing(True)
    return policy


class RolloutWorker:
    """Samples rollouts for requests. In-process it may share the learner's policy object."""

    def __init__(self, policy, rollout_cfg, seed: int, shares_learner_policy: bool = False):
        self.policy = policy
        self.cfg = rollout_cfg
        self.seed = seed
        self.shares_learner_policy = shares_learner_policy

    @classmethod
    def from_config(cls, model_cfg, lora_cfg, rollout_cfg, seed: int, tiny_dir=None):
        return cls(make_policy(model_cfg, lora_cfg, tiny_dir), rollout_cfg, seed)

    @property
    def version(self) -> int:
        return self.policy.version

    def set_adapter(self, state: dict | None, version: int):
        """Load the learner's adapter tensors (None when the policy object is shared with the learner)."""
        if state is not None:
            self.policy.set_adapter_state_dict(state, version)
        else:
            if not self.shares_learner_policy:
                raise ValueError("a worker with its own policy copy needs the adapter tensors")
            self.policy.version = version

    def generate(self, request: RolloutRequest) -> ImageRollout | TextRollout:
        n, cfg = request.num_generations, self.cfg
        prompts, seeds, groups, targets, image_rows = [], [], [], [], []
        for j, (p, pi) in enumerate(zip(request.prompts, request.prompt_indices)):
            for s in range(n):
                prompts.append(p)
                seeds.append(sample_seed(self.seed, request.step, request.kind, pi, s))
                groups.append(pi)
                targets.append(request.targets[j] if request.targets else "")
                image_rows.append(j)
        was_training = self.policy.model.training
        self.policy.model.eval()  # no LoRA dropout while sampling
        try:
            parts = []
            bs = max(1, cfg.batch_size)
            for i in range(0, len(prompts), bs):
                sl = slice(i, i + bs)
                if request.kind == "image":
                    parts.append(self.policy.sample_images(
                        prompts[sl], seeds[sl], cfg_scale=cfg.cfg_scale, temperature=cfg.temperature,
                        top_k=cfg.top_k, group_ids=groups[sl], targets=targets[sl],
                        sampler=getattr(cfg, "sampler", "auto")))
                else:
                    parts.append(self.policy.answer(
                        request.images[image_rows[sl]], prompts[sl], seeds[sl], max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, group_ids=groups[sl], targets=targets[sl]))
        finally:
            self.policy.model.train(was_training)
        return concat_rollouts(parts)


def concat_rollouts(parts):
    """Concatenate rollout batches of one kind, re-padding prompts/answers to a common length."""
    if len(parts) == 1:
        return parts[0]
    cls = type(parts[0])
    if not hasattr(parts[0], "prompt_ids"):  # no token padding to align (FlowRollout: fixed-shape latents)
        return cls.concat(parts)
    if cls is ImageRollout:
        L = max(p.prompt_ids.shape[1] for p in parts)
        parts = [_left_pad(p, "prompt_ids", "prompt_mask", L) for p in parts]
    else:
        L = max(p.prompt_ids.shape[1] for p in parts)
        A = max(p.answer_ids.shape[1] for p in parts)
        parts = [_right_pad(_left_pad(p, "prompt_ids", "prompt_mask", L), A) for p in parts]
    return cls.concat(parts)


def _left_pad(b, ids_name, mask_name, L):
    from dataclasses import replace
    ids, mask = getattr(b, ids_name), getattr(b, mask_name)
    extra = L - ids.shape[1]
    if extra == 0:
        return b
    pad_id = int(ids[mask == 0][0]) if (mask == 0).any() else 0
    ids = torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1)
    mask = torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1)
    return replace(b, **{ids_name: ids, mask_name: mask})


def _right_pad(b: TextRollout, A: int):
    from dataclasses import replace
    extra = A - b.answer_ids.shape[1]
    if extra == 0:
        return b
    pad_id = int(b.answer_ids[b.answer_mask == 0][0]) if (b.answer_mask == 0).any() else 0
    z = lambda t, v: torch.cat([t, t.new_full((t.shape[0], extra), v)], 1)  # noqa: E731
    return replace(b, answer_ids=z(b.answer_ids, pad_id), answer_mask=z(b.answer_mask, 0),
                   logprobs_sampled=z(b.logprobs_sampled, 0.0))
