"""A tiny, real Emu3 checkpoint built offline from config, with a VQ decoder set by hand.

`build_tiny_emu3(path, seed)` writes an `Emu3ForConditionalGeneration` (a few hundred thousand
random weights), a word-level tokenizer that holds Emu3's special tokens and 64 visual tokens, and
an `Emu3Processor`, all with `save_pretrained`, so `Emu3Policy.from_pretrained(path)` takes the
same code path as a hub id such as `BAAI/Emu3-Gen-hf`.

The palette VQ (the tiny Janus' trick, `policies/tiny.py`), here exact and without training:
visual code k decodes to a solid 8x8 patch of `palette()[k]` (4 levels per channel, so the eight
named `COLORS` are all codes). The Emu3 decoder's last layer is a spatial norm,
`GroupNorm(h) * conv_y(q) + conv_b(q)` with `q` the (nearest-upsampled) code embedding; with
`conv_y = 0`, a per-pixel `conv_b`, a centre-tap-only `conv_out` and identity temporal blocks, the
pixel is a pointwise function of its code's embedding, which is set to the palette color. The VQ
encoder stays random (its GroupNorms make a solid image's code depend on the color's direction
only), so `encode_images` is not an exact inverse on this model; generation and decoding are.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .tiny import COLORS, PALETTE_LEVELS, built_with, palette, publish_build

MARKER = "uniloop_tiny_emu3.json"
TINY_EMU3_DEFAULTS = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                          grid=4)
DOWNSAMPLE = 8  # Emu3's VQ: 4 levels of channel_multiplier, 2^3 pixels per code and side
NUM_CODES = len(PALETTE_LEVELS) ** 3
SILU_OFFSET = 20.0  # silu(x + 20) - 20 == x to ~1e-8: the decoder's one nonlinearity made an identity

# Emu3's own special tokens (names as in the BAAI tokenizer), plus the small tokenizer's pad/bos/eos/unk.
EMU3_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<|image start|>", "<|image end|>",
                 "<|image token|>", "<|extra_200|>", "<|extra_201|>"]
WORDS = (
    "a an the image picture photo of with and is this that what which color colour does show shows "
    "answer yes no or in one word only there it you are helpful assistant user"
).split() + list(COLORS)
PUNCT = ["?", ".", ",", ":", "!", "*"] + [str(d) for d in range(10)]


def visual_token(k: int) -> str:
    return f"<|visual token{k:06d}|>"


def build_tokenizer(num_codes: int = NUM_CODES):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = EMU3_SPECIALS + [visual_token(k) for k in range(num_codes)]
    vocab = {t: i for i, t in enumerate(specials + PUNCT + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens(specials)
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    # No BOS template: Emu3Processor writes the BOS itself, as with the real (GPT-style) tokenizer.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
                              "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"})


def build_tiny_emu3(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write a tiny Emu3 checkpoint (model + processor) to `path` (atomically) and return it.

    Re-uses a checkpoint at `path` built with the same settings. `grid` is the generated image's
    side in codes (4 -> 16 visual tokens, 32x32 pixels), as Emu3's `image_area` would set it.
    """
    from transformers import (Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor,
                              Emu3TextConfig, Emu3VQVAEConfig)

    unknown = set(overrides) - set(TINY_EMU3_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tiny-Emu3 option(s) {sorted(unknown)}; known: {sorted(TINY_EMU3_DEFAULTS)}")
    spec = {**TINY_EMU3_DEFAULTS, **overrides, "seed": seed, "format": 2}
    path = Path(path)
    if built_with(path, MARKER, spec):
        return path

    tokenizer = build_tokenizer()
    h = spec["hidden_size"]
    text = Emu3TextConfig(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=spec["intermediate_size"],
                          num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
                          num_key_value_heads=spec["num_kv_heads"], max_position_embeddings=1024,
                          attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vq = Emu3VQVAEConfig(codebook_size=NUM_CODES, embed_dim=4, latent_channels=4, base_channels=32,
                         channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                         temporal_downsample_factor=1, hidden_size=32)
    config = Emu3Config(text_config=text, vq_config=vq, vocabulary_map=tokenizer.get_vocab())
    area = (spec["grid"] * DOWNSAMPLE) ** 2
    config.uniloop_image_area = area  # the generation size this checkpoint is meant for (Emu3Policy reads it)
    # fork_rng: building must not move the caller's global RNG (see policies/tiny.py)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Emu3ForConditionalGeneration(config)
        _scale_lm(model, h)
        set_palette_decoder(model.model.vqmodel)
    model.eval()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    image_processor = Emu3ImageProcessor(min_pixels=area, max_pixels=area, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tokenizer)
    return publish_build(path, MARKER, spec, model, processor)


def _scale_lm(model, hidden: int):
    """O(1) logits from the random head (the default std 0.02 gives near-uniform sampling that no
    adapter can move; see policies/tiny.py `_scale_output_heads`)."""
    with torch.no_grad():
        model.lm_head.weight.normal_(0, hidden ** -0.5)
        model.model.text_model.embed_tokens.weight.normal_(0, 1.0)


@torch.no_grad()
def set_palette_decoder(vq):
    """Make `vq.decode` map code k to a solid patch of palette()[k] exactly (see the module docstring)."""
    cfg = vq.config
    if cfg.embed_dim < 3 or cfg.latent_channels != cfg.embed_dim:
        raise ValueError("the palette decoder needs embed_dim == latent_channels >= 3")
    emb = torch.zeros(cfg.codebook_size, cfg.embed_dim)
    emb[:, :3] = palette()[: cfg.codebook_size] * 2 - 1  # decoder output is in [-1, 1]
    vq.quantize.embedding.weight.copy_(emb)
    dec = vq.decoder
    for block in dec.time_res_stack:  # residual + conv2(...) with conv2 = 0: identity
        block.conv2.conv.weight.zero_()
        block.conv2.conv.bias.zero_()
    if len(dec.time_conv):
        raise ValueError("the palette decoder needs temporal_downsample_factor=1")
    norm = dec.norm_out
    norm.conv_y.weight.zero_()
    norm.conv_y.bias.zero_()
    norm.conv_b.weight.zero_()
    norm.conv_b.bias.zero_()
    out = dec.conv_out
    out.weight.zero_()
    for c in range(3):
        norm.conv_b.weight[c, c] = 1.0
        norm.conv_b.bias[c] = SILU_OFFSET
        out.weight[c, c, 1, 1] = 1.0
    out.bias.fill_(-SILU_OFFSET)
