"""The built-in algorithms, each one trainer in one file; importing this module registers them all.

| algorithm       | trainer                                  | what it trains on                        |
| --------------- | ---------------------------------------- | ---------------------------------------- |
| `grpo`          | rl/grpo.py `GRPOTrainer`                 | sampled image/text rollouts, rewards      |
| `flow_grpo`     | rl/flow_grpo.py `FlowGRPOTrainer`        | SDE trajectories of a flow generator      |
| `dpo`           | rl/dpo.py `DPOTrainer`                   | preference pairs from files or datasets   |
| `online_dpo`    | rl/online_dpo.py `OnlineDPOTrainer`      | pairs ranked from fresh samples           |
| `diffusion_dpo` | rl/diffusion_dpo.py `DiffusionDPOTrainer`| image pairs, flow-matching errors         |
| `diffusion_nft` | rl/diffusion_nft.py `DiffusionNFTTrainer`| final latents of ODE samples, rewards     |
"""
from __future__ import annotations

from . import diffusion_dpo, diffusion_nft, dpo, flow_grpo, grpo, online_dpo  # noqa: F401  (register the built-ins)
from .registry import get_algorithm, register_algorithm, registered_algorithms


def algorithms() -> dict:
    """Every registered algorithm: name -> trainer class."""
    return registered_algorithms()


__all__ = ["algorithms", "get_algorithm", "register_algorithm"]
