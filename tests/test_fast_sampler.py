"""The fast image sampler's contract, checked on CPU (no CUDA graphs here; the GPU checks, graphs
included, live in benchmarks/rollout_speed.py, which asserts token equality on the device).

On the CPU the fast path runs its static-cache decode step eagerly: the same code that is captured
as a CUDA graph on a GPU. It must give bit-identical tokens and log-probs to the plain sampler
(transformers' decode with a DynamicCache), in float32 and bfloat16, with and without prompt
padding, greedy and seeded, with and without CFG / top-k, under an active LoRA adapter and under
the adapter-disabled reference.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from uniloop.policies.fast_sampler import FastImageSampler, choose_sampler, fast_sampler_for
from uniloop.policies.janus import JanusPolicy
from uniloop.policies.tiny import build_tiny_janus

PADDED = ["red", "a picture of the color green with blue"]  # different lengths -> left padding + mask
UNPADDED = ["red", "blue", "green"]  # one word each: no padding, transformers drops the mask


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # 36 image tokens (image_size 48 / patch 8): long enough for any drift to show, still fast.
    return build_tiny_janus(tmp_path_factory.mktemp("fast") / "tiny", seed=1, image_size=48, vq_fit_steps=0)


@pytest.fixture(scope="module")
def policies(tiny_dir):
    torch.manual_seed(0)
    return {d: JanusPolicy.from_pretrained(tiny_dir, dtype=d) for d in ("float32", "bfloat16")}


def both(policy, **kw):
    plain = policy.sample_images(decode=False, sampler="plain", **kw)
    fast = policy.sample_images(decode=False, sampler="fast", **kw)
    return plain, fast


def assert_identical(plain, fast):
    assert torch.equal(plain.image_tokens, fast.image_tokens)
    assert torch.equal(plain.logprobs_cfg, fast.logprobs_cfg)
    assert torch.equal(plain.logprobs_cond, fast.logprobs_cond)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("prompts", [PADDED, UNPADDED], ids=["padded", "unpadded"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_fast_sampler_bit_identical_to_plain(policies, dtype, prompts, temperature):
    policy = policies[dtype]
    seeds = list(range(11, 11 + len(prompts)))
    plain, fast = both(policy, prompts=prompts, seeds=seeds, cfg_scale=5.0, temperature=temperature)
    assert_identical(plain, fast)
    assert plain.image_tokens.shape == (len(prompts), 36)
    if temperature > 0 and dtype == "float32":  # seeded sampling really samples: another seed gives other tokens
        other = policy.sample_images(prompts, [s + 100 for s in seeds], temperature=1.0, decode=False,
                                     sampler="fast")
        assert not torch.equal(other.image_tokens, fast.image_tokens)


@pytest.mark.parametrize("cfg_scale,top_k,temperature", [(1.0, 0, 1.0), (3.0, 5, 0.7), (1.0, 8, 0.0)])
def test_fast_sampler_without_cfg_and_with_top_k(policies, cfg_scale, top_k, temperature):
    plain, fast = both(policies["float32"], prompts=PADDED, seeds=[5, 6], cfg_scale=cfg_scale,
                       temperature=temperature, top_k=top_k)
    assert_identical(plain, fast)


def test_fast_sampler_static_cache_is_reused_across_calls(policies):
    """One workspace serves calls with other prompt lengths; a new batch size reallocates it."""
    policy = policies["float32"]
    sampler = fast_sampler_for(policy)
    for prompts in (PADDED, ["green", "a red one"], ["blue"] * 2):
        plain, fast = both(policy, prompts=prompts, seeds=[1, 2], temperature=1.0)
        assert_identical(plain, fast)
    ws = sampler.ws
    assert ws.batch == 2 and ws.capacity >= 36
    plain, fast = both(policy, prompts=UNPADDED, seeds=[1, 2, 3], temperature=1.0)
    assert_identical(plain, fast)
    assert sampler.ws is not ws and sampler.ws.batch == 3
    assert sampler.stats["eager_steps"] > 0 and sampler.stats["captures"] == 0  # CPU: no graphs


def test_fast_sampler_applies_lora_and_reference(tiny_dir):
    policy = JanusPolicy.from_pretrained(tiny_dir, dtype="float32").add_lora(r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B != 0 so it changes the model
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    kw = dict(prompts=PADDED, seeds=[7, 8], cfg_scale=5.0, temperature=0.0)
    plain, fast = both(policy, **kw)
    assert_identical(plain, fast)
    sampler = fast_sampler_for(policy)
    sig_on = sampler._weights_signature()
    with policy.reference():
        assert sampler._weights_signature() != sig_on  # graphs would be re-captured
        ref_plain, ref_fast = both(policy, **kw)
    assert_identical(ref_plain, ref_fast)
    # the adapter really acted in the fast path (disabled -> other log-probs)
    assert not torch.equal(ref_fast.logprobs_cfg, fast.logprobs_cfg)
    # adapter weights updated in place (as set_adapter_state_dict does): the sampler sees them
    policy.set_adapter_state_dict({k: torch.zeros_like(v) for k, v in policy.adapter_state_dict().items()})
    zeroed_plain, zeroed_fast = both(policy, **kw)
    assert_identical(zeroed_plain, zeroed_fast)
    assert torch.equal(zeroed_fast.image_tokens, ref_fast.image_tokens)


def test_recorded_logprobs_match_teacher_forcing(policies):
    policy = policies["float32"]
    batch = policy.sample_images(PADDED, [3, 4], cfg_scale=5.0, temperature=1.0, decode=False, sampler="fast")
    with torch.no_grad():
        for mode in ("cfg", "conditional"):
            tf = policy.rollout_logprobs(batch, mode=mode)
            assert (tf - batch.logprobs(mode)).abs().max().item() < 1e-4


def test_sampler_selection():
    assert choose_sampler("auto", "cpu") == "plain"
    assert choose_sampler("auto", "cuda:0") == "fast"
    assert choose_sampler("plain", "cuda") == "plain"
    assert choose_sampler("fast", "cpu") == "fast"
    with pytest.raises(ValueError, match="sampler must be one of"):
        choose_sampler("turbo", "cpu")


def test_bad_sampler_name_is_rejected(policies):
    with pytest.raises(ValueError, match="sampler must be one of"):
        policies["float32"].sample_images(["red"], [1], sampler="turbo", decode=False)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA policy"):
        FastImageSampler(policies["float32"], use_graphs=True)


def test_bucketed_attention_matches_plain_in_float32(policies):
    """The GPU graphs' layout (attention over a bucketed length, unfilled tail masked) run eagerly:
    same tokens as the plain sampler in float32, log-probs equal to float32 rounding."""
    policy = policies["float32"]
    ids, mask = policy.encode_generation_prompts(PADDED)
    plain = policy.sample_images(PADDED, [5, 6], temperature=1.0, decode=False, sampler="plain")
    for bucket in (8, 64):
        sampler = FastImageSampler(policy, use_graphs=False, bucket=bucket)
        tokens, lp_cfg, lp_cond, _ = sampler.sample(ids, mask, [5, 6], 5.0, 1.0, 0)
        assert sampler.ws.capacity % bucket == 0
        assert torch.equal(tokens, plain.image_tokens)
        assert (lp_cfg - plain.logprobs_cfg).abs().max().item() < 1e-4
        assert (lp_cond - plain.logprobs_cond).abs().max().item() < 1e-4
