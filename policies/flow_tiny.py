"""Tiny, real Stable-Diffusion-3 pipelines built offline from config (tests, quickstarts).

`build_tiny_sd3` writes a `StableDiffusion3Pipeline` directory (a small `SD3Transformer2DModel`, a
`FlowMatchEulerDiscreteScheduler`, an `AutoencoderKL`, two CLIP text encoders, no T5) with
`save_pretrained`, so it is loaded back through the same `FlowPolicy.from_pretrained` path a hub id
takes. Its VAE is fitted so that latents decode to colors, and its transformer is pre-fitted to
follow color prompts a little, so a color reward has something to learn.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .tiny import COLORS, WORDS, built_with, publish_build

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
