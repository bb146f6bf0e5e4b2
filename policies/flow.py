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
averaged over the latent's dimensions and computed in float32 whatever the model dtype.

Randomness is drawn per sample from a seed the caller gives, so a sample does not depend on which
batch, worker or device drew it. `build_tiny_sd3` writes a tiny but real pipeline directory (tests,
quickstarts) whose VAE is fitted so that latents decode to colors.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batches import _Batch
from .janus import resolve_dtype
from .tiny import COLORS, WORDS, built_with, publish_build

# Flow-GRPO's choice: adapters on the attention projections of every joint transformer block.
FLOW_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's file name (PeftModel.from_pretrained reads it)
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' (pipe.load_lora_weights reads it)


# ----------------------------------------------------------------------------- the batch
@dataclass
class FlowRollout(_Batch):
    """prompt -> image samples of a flow-matching policy, with their whole denoising trajectory.

    `latents[:, k]` is the state before step k and `latents[:, k + 1]` the one after it, so the
    transition k can be re-scored by the learner; `logprobs[:, k]` is its log-prob (mean over the
    latent's dimensions) under the policy that sampled it, with the guidance it used.
    """

    prompts: list[str]
    latents: torch.Tensor  # (B, K + 1, C, h, w) float32 trajectory, noise first, final latent last
    sigmas: torch.Tensor  # (B, K + 1) the flow times t of the trajectory (1 ... 0)
    logprobs: torch.Tensor  # (B, K) float32 log-prob of each transition
    images: torch.Tensor  # (B, H, W, 3) float in [0, 1]
    group_ids: torch.Tensor  # (B,) samples of one prompt share a group id
    targets: list[str] = field(default_factory=list)  # optional per-sample ground truth (e.g. color)
    version: int = 0  # adapter version the samples were drawn with
    cfg_scale: float = 1.0
    noise_level: float = 0.7

    kind = "image"

    @property
    def num_steps(self) -> int:
        return self.logprobs.shape[1]


# ----------------------------------------------------------------------------- the SDE step
def sde_step(velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, noise_level: float,
             t_cap: torch.Tensor, noise: torch.Tensor | None = None, x_next: torch.Tensor | None = None):
    """One stochastic Euler step of the flow ODE and the Gaussian log-prob of the transition, in fp32.

    t, t_next, t_cap: (B,) flow times. `t_cap` replaces t in 1/(1 - t) where t = 1 (the first step of
    a schedule starting at pure noise would otherwise have infinite noise); it is the schedule's
    second time. Give `noise` to sample x_next, or `x_next` to score a recorded transition.
    Returns (x_next, logprob (B,), mean, std (B,)).
    """
    v, x = velocity.float(), x.float()
    shape = (-1,) + (1,) * (x.dim() - 1)
    t, t_next, t_cap = (u.float().view(shape) for u in (t, t_next, t_cap))
    dt = t_next - t  # negative: time runs from noise (1) to data (0)
    t_safe = torch.where(t >= 1, t_cap, t)
    sigma_t = noise_level * torch.sqrt(t / (1 - t_safe))
    mean = x * (1 + sigma_t ** 2 / (2 * t) * dt) + v * (1 + sigma_t ** 2 * (1 - t) / (2 * t)) * dt
    std = sigma_t * torch.sqrt(-dt)
    if x_next is None:
        if noise is None:
            raise ValueError("sde_step needs `noise` to sample or `x_next` to score")
        x_next = mean + std * noise.float()
    x_next = x_next.float()
    logp = -((x_next - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return x_next, logp.mean(dim=tuple(range(1, x.dim()))), mean, std.view(-1)


def gaussian_mean_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two transition Gaussians with the same std, per sample (mean over dimensions)."""
    d = (mean.float() - mean_ref.float()) ** 2
    return d.mean(dim=tuple(range(1, d.dim()))) / (2 * std.float() ** 2)


def sample_noise(seeds: list[int], num_steps: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise (B, *shape) and per-step noises (B, K, *shape); each row depends on its seed alone."""
    x0, steps = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        x0.append(torch.randn(shape, generator=g))
        steps.append(torch.randn((num_steps, *shape), generator=g))
    return torch.stack(x0), torch.stack(steps)


# ----------------------------------------------------------------------------- the policy
class FlowPolicy:
    """An SD3-family pipeline (hub id or local directory) wrapped for RL."""

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
        kwargs = {"torch_dtype": dtype}
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
    def velocity(self, x: torch.Tensor, t: torch.Tensor, prompts: list[str], cfg_scale: float = 1.0) -> torch.Tensor:
        """The (guided) velocity v(x, t | prompt) in fp32; gradients flow when enabled by the caller.

        With cfg_scale > 1 the batch is doubled with the empty prompt: v = u + s * (c - u).
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
                      height: int | None = None, width: int | None = None, batch_size: int = 0) -> FlowRollout:
        """SDE sampling with the log-prob of every transition recorded (see module docstring)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if noise_level <= 0:
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
        bs = batch_size or len(prompts)
        lat_rows, logp_rows = [], []
        for i in range(0, len(prompts), bs):
            ps = prompts[i:i + bs]
            x = x0[i:i + bs].to(self.device)
            n = len(ps)
            traj, logps = [x.float().cpu()], []
            for k in range(num_steps):
                t, t_next = sig[k].expand(n), sig[k + 1].expand(n)
                v = self.velocity(x, t, ps, cfg_scale)
                x, logp, _, _ = sde_step(v, x, t.to(self.device), t_next.to(self.device), noise_level,
                                         sig[1].expand(n).to(self.device), noise=noises[i:i + bs, k].to(self.device))
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
                           noise_level=noise_level)

    def transition_logprobs(self, batch: FlowRollout, step_index: int | torch.Tensor, cfg_scale: float | None = None,
                            noise_level: float | None = None):
        """Recompute (with gradients, if enabled) the log-prob of transition `step_index` of each row.

        step_index: an int, or a (B,) tensor (a different transition per row). Returns
        (logprob (B,), mean (B, C, h, w), std (B,)), all fp32.
        """
        B = len(batch)
        idx = torch.as_tensor(step_index, dtype=torch.long).expand(B)
        rows = torch.arange(B)
        x, x_next = batch.latents[rows, idx], batch.latents[rows, idx + 1]
        t, t_next = batch.sigmas[rows, idx], batch.sigmas[rows, idx + 1]
        cfg = batch.cfg_scale if cfg_scale is None else cfg_scale
        a = batch.noise_level if noise_level is None else noise_level
        v = self.velocity(x.to(self.device), t, batch.prompts, cfg)
        dev = self.device
        _, logp, mean, std = sde_step(v, x.to(dev), t.to(dev), t_next.to(dev), a, batch.sigmas[:, 1].to(dev),
                                      x_next=x_next.to(dev))
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


# ----------------------------------------------------------------------------- tiny pipelines
TINY_SD3_DEFAULTS = dict(latent_size=8, latent_channels=4, num_layers=2, num_heads=4, head_dim=16,
                         text_hidden=32, text_layers=2, max_text_length=16, vae_channels=16, vae_levels=1,
                         vae_fit_steps=400, color_gain=2.0, shift=3.0, base_fit_steps=300,
                         base_prompt_following=0.5, max_sequence_length=8)
# The tiny VAE's latent code (in the transformer's normalised space): pixel RGB = sigmoid(gain * z[:3]);
# the fitted encoder inverts it. Non-trivial scaling/shift exercise the same code path as SD3's VAE.
TINY_VAE_SCALING, TINY_VAE_SHIFT = 1.5, 0.1


def build_clip_tokenizer(max_length: int = 16):
    """A CLIP BPE tokenizer over a small word list, built offline (chars + whole-word merges)."""
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in list(string.ascii_lowercase) + list(string.digits) + list(".,?!'-:;\"()"):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in sorted(set(WORDS) | set(COLORS)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for piece in pieces[1:]:
            if (cur, piece) not in merges:
                merges.append((cur, piece))
            cur += piece
            vocab.setdefault(cur, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def fit_color_vae(vae, steps: int = 400, gain: float = 2.0, seed: int = 0, batch: int = 16):
    """Teach a random tiny VAE a color code: latent channels 0-2 <-> RGB through a sigmoid.

    A random VAE decodes every latent to near-identical grey noise, leaving nothing for an image
    reward to learn from. A few hundred Adam steps (a few seconds on 2 cores) make decode(z) show
    the color sigmoid(gain * z[:3]) per latent pixel (extra channels ignored) and make encode invert
    it, so flow latents map to colors and images map back to latents (Diffusion-DPO needs both).
    """
    if steps <= 0:
        return
    g = torch.Generator().manual_seed(seed)
    c = vae.config
    f = 2 ** (len(c.block_out_channels) - 1)
    n = c.sample_size // f
    C = c.latent_channels
    opt = torch.optim.Adam(vae.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps)
    vae.train()
    eps = 0.03
    with torch.enable_grad():
        for i in range(steps):
            z = torch.randn((batch, C, n, n), generator=g) * 1.5
            z[: batch // 2] = z[: batch // 2, :, :1, :1]  # half solid images, the synthetic task's case
            if i % 2:  # pure colors (0/1 channels) as in preference data: clamp to the codable range
                pure = torch.randint(0, 2, (batch // 4, 3, 1, 1), generator=g).float()
                z[: batch // 4, :3] = torch.logit(pure.clamp(eps, 1 - eps)) / gain
            rgb = torch.sigmoid(gain * z[:, :3]).repeat_interleave(f, 2).repeat_interleave(f, 3)
            raw = z / c.scaling_factor + c.shift_factor
            out = (vae.decode(raw).sample + 1) / 2
            # encoder target: the code of the pixels, unused channels at 0
            code = torch.logit(rgb[:, :, ::f, ::f].clamp(eps, 1 - eps)) / gain
            code = torch.cat([code, torch.zeros(batch, C - 3, n, n)], 1) / c.scaling_factor + c.shift_factor
            post = vae.encode(rgb * 2 - 1).latent_dist
            loss = ((out - rgb) ** 2).mean() + ((post.mean - code) ** 2).mean() + ((post.logvar + 8) ** 2).mean() * 1e-3
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    vae.eval()
    return loss.item()


def fit_solid_color_flow(pipe, steps: int = 300, seed: int = 0, max_sequence_length: int = 8, batch: int = 32,
                         spread: float = 1.2, prompt_following: float = 0.5, gain: float = 2.0):
    """Pre-train the tiny transformer (flow matching) into a weak base model of solid color images.

    A random transformer turns noise into per-pixel noise; a real base model makes coherent images
    and follows prompts imperfectly. Here a training image is a solid color: the color a prompt
    names with probability `prompt_following`, otherwise a random one (z[:3] ~ N(0, spread^2)).
    The base thus makes solid images whose color only sometimes matches the prompt, which leaves
    clear, measurable room for RL / DPO (as SD3.5's GenEval 0.63 leaves for Flow-GRPO).
    """
    if steps <= 0:
        return
    tr = pipe.transformer
    g = torch.Generator().manual_seed(seed + 7)
    names = list(COLORS)
    prompts = [f"a {c} image" for c in names] + ["", "a image", "a photo", "a picture"]
    eps = 0.03
    codes = torch.logit(torch.tensor([COLORS[c] for c in names]).clamp(eps, 1 - eps)) / gain
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                               do_classifier_free_guidance=False,
                                               max_sequence_length=max_sequence_length)
    C, n = tr.config.in_channels, tr.config.sample_size
    shift = pipe.scheduler.config.shift
    opt = torch.optim.Adam(tr.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps)
    tr.train()
    with torch.enable_grad():
        for _ in range(steps):
            z0 = torch.zeros(batch, C, n, n)
            pick = torch.randint(len(prompts), (batch,), generator=g)
            color = torch.randn(batch, 3, generator=g) * spread
            follow = (torch.rand(batch, generator=g) < prompt_following) & (pick < len(names))
            color[follow] = codes[pick[follow]]
            z0[:, :3] = color.view(batch, 3, 1, 1).expand(-1, -1, n, n)
            noise = torch.randn(batch, C, n, n, generator=g)
            u = torch.rand(batch, generator=g)
            t = shift * u / (1 + (shift - 1) * u)  # the scheduler's shifted times
            tt = t.view(-1, 1, 1, 1)
            xt = (1 - tt) * z0 + tt * noise
            v = tr(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=emb[pick],
                   pooled_projections=pooled[pick], return_dict=False)[0]
            loss = ((v - (noise - z0)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    tr.eval()
    return loss.item()


def build_tiny_sd3(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write a tiny StableDiffusion3Pipeline directory (save_pretrained) and return it.

    Real diffusers/transformers classes at toy sizes: an SD3Transformer2DModel, a color-fitted
    AutoencoderKL, two CLIPTextModelWithProjection encoders with CLIP tokenizers, no T5 (the
    pipeline feeds zeros in its place). Reused when `path` holds one built with the same settings.
    """
    unknown = set(overrides) - set(TINY_SD3_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tiny-model option(s) {sorted(unknown)}; known: {sorted(TINY_SD3_DEFAULTS)}")
    spec = {**TINY_SD3_DEFAULTS, **overrides, "seed": seed}
    path = Path(path)
    if built_with(path, "uniloop_tiny.json", spec):
        return path

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy-sized ops: extra intra-op threads only add synchronisation
    try:
        return _build_tiny_sd3(path, spec, seed)
    finally:
        torch.set_num_threads(threads)


def _build_tiny_sd3(path: Path, spec: dict, seed: int) -> Path:
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = build_clip_tokenizer(spec["max_text_length"])
    h = spec["text_hidden"]

    def clip(layer_seed):
        torch.manual_seed(seed * 101 + layer_seed)
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=2 * h,
                             num_hidden_layers=spec["text_layers"], num_attention_heads=2,
                             max_position_embeddings=spec["max_text_length"], projection_dim=h,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        return CLIPTextModelWithProjection(cfg).eval()

    text_encoder, text_encoder_2 = clip(1), clip(2)
    torch.manual_seed(seed * 101 + 3)
    transformer = SD3Transformer2DModel(
        sample_size=spec["latent_size"], patch_size=2, in_channels=spec["latent_channels"],
        out_channels=spec["latent_channels"], num_layers=spec["num_layers"], attention_head_dim=spec["head_dim"],
        num_attention_heads=spec["num_heads"], joint_attention_dim=2 * h,
        caption_projection_dim=spec["num_heads"] * spec["head_dim"], pooled_projection_dim=2 * h,
        pos_embed_max_size=max(16, spec["latent_size"] // 2))
    torch.manual_seed(seed * 101 + 4)
    ch = spec["vae_channels"]
    levels = spec["vae_levels"]  # 1: images at latent resolution (8 px); each level doubles it
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
                        up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=[ch] * levels,
                        layers_per_block=1, latent_channels=spec["latent_channels"], norm_num_groups=8,
                        sample_size=spec["latent_size"] * 2 ** (levels - 1), scaling_factor=TINY_VAE_SCALING,
                        shift_factor=TINY_VAE_SHIFT, use_quant_conv=False, use_post_quant_conv=False,
                        mid_block_add_attention=False)
    fit_color_vae(vae, steps=spec["vae_fit_steps"], gain=spec["color_gain"], seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=spec["shift"])
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    fit_solid_color_flow(pipe, steps=spec["base_fit_steps"], seed=seed, max_sequence_length=spec["max_sequence_length"],
                         prompt_following=spec["base_prompt_following"], gain=spec["color_gain"])

    return publish_build(path, "uniloop_tiny.json", spec, pipe)
