"""The rollout worker of flow-matching policies: same contract as `RolloutWorker`, for `FlowPolicy`.

It owns (or, in-process, shares) a policy, takes adapter tensors with a version, and turns a
`RolloutRequest` into a `FlowRollout`. Seeds come from `sample_seed(seed, step, kind, prompt, sample)`
exactly as for Janus, so a step's samples do not depend on how its prompts are sharded.
"""
from __future__ import annotations

from pathlib import Path

from ..policies.flow import FlowPolicy, FlowRollout, build_tiny_sd3
from .worker import RolloutRequest, RolloutWorker, sample_seed


def default_tiny_dir(output_dir: str | Path, seed: int) -> Path:
    """Tiny pipelines are shared between runs of one parent directory (built once, ~10 s)."""
    return Path(output_dir).parent / ".tiny_models" / f"sd3_seed{seed}"


def make_flow_policy(flow_cfg, lora_cfg=None, tiny_dir: str | Path | None = None, seed: int = 0) -> FlowPolicy:
    """Build the flow policy a `flow` config section describes (hub id, local path, or `tiny`), with LoRA."""
    path = flow_cfg.name_or_path
    if path == "tiny":
        path = build_tiny_sd3(flow_cfg.tiny_dir or tiny_dir or "runs/.tiny_models/sd3", seed=seed,
                              **(flow_cfg.tiny or {}))
    policy = FlowPolicy.from_pretrained(path, dtype=flow_cfg.dtype, device=flow_cfg.device,
                                        max_sequence_length=flow_cfg.max_sequence_length, load_t5=flow_cfg.load_t5)
    if lora_cfg is not None:
        if lora_cfg.init_adapter:
            policy.load_adapter(lora_cfg.init_adapter, trainable=True)
        else:
            policy.add_lora(r=lora_cfg.r, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                            target_modules=flow_cfg.lora_target_modules)
    if flow_cfg.gradient_checkpointing:
        policy.gradient_checkpointing(True)
    return policy


class FlowRolloutWorker(RolloutWorker):
    """Samples FlowRollouts for image requests; adapter sync and versioning are RolloutWorker's.

    `cfg` is the `flow` config section (sampling settings live there for flow policies).
    """

    def __init__(self, policy: FlowPolicy, flow_cfg, seed: int, shares_learner_policy: bool = False):
        super().__init__(policy, flow_cfg, seed, shares_learner_policy)

    @classmethod
    def from_config(cls, flow_cfg, lora_cfg, seed: int, tiny_dir=None):
        return cls(make_flow_policy(flow_cfg, lora_cfg, tiny_dir, seed), flow_cfg, seed)

    def generate(self, request: RolloutRequest) -> FlowRollout:
        if request.kind != "image":
            raise ValueError(f"a flow-matching policy only generates images, got a {request.kind!r} request")
        prompts, seeds, groups, targets = [], [], [], []
        for j, (p, pi) in enumerate(zip(request.prompts, request.prompt_indices)):
            for s in range(request.num_generations):
                prompts.append(p)
                seeds.append(sample_seed(self.seed, request.step, request.kind, pi, s))
                groups.append(pi)
                targets.append(request.targets[j] if request.targets else "")
        cfg = self.cfg
        model = self.policy.transformer
        was_training = model.training
        model.eval()  # no LoRA dropout while sampling
        try:
            return self.policy.sample_images(
                prompts, seeds, num_steps=cfg.num_steps, cfg_scale=cfg.cfg_scale, noise_level=cfg.noise_level,
                group_ids=groups, targets=targets, height=cfg.resolution or None, width=cfg.resolution or None,
                batch_size=cfg.sample_batch_size)
        finally:
            model.train(was_training)
