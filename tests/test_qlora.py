"""QLoRA on CPU: a 4-bit NF4 base (bitsandbytes) under a LoRA adapter trains the adapter only.

bitsandbytes runs 4-bit layers on the CPU, so the path a GPU user takes with
`model.quantization: 4bit` (JanusPolicy.from_pretrained(..., quantization="4bit")) is exercised
here on the tiny model: forward, backward, an optimizer step; base frozen, adapter updated.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from uniloop.policies.janus import JanusPolicy
from uniloop.policies.microbatch import activation_bytes_per_sample, auto_micro_batch_size, micro_batches
from uniloop.policies.tiny import build_tiny_janus

bnb = pytest.importorskip("bitsandbytes")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_janus(tmp_path_factory.mktemp("qlora") / "tiny", seed=2, vq_fit_steps=0)


def test_4bit_base_lora_trains_adapter_only(tiny_dir):
    policy = JanusPolicy.from_pretrained(tiny_dir, dtype="float32", device="cpu", quantization="4bit")
    lm = policy.janus.model.language_model
    q = lm.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.dtype == torch.uint8  # packed NF4 codes
    # SigLIP, VQ and the image head stay unquantized (llm_int8_skip_modules)
    assert not isinstance(policy.janus.model.generation_head.vision_head, bnb.nn.Linear4bit)

    policy.add_lora(r=4, alpha=8)
    batch = policy.sample_images(["red", "a blue image"] * 2, [1, 2, 3, 4], cfg_scale=3.0, decode=False)
    policy.gradient_checkpointing(True)
    policy.model.train()
    base_before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" in n}
    assert lora_before and all(p.requires_grad for n, p in policy.model.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in policy.model.named_parameters() if "lora_" not in n)

    # like with like: sampling (eval, no grad) did not switch the layers to bitsandbytes' bf16-absmax
    # repacked CPU kernel (taken on AVX512-BF16 CPUs only, and without a backward), so the sampler and
    # the learner below run the same fp32 dequantize + matmul on every CPU
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in policy.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    lp = policy.rollout_logprobs(batch, mode="cfg")
    # the sampler's recorded log-probs agree with teacher forcing on the 4-bit model too. Both sides use
    # the same dequantized fp32 weights; only the summation order differs (fused gemm_4bit vs linear).
    # Bound: relative error of an fp32 dot product <= K * 2**-24 ~ 7.6e-6 (K = 128, the widest layer),
    # on logits of magnitude <= ~10, amplified (2s - 1) = 5 times by CFG at s = 3 and twice by
    # log-softmax: 2 * 5 * 10 * 7.6e-6 ~ 7.6e-4 < 1e-3 (measured: ~1e-5).
    assert (lp.detach() - batch.logprobs_cfg).abs().max().item() < 1e-3
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss = -(torch.exp(lp - lp.detach()) * advantages[:, None]).mean()
    loss.backward()
    grads = {n: p.grad for n, p in policy.model.named_parameters() if "lora_" in n}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2).step()

    after = dict(policy.model.named_parameters())
    assert all(torch.equal(after[n].detach(), v) for n, v in base_before.items())  # base frozen
    assert any(not torch.equal(after[n].detach(), v) for n, v in lora_before.items())  # adapter moved
    with torch.no_grad():
        new_lp = policy.rollout_logprobs(batch, mode="cfg")
    assert not torch.allclose(new_lp, lp.detach())  # the update changed the policy


def test_auto_micro_batch_from_free_memory(tiny_dir):
    policy = JanusPolicy.from_pretrained(tiny_dir, dtype="float32")
    per = activation_bytes_per_sample(policy, prompt_len=12, mode="cfg", checkpointing=False)
    per_ckpt = activation_bytes_per_sample(policy, prompt_len=12, mode="cfg", checkpointing=True)
    per_cond = activation_bytes_per_sample(policy, prompt_len=12, mode="conditional", checkpointing=False)
    assert per > per_ckpt > 0 and per_cond < per
    assert auto_micro_batch_size(policy, 16, 12, free_bytes=int(3.5 * per / 0.8), checkpointing=False) == 3
    assert auto_micro_batch_size(policy, 16, 12, free_bytes=10 ** 15) == 16
    assert auto_micro_batch_size(policy, 16, 12, free_bytes=1) == 1
    assert auto_micro_batch_size(policy, 5, 12) == 5  # CPU: no free-memory figure, one micro-batch
    assert micro_batches(5, 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        micro_batches(5, 0)
