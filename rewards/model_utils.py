"""Helpers shared by the model-based image rewards (PickScore, HPS, ImageReward, aesthetic, OCR, detector).

Every such reward takes `batch.images` (B, H, W, 3) floats in [0, 1] and hands the scorer what the
peer implementation hands it: 8-bit RGB images, `(x * 255).round().clamp(0, 255)` as flow_grpo does,
so the model's own preprocessing (resize, crop, normalise) runs on the same pixels.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..policies.sampling import resolve_dtype

torch_dtype = resolve_dtype  # "bfloat16" / "bf16" / torch.bfloat16 -> torch.bfloat16


def resolve_file(spec: str) -> str:
    """A local file, or `owner/repo/path/in/repo` on the Hugging Face hub (downloaded once, then cached).

    One string for both lets a config say `checkpoint: xswu/HPSv2/HPS_v2.1_compressed.pt` for real use
    and `checkpoint: /tmp/tiny/hps.pt` in a test, through the same code path after this call."""
    spec = os.path.expanduser(str(spec))
    if os.path.isfile(spec):
        return spec
    parts = spec.split("/")
    if os.path.isabs(spec) or len(parts) < 3 or not all(parts):
        raise FileNotFoundError(f"{spec!r} is neither a local file nor a hub file `owner/repo/filename`")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))
    except Exception as e:  # noqa: BLE001 - say that both readings of the string were tried
        raise FileNotFoundError(f"{spec!r}: no such local file, and the hub file {parts[2:]} of "
                                f"{'/'.join(parts[:2])!r} could not be fetched ({type(e).__name__}: {e})") from e


def load_state_dict(path: str) -> dict:
    """A state dict from a .safetensors file or a torch pickle (weights only: no code runs on load)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def split_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images with non-finite samples zeroed, (B,) bool: the sample's pixels are all finite).

    A NaN pixel would turn into an arbitrary byte in the uint8 conversion and get a real-looking
    score; such a sample is marked invalid instead."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (B, H, W, 3), got {tuple(images.shape)}")
    images = images.detach().float().cpu()
    ok = torch.isfinite(images).flatten(1).all(dim=1)
    return torch.where(ok.view(-1, 1, 1, 1), images, torch.zeros(())), ok


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) floats in [0, 1] -> (B, H, W, 3) uint8, rounded as flow_grpo rounds."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images)]


def chunks(n: int, size: int):
    """Index ranges [i, i + size) covering range(n)."""
    size = max(1, int(size))
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def pooled(out) -> torch.Tensor:
    """transformers 5.x CLIP `get_image_features`/`get_text_features` return an output object whose
    `pooler_output` holds the projected embedding; older versions return the tensor itself."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def scores_with_mask(scores: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores as float32 with NaN where not ok, and the validity mask (also false for non-finite scores)."""
    s = scores.detach().float().cpu().flatten()
    s = torch.where(ok, s, torch.full_like(s, float("nan")))
    return s, ok & torch.isfinite(s)
