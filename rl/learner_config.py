"""The `ray:` and `learner:` sections: where rollouts and the update run. Their own file so rl/config.py
stays short; re-exported there."""
from __future__ import annotations

from dataclasses import dataclass

from .config_loader import ConfigError, uf


@dataclass
class RayConfig:
    """The Ray runtime, when rollout.num_workers > 0."""

    address: str | None = uf(None, "null = start a local Ray; `auto` or host:port = join a running cluster.")
    num_cpus: int | None = uf(None, "CPUs for a local Ray (null = all).", ge=1)
    temp_dir: str | None = uf(None, "Ray temp/session directory for a local Ray.")


@dataclass
class LearnerConfig:
    """Where the update runs (`learner:`): in-process (1 rank, the default) or N data-parallel ranks,
    each a Ray actor with its own copy of the policy in one placement group, joined by a
    torch.distributed process group (gloo on CPU, NCCL on GPU). The driver keeps sampling and scoring;
    the ranks split every optimizer step's rows and all-reduce gradients (DDP) or shard parameters
    and optimizer state (FSDP2 `fully_shard`), so N ranks make the same update as one."""

    num_workers: int = uf(1, "Learner ranks; 1 = the in-process learner (no Ray, no process group).", ge=1)
    num_gpus_per_worker: float = uf(0.0, "GPUs per learner rank (0 = CPU ranks with gloo; >= 1 = NCCL).", ge=0)
    num_cpus_per_worker: float = uf(1.0, "CPUs per learner rank (also its torch thread count).", ge=0)
    strategy: str = uf("ddp", "`ddp`: replicated weights, gradients all-reduced (torch DDP; adapters); `fsdp`: "
                       "parameters, gradients and optimizer state sharded over the ranks (torch FSDP2 "
                       "`fully_shard`).", choices=["ddp", "fsdp"])
    mixed_precision: str = uf("no", "strategy fsdp: compute dtype of the sharded modules (FSDP2 "
                              "MixedPrecisionPolicy param_dtype; gradients reduced in float32).",
                              choices=["no", "bf16", "fp16"])
    cpu_offload: bool = uf(False, "strategy fsdp: keep sharded parameters and optimizer state in CPU memory "
                           "(FSDP2 CPUOffloadPolicy).")
    full_finetune: bool = uf(False, "Train every weight of the language model's decoder layers instead of the "
                             "`lora` adapter (with strategy fsdp: sharded over the ranks). The KL / DPO reference is "
                             "a frozen copy of the starting weights (each rank: its shards); Ray rollout actors "
                             "get the full weights in buckets of rollout.weight_bucket_mb.")
    mode: str = uf("split", "Where rollouts are sampled while the ranks train. `split`: apart from the ranks, by the "
                   "driver (rollout.num_workers 0; it gets rank 0's tensors after each update) or by "
                   "rollout.num_workers Ray actors (sent the tensors after each update). `colocated` (verl's "
                   "hybrid engine): every step's prompts are sharded over the learner ranks, which sample "
                   "with the weights they train: no rollout actors, no weight sync to samplers (strategy "
                   "ddp: every rank holds whole weights).", choices=["split", "colocated"])
    placement_strategy: str = uf("PACK", "Ray placement group strategy of the ranks' bundles (PACK, SPREAD, "
                                 "STRICT_PACK, STRICT_SPREAD: one rank per node).",
                                 choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    start_timeout_s: float = uf(600.0, "Seconds to wait for the placement group and the ranks to start.", gt=0)

    def _validate(self, prefix, src):
        if self.strategy == "ddp" and (self.mixed_precision != "no" or self.cpu_offload):
            key = "mixed_precision" if self.mixed_precision != "no" else "cpu_offload"
            raise ConfigError(f"{src.where(f'{prefix}.{key}')}: key '{prefix}.{key}' needs {prefix}.strategy: fsdp "
                              f"(DDP keeps full replicas in the model's dtype)")
        if self.mode == "colocated" and self.strategy == "fsdp":
            raise ConfigError(f"{src.where(f'{prefix}.mode')}: key '{prefix}.mode' colocated samples on every rank "
                              f"with whole weights; strategy fsdp shards them over the ranks (use mode: split, "
                              f"or strategy: ddp)")
