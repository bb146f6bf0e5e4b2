"""Sampling primitives shared by the Janus samplers (plain and fast) and the teacher-forced log-probs.

Randomness is drawn per sample from a seed (`uniforms_for`) and turned into tokens by inverse-CDF
sampling, so a sample's tokens do not depend on the batch, worker or device that drew it. The same
expressions run in the sampler and under teacher forcing, which is what makes them agree to float
precision.
"""
from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

# bitsandbytes logs this at import on CPUs with AVX512-BF16 when the optional `kernels` package (a hub
# download) is absent; its own fallback kernel is used, so the line only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def cache_kwargs(cache) -> dict:
    """The KV-cache keyword of a transformers forward: `cache` since transformers 5.24 (the old
    `past_key_values` still works there but warns on every call), `past_key_values` before."""
    return {_CACHE_KEYWORD: cache}


def _cache_keyword() -> str:
    from transformers.models.llama.modeling_llama import LlamaModel
    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


_CACHE_KEYWORD = _cache_keyword()

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def uniforms_for(seeds: list[int], length: int, device) -> torch.Tensor:
    """One row of `length` uniforms per seed; the row depends on its seed alone."""
    rows = [torch.rand(length, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
            for s in seeds]
    return torch.stack(rows).to(device)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def inverse_cdf_sample(logprobs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token whose CDF interval contains u (u in [0,1)); greedy when u is None."""
    cdf = logprobs.double().exp().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
    return idx.clamp_(max=logprobs.shape[-1] - 1)


def entropy_of(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy of each distribution given as log-probs over the last dim (-inf entries allowed: they
    contribute 0, not NaN). Logged as the policy's entropy: a collapsing policy shows it falling."""
    p = logprobs.exp()
    return -(p * logprobs.masked_fill(p == 0, 0.0)).sum(-1)


def half_precision(dtype) -> bool:
    return resolve_dtype(dtype) in (torch.bfloat16, torch.float16)


def default_attention(dtype, device, requested: str | None) -> str | None:
    """The attention implementation to load a generator with: the requested one, else `eager` for a
    half-precision model on the CPU, else transformers' default (sdpa).

    Why: in bf16 on the CPU, SDPA's kernel splits a one-query decode step differently from a full
    causal forward, and the two round differently: sampled and teacher-forced image log-probs then
    differ by up to 0.1-0.2 nats under CFG (benchmarks/bf16_logprob_gap.py). Eager attention (one
    matmul, float32 softmax, one matmul) computes each query row the same way whatever the number of
    rows, so the sampler's log-probs equal the learner's bit for bit there."""
    if requested:
        return requested
    return "eager" if half_precision(dtype) and torch.device(device).type == "cpu" else None


def generation_logits(head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A generation head (Linear -> activation -> Linear, as Janus's) evaluated in float32 on a
    half-precision hidden state.

    Why: under CFG the logits enter as s*c - (s-1)*u, so a rounding error in bf16 logits (2^-9 of their
    size) is amplified ~2s-1 times; in float32 that error is gone and only the hidden state's own
    rounding remains (cfg-mode gap 0.084 -> 0.065 nats on the 1B shape with SDPA, BENCHMARKS.md). The
    head is frozen (LoRA sits on the language model), so its float32 copy is made once and kept until
    its weights change (storage or in-place version); a float32 head is used as it is."""
    params = (head.proj_out.weight, head.proj_out.bias, head.vision_head.weight, head.vision_head.bias)
    if all(p is None or p.dtype == torch.float32 for p in params):
        return head(h.float())
    if any(p is not None and p.requires_grad for p in params):  # a trained head: cast with gradients
        w1, b1, w2, b2 = (None if p is None else p.float() for p in params)
        return F.linear(head.activation_fn(F.linear(h.float(), w1, b1)), w2, b2)
    key = tuple((p.data_ptr(), p._version) for p in params if p is not None)
    cached = getattr(head, "_uniloop_fp32", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, [None if p is None else p.detach().float() for p in params])
        head._uniloop_fp32 = cached
    w1, b1, w2, b2 = cached[1]
    return F.linear(head.activation_fn(F.linear(h.float(), w1, b1)), w2, b2)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float) -> torch.Tensor:
    if uncond is None:
        return cond
    return uncond + cfg_scale * (cond - uncond)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    # Left padding: real tokens get positions 0..n-1 whatever the padding, as in HF generate.
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits).gather(index) without materialising the full log-softmax (TRL's)."""
    try:
        from trl.trainer.utils import selective_log_softmax as trl_sls
    except Exception:  # pragma: no cover - trl is a hard dependency, this guards odd installs
        return F.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    if torch.isinf(logits).any():  # top-k masked logits: TRL's fp32 path handles -inf fine, be safe
        return F.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return trl_sls(logits, index)
