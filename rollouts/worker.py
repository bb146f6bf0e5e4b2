"""The rollout worker: holds a policy (its own copy, or the learner's), takes adapter weights with a
version, and turns requests into rollouts.

It holds no training state (no optimizer, no step counter), so the same class runs in-process and
inside a Ray actor. Every sample's randomness derives from (seed, step, prompt index, sample index)
through `sample_seed`, so the rollouts of a step do not depend on how prompts are sharded.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..policies.batches import Rollout, concat_rollouts


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


@dataclass
class Sampling:
    """How a worker samples: keyword arguments of the policy's `sample_images` and `answer`, and how
    many samples go through one forward batch (0 = all at once). The learner builds it from its config
    (`rollout` for Janus, `flow` for flow-matching policies); workers never see the config."""

    image: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    batch_size: int = 0
    reasoning: dict | None = None  # plan-then-image: `sample_reasoned_images` keywords (the `reasoning` section)


def expand_request(request: RolloutRequest, seed: int):
    """The rows of a request: for each prompt in order, its num_generations samples, each with its seed,
    group id (the prompt's position in the step), target, and the row of its question image."""
    prompts, seeds, groups, targets, image_rows = [], [], [], [], []
    for j, (p, pi) in enumerate(zip(request.prompts, request.prompt_indices)):
        for s in range(request.num_generations):
            prompts.append(p)
            seeds.append(sample_seed(seed, request.step, request.kind, pi, s))
            groups.append(pi)
            targets.append(request.targets[j] if request.targets else "")
            image_rows.append(j)
    return prompts, seeds, groups, targets, image_rows


class RolloutWorker:
    """Samples rollouts for requests from any policy of the protocol (policies/registry.py).

    In-process it may share the learner's policy object (`shares_learner_policy`): then a sync only
    bumps the version; a worker with its own copy (a Ray actor) loads the adapter tensors it is sent.
    """

    def __init__(self, policy, sampling: Sampling, seed: int, shares_learner_policy: bool = False):
        self.policy = policy
        self.sampling = sampling
        self.seed = seed
        self.shares_learner_policy = shares_learner_policy

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

    def generate(self, request: RolloutRequest) -> Rollout:
        if request.kind not in self.policy.modalities:
            raise ValueError(f"a {type(self.policy).__name__} samples {' and '.join(self.policy.modalities)} "
                             f"rollouts, got a {request.kind!r} request")
        prompts, seeds, groups, targets, image_rows = expand_request(request, self.seed)
        model = self.policy.model
        was_training = model.training
        model.eval()  # no LoRA dropout while sampling
        try:
            parts = []
            bs = self.sampling.batch_size or max(1, len(prompts))
            for i in range(0, len(prompts), bs):
                sl = slice(i, i + bs)
                if request.kind == "image":
                    sample = self.policy.sample_images
                    extra = {}
                    if self.sampling.reasoning is not None:
                        sample, extra = self.reasoned_sampler(), self.sampling.reasoning
                    # a sliding SDE window moves with the training step (policies/flow_sde.py)
                    if getattr(self.policy, "sample_takes_step", False):
                        extra = {**extra, "step": request.step}
                    parts.append(sample(prompts[sl], seeds[sl], group_ids=groups[sl], targets=targets[sl],
                                        **self.sampling.image, **extra))
                else:
                    parts.append(self.policy.answer(request.images[image_rows[sl]], prompts[sl], seeds[sl],
                                                    group_ids=groups[sl], targets=targets[sl], **self.sampling.text))
        finally:
            model.train(was_training)
        return concat_rollouts(parts)

    def reasoned_sampler(self):
        sample = getattr(self.policy, "sample_reasoned_images", None)
        if sample is None:
            raise ValueError(f"`reasoning` rollouts need a policy that writes text before its image (Janus); "
                             f"{type(self.policy).__name__} has no sample_reasoned_images")
        return sample
