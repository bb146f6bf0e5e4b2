"""Flow-matching image generators (Stable Diffusion 3 family, diffusers) as RL policies.

`FlowPolicy` wraps the components of a `StableDiffusion3Pipeline` (an `SD3Transformer2DModel`, a
`FlowMatchEulerDiscreteScheduler`, an `AutoencoderKL`, two CLIP text encoders and optionally T5),
loaded by hub id or local directory, with a LoRA adapter on the transformer (PEFT). It samples with
the stochastic (SDE) form of the flow ODE used by Flow-GRPO, so every denoising transition is a
Gaussian whose log-prob can be recorded while sampling and recomputed with gradients while training:

    sigma_t  = a * sqrt(t / (1 - t))                                   (a = noise_level)
    mean     = x * (1 + sigma_t^2 * dt / (2t)) + v * (1 + sigma_t^2 * (1 - t) / (2t)) * dt
    x_next   = mean + sigma_t * sqrt(-dt) * noise                      (dt = t_next - t < 0)

(t is the flow "sigma": x_t = (1 - t) * x_0 + t * noise, velocity v = noise - x_0). The log-prob is
averaged over the latent's dimensions and computed in float32 whatever the model dtype. The step
functions (this SDE step, CPS, the ODE step outside an SDE window) are in policies/flow_sde.py.

Randomness is drawn per sample from a seed the caller gives, so a sample does not depend on which
batch, worker or device drew it. `build_tiny_sd3` writes a tiny but real pipeline directory (tests,
quickstarts) whose VAE is fitted so that latents decode to colors (policies/flow_tiny.py).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .batches import FlowRollout
from .flow_sde import STEPS, gaussian_mean_kl, sample_noise, sde_step, sde_window_mask  # noqa: F401 (re-exported)
from .sampling import resolve_dtype

# Flow-GRPO's choice: adapters on the attention projections of every joint transformer block.
FLOW_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's file name (PeftModel.from_pretrained reads it)
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' (pipe.load_lora_weights reads it)


# ----------------------------------------------------------------------------- the policy
class FlowPolicy:
    """An SD3-family pipeline (hub id or local directory) wrapped for RL."""

    modalities = ("image",)  # generates images only
    sample_takes_step = True  # sample_images(step=...): a sliding SDE window moves with the training step

    def __init__(self, pipe, device="cpu", dtype=torch.float32, max_sequence_length: int = 256):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        self.version = 0  # adapter version, bumped by whoever loads new adapter weights
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype="float32", device="cpu", max_sequence_length: int = 256,
                        load_t5: bool = True):
        """Load by hub id (`stabilityai/stable-diffusion-3.5-medium`) or local directory: one code path.

        load_t5=False drops the T5 encoder (the pipeline then feeds zeros in its place), which saves
        ~9 GB for SD3.5 at some cost in prompt following.
        """
        from diffusers import StableDiffusion3Pipeline

        dtype = resolve_dtype(dtype)
        from diffusers.pipelines import pipeline_utils

        # recent diffusers read `dtype` (and warn on `torch_dtype`); older ones only know `torch_dtype`
        kwargs = {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": dtype}
        if not load_t5:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        path = str(name_or_path)
        if os.path.isdir(path) and not (Path(path) / "model_index.json").exists():
            raise FileNotFoundError(f"{path}: not a diffusers pipeline directory (no model_index.json)")
        # Components saved as null (a pipeline written without T5, as the tiny one) must be passed as
        # None explicitly, or diffusers refuses to load the pipeline.
        index = StableDiffusion3Pipeline.load_config(path)
        for name, value in index.items():
            if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is None and name not in kwargs:
                kwargs[name] = None
        pipe = StableDiffusion3Pipeline.from_pretrained(path, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(device)
                module.requires_grad_(False)
                module.eval()
        return cls(pipe, device=device, dtype=dtype, max_sequence_length=max_sequence_length)

    # ------------------------------------------------------------------ structure
    @property
    def model(self):
        """The trained module (the transformer, adapters injected in it)."""
        return self.transformer

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Default image side in pixels (the transformer's sample size times the VAE factor)."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    @property
    def has_adapter(self) -> bool:
        return bool(getattr(self.transformer, "peft_config", None))

    def add_lora(self, r: int = 32, alpha: int = 64, dropout: float = 0.0, target_modules=None):
        """A fresh LoRA adapter on the transformer (B = 0: the policy starts equal to the reference)."""
        from peft import LoraConfig

        if self.has_adapter:
            raise RuntimeError("this policy already has an adapter")
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=list(target_modules or FLOW_LORA_TARGETS), init_lora_weights=True)
        self.transformer.add_adapter(config)
        self._make_adapter_trainable()
        return self

    def _make_adapter_trainable(self):
        found = 0
        for name, p in self.transformer.named_parameters():
            p.requires_grad_("lora_" in name)
            found += "lora_" in name
        if not found:
            raise ValueError("the LoRA config matched no module of the transformer: check target_modules")
        # LoRA tensors train in fp32 even on a bf16 base (optimizer states and small updates survive).
        for name, p in self.transformer.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()

    def trainable_parameters(self):
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def set_adapter_state_dict(self, state: dict[str, torch.Tensor], version: int | None = None):
        from peft import set_peft_model_state_dict
        # PEFT files name tensors `base_model.model.<module>...`; the injected adapter has no prefix.
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        expected = set(self.adapter_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"adapter tensors do not fit this policy: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        set_peft_model_state_dict(self.transformer, state)
        if version is not None:
            self.version = version

    def save_adapter(self, path: str | Path):
        """Write the adapter in both standard formats, in one directory:

        - PEFT: adapter_config.json + adapter_model.safetensors (`PeftModel.from_pretrained`);
        - diffusers: pytorch_lora_weights.safetensors (`StableDiffusion3Pipeline.load_lora_weights`).
        """
        from diffusers import StableDiffusion3Pipeline
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.transformer.peft_config["default"]
        state = self.adapter_state_dict()
        config.save_pretrained(str(path))
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(path / PEFT_WEIGHTS),
                  metadata={"format": "pt"})
        StableDiffusion3Pipeline.save_lora_weights(str(path), transformer_lora_layers=state,
                                                   transformer_lora_adapter_metadata=config.to_dict(),
                                                   weight_name=DIFFUSERS_WEIGHTS)


    def save_merged(self, path: str | Path) -> Path:
        """Write the pipeline with the adapter merged into the transformer's weights (`save_pretrained`):
        a directory plain diffusers loads (`StableDiffusion3Pipeline.from_pretrained`), no LoRA layers
        left. The merge is in place: the policy has no adapter after."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self.has_adapter:
            for module in self.transformer.modules():
                if isinstance(module, BaseTunerLayer):
                    module.merge()
            self.transformer.unload_lora()  # each LoRA layer -> its (now merged) base layer
        self.pipe.save_pretrained(str(path))
        return Path(path)

    def load_adapter(self, path: str | Path, trainable: bool = True):
        """Attach a saved adapter: a PEFT directory (adapter_config.json) or a diffusers LoRA file/dir."""
        path = Path(path)
        if self.has_adapter:
            raise RuntimeError("this policy already has an adapter; use set_adapter_state_dict to replace weights")
        if (path / "adapter_config.json").exists():
            from peft import LoraConfig
            from safetensors.torch import load_file

            config = LoraConfig.from_pretrained(str(path))
            self.transformer.add_adapter(config)
            self.set_adapter_state_dict(load_file(str(path / PEFT_WEIGHTS)))
        elif path.exists():
            # A LoRA trained elsewhere with diffusers (keys prefixed `transformer.`).
            self.transformer.load_lora_adapter(str(path), prefix="transformer", adapter_name="default")
        else:
            raise FileNotFoundError(f"adapter not found: {path}")
        self.transformer.to(self.device)
        if trainable:
            self._make_adapter_trainable()
        else:
            self.transformer.requires_grad_(False)
        return self

    def load_adapter_weights(self, path: str | Path, version: int | None = None):
        """Replace the current adapter's tensors with those saved in `path` (a checkpoint's adapter/)."""
        from safetensors.torch import load_file
        self.set_adapter_state_dict(load_file(str(Path(path) / PEFT_WEIGHTS)), version)

    @contextlib.contextmanager
    def reference(self):
        """Context in which the transformer is the frozen base: the adapter disabled (no second copy)."""
        if not self.has_adapter:
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def gradient_checkpointing(self, enable: bool = True):
        if enable:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) prompt embeddings and (B, P) pooled embeddings; frozen encoders, cached per prompt."""
        todo = sorted({p for p in prompts if p not in self._prompt_cache})
        if todo:
            emb, _, pooled, _ = self.pipe.encode_prompt(
                prompt=todo, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
            if len(self._prompt_cache) > 4096:  # bounded: prompt sets of real runs can be large
                self._prompt_cache.clear()
            for i, p in enumerate(todo):
                self._prompt_cache[p] = (emb[i].to(self.dtype), pooled[i].to(self.dtype))
        return (torch.stack([self._prompt_cache[p][0] for p in prompts]),
                torch.stack([self._prompt_cache[p][1] for p in prompts]))

    # ------------------------------------------------------------------ the network
    def velocity(self, x: torch.Tensor, t: torch.Tensor, prompts: list[str], cfg_scale: float = 1.0,
                 detach_uncond: bool = False) -> torch.Tensor:
        """The (guided) velocity v(x, t | prompt) in fp32; gradients flow when enabled by the caller.

        With cfg_scale > 1 the batch is doubled with the empty prompt: v = u + s * (c - u);
        detach_uncond stops the gradient through u (flow_grpo's training forward), not its value.
        """
        emb, pooled = self.encode_prompts(prompts)
        t = t.to(self.device, torch.float32).expand(x.shape[0])
        xin = x.to(self.device, self.dtype)
        if cfg_scale > 1.0:
            nemb, npooled = self.encode_prompts([""])
            emb = torch.cat([nemb.expand_as(emb), emb])
            pooled = torch.cat([npooled.expand_as(pooled), pooled])
            xin, t = torch.cat([xin, xin]), torch.cat([t, t])
        out = self.transformer(hidden_states=xin, timestep=t * self.scheduler.config.num_train_timesteps,
                               encoder_hidden_states=emb, pooled_projections=pooled, return_dict=False)[0].float()
        if cfg_scale > 1.0:
            uncond, cond = out.chunk(2)
            if detach_uncond:
                uncond = uncond.detach()
            return uncond + cfg_scale * (cond - uncond)
        return out

    def sigma_schedule(self, num_steps: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The scheduler's flow times for `num_steps` steps: (K + 1,) from 1 down to 0."""
        import copy

        sched = copy.deepcopy(self.scheduler)  # set_timesteps mutates; keep the pipeline's untouched
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", False):
            # resolution-dependent shift, as the pipelines compute it
            p = self.transformer.config.patch_size
            seq = (latent_hw[0] // p) * (latent_hw[1] // p)
            c = sched.config
            m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
            kwargs["mu"] = seq * m + c.base_shift - m * c.base_image_seq_len
        sched.set_timesteps(num_steps, **kwargs)
        return sched.sigmas.detach().float().cpu()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_images(self, prompts: list[str], seeds: list[int], num_steps: int = 10, cfg_scale: float = 4.5,
                      noise_level: float = 0.7, group_ids=None, targets: list[str] | None = None,
                      height: int | None = None, width: int | None = None, batch_size: int = 0,
                      sde_type: str = "sde", sde_window: dict | None = None, step: int = 0) -> FlowRollout:
        """Stochastic sampling with the log-prob of every stochastic transition recorded (policies/flow_sde.py).

        sde_type: `sde` (Flow-GRPO), `cps` (coefficients-preserving) or `ode` (deterministic everywhere:
        DiffusionNFT's sampler, no log-probs). sde_window: which steps are stochastic (`sde_window_mask`;
        ODE elsewhere, log-prob 0 there); `step` is the training step a sliding window moves with.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if sde_type not in STEPS:
            raise ValueError(f"sde_type must be one of {sorted(STEPS)}, got {sde_type!r}")
        if noise_level <= 0 and sde_type != "ode":
            raise ValueError("noise_level must be > 0: a deterministic (ODE) step has no log-prob")
        height, width = height or self.image_size, width or self.image_size
        f = self.vae_scale_factor * self.transformer.config.patch_size
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (VAE factor x patch size), "
                             f"got {height}x{width}")
        hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        shape = (self.latent_channels, *hw)
        sig = self.sigma_schedule(num_steps, hw)
        x0, noises = sample_noise(seeds, num_steps, shape)
        mask = sde_window_mask(seeds, num_steps, sde_window, step) & (sde_type != "ode")
        bs = batch_size or len(prompts)
        lat_rows, logp_rows = [], []
        for i in range(0, len(prompts), bs):
            ps = prompts[i:i + bs]
            x = x0[i:i + bs].to(self.device)
            n = len(ps)
            traj, logps = [x.float().cpu()], []
            for k in range(num_steps):
                t, t_next = sig[k].expand(n).to(self.device), sig[k + 1].expand(n).to(self.device)
                v = self.velocity(x, t, ps, cfg_scale)
                x, logp = self._step(v, x, t, t_next, sig[1].expand(n).to(self.device), noise_level, sde_type,
                                     mask[i:i + bs, k].to(self.device), noise=noises[i:i + bs, k].to(self.device))[:2]
                traj.append(x.cpu())
                logps.append(logp.cpu())
            lat_rows.append(torch.stack(traj, 1))
            logp_rows.append(torch.stack(logps, 1))
        latents = torch.cat(lat_rows)
        images = self.decode(latents[:, -1])
        gids = torch.as_tensor(group_ids if group_ids is not None else range(len(prompts)), dtype=torch.long)
        return FlowRollout(prompts=list(prompts), latents=latents, sigmas=sig.expand(len(prompts), -1).clone(),
                           logprobs=torch.cat(logp_rows), images=images, group_ids=gids,
                           targets=list(targets or []), version=self.version, cfg_scale=cfg_scale,
                           noise_level=noise_level, sde_type=sde_type, sde_mask=mask)

    @staticmethod
    def _step(v, x, t, t_next, t_cap, noise_level, sde_type, stochastic, noise=None, x_next=None):
        """One step per row: the stochastic kind where `stochastic` (B,) is set, the ODE step elsewhere."""
        if sde_type == "ode" or not stochastic.any():
            return STEPS["ode"](v, x, t, t_next)
        xs, logp, mean, std = STEPS[sde_type](v, x, t, t_next, noise_level, t_cap, noise=noise, x_next=x_next)
        if stochastic.all():
            return xs, logp, mean, std
        xo, _, mo, _ = STEPS["ode"](v, x, t, t_next)
        m = stochastic.view((-1,) + (1,) * (x.dim() - 1))
        return (torch.where(m, xs, xo), torch.where(stochastic, logp, 0.0), torch.where(m, mean, mo),
                torch.where(stochastic, std, 0.0))

    def transition_logprobs(self, batch: FlowRollout, step_index: int | torch.Tensor, cfg_scale: float | None = None,
                            noise_level: float | None = None, detach_uncond: bool = False):
        """Recompute (with gradients, if enabled) the log-prob of transition `step_index` of each row.

        step_index: an int, or a (B,) tensor (a different transition per row). Returns
        (logprob (B,), mean (B, C, h, w), std (B,)), all fp32, of the step kind the batch was sampled with
        (0, the ODE step's mean and 0 where the transition was deterministic).
        """
        B = len(batch)
        idx = torch.as_tensor(step_index, dtype=torch.long).expand(B)
        rows = torch.arange(B)
        x, x_next = batch.latents[rows, idx], batch.latents[rows, idx + 1]
        t, t_next = batch.sigmas[rows, idx], batch.sigmas[rows, idx + 1]
        cfg = batch.cfg_scale if cfg_scale is None else cfg_scale
        a = batch.noise_level if noise_level is None else noise_level
        dev = self.device
        v = self.velocity(x.to(dev), t, batch.prompts, cfg, detach_uncond)
        stochastic = batch.stochastic_steps()[rows, idx].to(dev)
        _, logp, mean, std = self._step(v, x.to(dev), t.to(dev), t_next.to(dev), batch.sigmas[:, 1].to(dev), a,
                                        batch.sde_type, stochastic, x_next=x_next.to(dev))
        return logp, mean, std

    # ------------------------------------------------------------------ pixels <-> latents
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Latents (in the transformer's normalised space) -> (B, H, W, 3) images in [0, 1]."""
        c = self.vae.config
        out = []
        for i in range(0, len(latents), chunk):
            z = latents[i:i + chunk].to(self.device, self.vae.dtype) / c.scaling_factor + (c.shift_factor or 0.0)
            px = self.vae.decode(z, return_dict=False)[0].float()
            out.append(((px + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """(B, H, W, 3) images in [0, 1] -> latents in the transformer's space (the VAE posterior mode)."""
        c = self.vae.config
        out = []
        for i in range(0, len(images), chunk):
            px = images[i:i + chunk].to(self.device, self.vae.dtype).permute(0, 3, 1, 2) * 2 - 1
            z = self.vae.encode(px).latent_dist.mode()
            out.append(((z.float() - (c.shift_factor or 0.0)) * c.scaling_factor).cpu())
        return torch.cat(out)
