"""The `flow:` section: a flow-matching generator (SD3 family, diffusers), how it samples and how the
Flow-GRPO family trains it. Its own file so rl/config.py stays short; re-exported there."""
from __future__ import annotations

from dataclasses import dataclass

from .config_loader import ConfigError, uf


@dataclass
class FlowConfig:
    """The flow-matching generator of `flow_grpo` / `diffusion_dpo` (SD3 family, diffusers)."""

    name_or_path: str = uf("tiny", "Hub id (stabilityai/stable-diffusion-3.5-medium) or local directory of a diffusers "
                           "StableDiffusion3Pipeline; `tiny` builds a tiny one offline (tests, quickstarts).")
    tiny_dir: str = uf("", "Where the tiny pipeline is written when name_or_path is `tiny` "
                       "(default: <output_dir>/../.tiny_models/sd3_seed<seed>, shared between runs).")
    tiny: dict = uf(help="Overrides of the tiny pipeline's shape (latent_size, num_layers, vae_fit_steps, ...; "
                    "see policies.flow.TINY_SD3_DEFAULTS).", factory=dict)
    dtype: str = uf("float32", "Weights dtype of the pipeline; LoRA tensors, log-probs and losses stay float32.",
                    choices=["float32", "bfloat16", "float16"])
    device: str = uf("cpu", "Device of the pipeline (cpu, cuda, cuda:1).")
    load_t5: bool = uf(True, "Load the T5 text encoder; false feeds zeros in its place (saves ~9 GB for SD3.5, "
                       "weaker prompt following).")
    max_sequence_length: int = uf(256, "T5 prompt length in tokens (with load_t5 false: the length of the zero "
                                  "block).", ge=1)
    lora_target_modules: list[str] = uf(help="Transformer modules that get LoRA adapters (Flow-GRPO's attention "
                                        "projections); r, alpha, dropout and init_adapter come from `lora`.",
                                        factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    gradient_checkpointing: bool = uf(False, "Recompute transformer activations in the backward pass (saves memory).")
    noise_level: float = uf(0.7, "The SDE noise level a in sigma_t = a*sqrt(t/(1-t)) (Flow-GRPO: 0.7); > 0.")
    cfg_scale: float = uf(4.5, "Classifier-free guidance scale for sampling and for the recomputed log-probs "
                          "(<= 1 disables CFG and halves the cost).", ge=0)
    num_steps: int = uf(10, "Denoising steps per sample (Flow-GRPO trains with 10 and evaluates with 40).", ge=1)
    resolution: int = uf(0, "Image side in pixels (0 = the model's default: sample_size x VAE factor).", ge=0)
    sample_batch_size: int = uf(0, "Samples per forward batch while sampling (0 = all at once).", ge=0)
    train_timestep_fraction: float = uf(1.0, "Fraction of the num_steps transitions trained per step, drawn at "
                                        "random each step (< 1 trades signal for speed).")
    train_timesteps: list[int] = uf(help="Explicit transition indices to train (0 = the first, noisiest step); "
                                    "overrides train_timestep_fraction when non-empty.", factory=list)
    adv_clip_max: float = uf(5.0, "Flow-GRPO clips advantages to [-adv_clip_max, adv_clip_max].", gt=0)
    dpo_timestep_sampling: str = uf("uniform", "Diffusion-DPO: how each pair's flow time t is drawn: `uniform`, "
                                    "or `logit_normal` (SD3's training distribution).",
                                    choices=["uniform", "logit_normal"])
    kl_form: str = uf("exact", "Flow-GRPO's KL term (grpo.beta): `exact`, the KL of the two transition Gaussians "
                      "||mu - mu_ref||^2 / (2 (sigma_t sqrt(-dt))^2); `flow_grpo`, the official code's "
                      "||mu - mu_ref||^2 / (2 sigma_t^2) = exact * (-dt) (3.7x-112x smaller on SD3.5's 10-step schedule): use it "
                      "with a beta taken from a flow_grpo config. Default exact: it is the KL, its size does "
                      "not depend on num_steps.", choices=["exact", "flow_grpo"])
    detach_uncond: bool = uf(False, "With CFG, no gradient through the unconditional branch while training (flow_grpo "
                             "does this; the values, hence the log-probs, are unchanged).")
    sde_type: str = uf("sde", "Stochastic step: `sde` (Flow-GRPO) or `cps` (coefficients-preserving sampling, "
                       "flow_grpo's sde_type cps: fewer noise artefacts; noise_level is its eta).",
                       choices=["sde", "cps"])
    sde_window_size: int = uf(0, "Train only a window of this many consecutive steps, sampled stochastically; "
                              "the other steps are ODE steps (Flow-GRPO-Fast: 2-3, MixGRPO: 4). 0 = every step "
                              "is stochastic (train_timesteps / train_timestep_fraction choose the trained ones).",
                              ge=0)
    sde_window_range: list[int] = uf(help="[r0, r1): where the window may lie (flow_grpo's sde_window_range; "
                                     "empty = [0, num_steps)).", factory=list)
    sde_window_schedule: str = uf("random", "Where the window starts: `random` (Flow-GRPO-Fast: uniform in "
                                  "[r0, r1 - size], per sample from its seed) or `sliding` (MixGRPO: r0, moved "
                                  "+1 every sde_window_shift_every steps, back to r0 after the last position).",
                                  choices=["random", "sliding"])
    sde_window_shift_every: int = uf(25, "Training steps between two moves of a sliding window (MixGRPO: 25).", ge=1)
    ema_decay: float = uf(0.0, "EMA of the adapter weights (0 = off; flow_grpo's train.ema uses 0.9), with "
                          "flow_grpo's warm-up: decay_n = min(ema_decay, (1 + n) / (10 + n)).", ge=0, lt=1)
    ema_update_every: int = uf(8, "Optimizer steps between two EMA updates (flow_grpo's update_step_interval: 8).",
                               ge=1)
    ema_for: str = uf("eval", "What the EMA weights are used for: `eval` (evaluation, saved with checkpoints, as "
                      "flow_grpo) or `eval_and_sampling` (rollouts too; the ratio is then taken against the EMA's "
                      "log-probs).", choices=["eval", "eval_and_sampling"])
    nft_beta: float = uf(1.0, "DiffusionNFT: the guidance strength beta of v+ = beta v + (1 - beta) v_old "
                         "(official: 1, 0.1 for OCR).", gt=0)
    nft_kl_weight: float = uf(1e-4, "DiffusionNFT: weight of ||v - v_ref||^2 to the adapter-free base (official "
                              "1e-4; 0 skips the reference pass).", ge=0)
    nft_old_decay_rate: float = uf(0.001, "DiffusionNFT: the sampling (old) adapter is an EMA with decay "
                                   "min(rate * step, nft_old_decay_max) (official: 0.001 ...", ge=0)
    nft_old_decay_max: float = uf(0.5, "... and 0.5).", ge=0, lt=1)
    nft_timesteps: int = uf(1, "DiffusionNFT: forward-process times drawn per sample and step (each from the "
                            "sampling schedule's num_steps times).", ge=1)

    def _validate(self, prefix, src):
        if self.noise_level <= 0:
            raise ConfigError(f"{src.where(f'{prefix}.noise_level')}: key '{prefix}.noise_level' must be > 0 "
                              f"(a deterministic step has no log-prob), got {self.noise_level}")
        if self.num_steps < 1:
            raise ConfigError(f"{src.where(f'{prefix}.num_steps')}: key '{prefix}.num_steps' must be >= 1")
        if not 0 < self.train_timestep_fraction <= 1:
            raise ConfigError(f"{src.where(f'{prefix}.train_timestep_fraction')}: key "
                              f"'{prefix}.train_timestep_fraction' must be in (0, 1], got {self.train_timestep_fraction}")
        bad = [k for k in self.train_timesteps if not 0 <= k < self.num_steps]
        if bad:
            raise ConfigError(f"{src.where(f'{prefix}.train_timesteps')}: key '{prefix}.train_timesteps' has "
                              f"indices {bad} outside [0, num_steps={self.num_steps})")
        r = self.sde_window_range or [0, self.num_steps]
        if self.sde_window_range and (len(r) != 2 or not 0 <= r[0] < r[1] <= self.num_steps):
            raise ConfigError(f"{src.where(f'{prefix}.sde_window_range')}: key '{prefix}.sde_window_range' must be "
                              f"[r0, r1] with 0 <= r0 < r1 <= num_steps={self.num_steps}, got {r}")
        if self.sde_window_size > r[1] - r[0]:
            raise ConfigError(f"{src.where(f'{prefix}.sde_window_size')}: key '{prefix}.sde_window_size' "
                              f"({self.sde_window_size}) is larger than its range {r}")

    def sde_window(self) -> dict | None:
        """The sampler's window argument (policies.flow_sde.sde_window_mask), None when every step is SDE."""
        if not self.sde_window_size:
            return None
        return {"size": self.sde_window_size, "range": list(self.sde_window_range or [0, self.num_steps]),
                "schedule": self.sde_window_schedule, "shift_every": self.sde_window_shift_every}
