"""Learner micro-batching for Janus image log-probs: how many samples fit in one forward/backward.

Teacher forcing a 576-token image costs one forward over prompt + image tokens (twice the rows with
CFG-mode log-probs) and a backward. Memory grows linearly with the samples in a micro-batch:
  - with gradient checkpointing, each decoder layer keeps only its input (rows x S x hidden), plus
    one layer's full activations while it is recomputed;
  - without it, every layer keeps q/k/v/o, norms, the MLP's gate/up/act and residuals;
  - the image head materialises float32 logits over the 16384-code VQ vocabulary for each image
    token, and CFG/log-softmax temporaries and their gradients of the same size.
`activation_bytes_per_sample` estimates this (conservatively; benchmarks/learner_step.py prints
the estimate next to the measured peak), and `auto_micro_batch_size` divides the free memory by it.
"""
from __future__ import annotations

import torch


def activation_bytes_per_sample(policy, prompt_len: int, mode: str = "cfg", cfg_scale: float = 5.0,
                                checkpointing: bool | None = None) -> int:
    """Estimated peak activation bytes that one image sample adds to a learner forward+backward."""
    if not hasattr(policy, "janus"):
        raise ValueError(f"automatic micro-batch sizing (per_device_train_batch_size: 0) knows Janus only, not "
                         f"{type(policy).__name__}: set grpo.per_device_train_batch_size")
    lm = policy.janus.model.language_model
    cfg = lm.config
    if checkpointing is None:
        checkpointing = bool(getattr(lm, "gradient_checkpointing", False))
    rows = 2 if (mode == "cfg" and cfg_scale > 1.0) else 1
    T = policy.num_image_tokens
    S = prompt_len + T - 1
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    V = policy.janus.model.generation_head.vision_head.out_features
    # Activation element size: bf16/fp16 compute stays 2 bytes; a 4-bit base prepared for k-bit
    # training (PEFT casts norms to float32) runs its hidden states in float32.
    e = 4 if policy.dtype == torch.float32 or getattr(policy.janus, "is_loaded_in_4bit", False) else 2
    per_layer_full = S * (12 * H + 5 * I) * e  # attention + MLP tensors autograd keeps, one sequence
    if checkpointing:
        body = S * H * e * L + per_layer_full  # layer inputs + the layer being recomputed
    else:
        body = per_layer_full * L
    head = T * (2 * H * e + V * (e + 4 * 6))  # head hidden, logits (bf16 + float32 temporaries + grads)
    return int(rows * (body + head))


def free_memory_bytes(device) -> int | None:
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return None


def auto_micro_batch_size(policy, n_samples: int, prompt_len: int, mode: str = "cfg", cfg_scale: float = 5.0,
                          free_bytes: int | None = None, safety: float = 0.8,
                          checkpointing: bool | None = None) -> int:
    """Largest micro-batch (<= n_samples, >= 1) whose estimated activations fit in `safety` x free memory.

    `free_bytes` defaults to the device's free memory (CUDA); on a CPU without a figure, the whole
    batch is one micro-batch.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if free_bytes is None:
        free_bytes = free_memory_bytes(policy.device)
    if free_bytes is None:
        return n_samples
    per = activation_bytes_per_sample(policy, prompt_len, mode, cfg_scale, checkpointing)
    return max(1, min(n_samples, int(safety * free_bytes) // per))


def micro_batches(n: int, size: int) -> list[list[int]]:
    """Row indices of consecutive micro-batches of at most `size` rows."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]
