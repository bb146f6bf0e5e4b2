"""Sampler/learner log-prob mismatch: truncated importance sampling (TRL's vllm_importance_sampling_*),
the per-step gap metrics, one-step-off semantics, and bf16 log-probs on a Janus-Pro-1B-wide model."""
import math

import pytest
import torch

from uniloop.rl.config import load_config
from uniloop.rl.config_loader import ConfigError
from uniloop.rl.grpo import GRPOTrainer
from uniloop.rl.losses import grpo_token_loss, k3_kl, sampler_is_weights


def test_weights_of_each_mode_follow_trls_definitions():
    old = torch.tensor([[0.0, -1.0, -2.0, -3.0], [-0.5, -0.5, -0.5, -0.5]])
    d = torch.tensor([[math.log(10.0), 0.1, -0.2, 5.0], [0.3, -0.1, 0.2, 0.0]])  # old - sampler
    sampler = old - d
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # the 5.0 token is padding
    r = torch.exp(d * mask)  # masked tokens: log-ratio 0
    w = sampler_is_weights("token_truncate", old, sampler, mask, None, 3.0)
    torch.testing.assert_close(w, r.clamp(max=3.0), rtol=1e-6, atol=0)
    assert w[0, 0] == 3.0 and w[0, 3] == 1.0  # capped; padding untouched
    w = sampler_is_weights("token_truncate", old, sampler, mask, 0.95, 3.0)
    torch.testing.assert_close(w, r.clamp(0.95, 3.0), rtol=1e-6, atol=0)
    w = sampler_is_weights("token_mask", old, sampler, mask, 0.9, 3.0)
    torch.testing.assert_close(w, torch.where((r < 0.9) | (r > 3.0), 0.0, r), rtol=1e-6, atol=0)
    assert w[0, 0] == 0.0 and w[0, 2] == 0.0  # 10 > 3 and exp(-0.2) = 0.82 < 0.9 are dropped
    seq = torch.exp((d * mask).sum(-1, keepdim=True))  # (B, 1): exp(log 10 - 0.1) = 9.05 and exp(0.4)
    torch.testing.assert_close(sampler_is_weights("sequence_truncate", old, sampler, mask, None, 3.0),
                               seq.clamp(max=3.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(sampler_is_weights("sequence_mask", old, sampler, mask, None, 3.0),
                               torch.tensor([[0.0], [math.exp(0.4)]]), rtol=1e-6, atol=0)


def test_the_weight_multiplies_the_policy_term_not_the_kl():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(3, 5, generator=g) * 3, -torch.rand(3, 5, generator=g) * 3
    old = logp + 0.3 * torch.randn(3, 5, generator=g)
    adv, w = torch.randn(3, generator=g), torch.rand(3, 5, generator=g) * 2
    plain, *_ = grpo_token_loss(logp, old, adv, None, 0.2)
    weighted, _, kl, _ = grpo_token_loss(logp, old, adv, ref, 0.2, beta=0.1, is_weights=w)
    torch.testing.assert_close(weighted, plain * w + 0.1 * k3_kl(logp, ref), rtol=1e-6, atol=1e-7)


def image_only_cfg(tiny_janus_dir, out, *extra):
    return load_config(overrides=list(extra), text=f"""
output_dir: {out}
algorithm: grpo
seed: 0
model: {{name_or_path: {tiny_janus_dir}, dtype: float32, device: cpu}}
lora: {{r: 4, alpha: 8}}
rollout: {{num_generations: 4, cfg_scale: 1.0}}
grpo: {{learning_rate: 2.0e-2, beta: 0.0, per_device_train_batch_size: 64, max_steps: 3}}
image_task: {{prompts: [a red image, a blue image], prompts_per_step: 2}}
rewards: [{{name: color}}]
logging: {{progress_bar: false, tensorboard: false, image_grid_every: 0, save_every: 0, log_every: 1}}
""")


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate"])
def test_trainer_weights_each_token_by_the_capped_learner_sampler_ratio(tmp_path, tiny_janus_dir, mode):
    tr = GRPOTrainer(image_only_cfg(tiny_janus_dir, tmp_path / "run", f"grpo.vllm_importance_sampling_mode={mode}"))
    _, (sb,) = tr.train_step()
    assert sb.valid.any() and sb.advantages.abs().max() > 0
    sb.batch.version = tr.policy.version  # sampled with the current weights ...
    with torch.no_grad():
        learner = tr.policy.rollout_logprobs(sb.batch, "cfg").cpu()
    shift = torch.full_like(learner, 0.05)  # ... by a sampler whose log-probs are off by known amounts
    shift[:, 0], shift[:, 1] = math.log(10.0), -0.1
    sb.batch.logprobs_cfg = learner - shift
    m = tr.update([sb])
    ratio = torch.exp(shift)
    w = {"token_truncate": ratio.clamp(max=3.0), "token_mask": ratio.masked_fill(ratio > 3.0, 0.0),
         "sequence_truncate": torch.exp(shift.sum(-1, keepdim=True)).clamp(max=3.0).expand_as(shift)}[mode]
    valid = sb.valid.float()
    # first pass, old = the learner's own log-probs: rho = 1, so the per-token loss is -A * w (grpo aggregation)
    expected = -(sb.advantages * w.mean(-1) * valid).sum() / valid.sum()
    assert m["ratio/first_step_max_abs_dev"] == 0.0
    assert m["loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    assert m["sampling/sampler_ratio/max"] == pytest.approx(10.0, rel=1e-5)
    assert m["sampling/sampler_ratio/min"] == pytest.approx(math.exp(-0.1), rel=1e-5)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(math.log(10.0), rel=1e-5)
    mean_gap = (shift.abs() * valid[:, None]).sum() / (valid.sum() * shift.shape[1])
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(float(mean_gap), rel=1e-4)
    assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(float(w[sb.valid].max()), rel=1e-5)


def test_one_step_off_batches_take_the_ratio_against_the_learner_and_the_lag_into_the_weight(
        tmp_path, tiny_janus_dir):
    tr = GRPOTrainer(image_only_cfg(tiny_janus_dir, tmp_path / "run"))
    _, (sb,) = tr.train_step()
    assert sb.batch.version == tr.policy.version - 1  # now one adapter version behind, as one-step-off
    with torch.no_grad():
        learner = tr.policy.rollout_logprobs(sb.batch, "cfg").cpu()
    lag = (learner - sb.batch.logprobs_cfg)[sb.valid]
    assert lag.abs().max() > 1e-3  # the update moved the policy
    m = tr.update([sb])
    assert sb.old_logprobs is None and m["ratio/first_step_max_abs_dev"] == 0.0
    assert m["sampling/sampler_ratio/max"] == pytest.approx(math.exp(float(lag.max())), rel=1e-5)
    assert m["sampling/sampler_ratio/min"] == pytest.approx(math.exp(float(lag.min())), rel=1e-5)
    assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(min(3.0, math.exp(float(lag.max()))), rel=1e-5)
    # without the correction the ratio's denominator is what the sampler recorded (rho != 1)
    tr.opt.vllm_importance_sampling_correction = False
    m = tr.update([sb])
    assert torch.equal(sb.old_logprobs, sb.batch.logprobs("cfg")) and m["ratio/first_step_max_abs_dev"] > 1e-3


def test_clip_bounds_are_checked_at_load(tiny_janus_dir, tmp_path):
    with pytest.raises(ConfigError, match="vllm_importance_sampling_clip_min"):
        image_only_cfg(tiny_janus_dir, tmp_path / "x", "grpo.vllm_importance_sampling_clip_min=4",
                       "grpo.vllm_importance_sampling_clip_max=3")
    with pytest.raises(ConfigError, match="vllm_importance_sampling_mode"):
        image_only_cfg(tiny_janus_dir, tmp_path / "y", "grpo.vllm_importance_sampling_mode=tokens")


# ----------------------------------------------------------------------------- bf16 at real width
@pytest.fixture(scope="module")
def janus_1b_wide(tmp_path_factory):
    """Janus-Pro-1B's language-model width (hidden 2048, 16 heads, MLP 5632) and generation head
    (16384 codes), 2 layers, random weights, bf16; small text vocabulary, 16 image tokens."""
    from uniloop.policies.tiny import build_janus_shaped
    return build_janus_shaped(tmp_path_factory.mktemp("models") / "janus_1b_2l", vocab_size=1024, image_tokens=16)


def test_bf16_sampled_logprobs_equal_teacher_forcing_at_1b_width(janus_1b_wide):
    """The bound: |log pi_learner - log pi_sampler| <= 0.02, i.e. the first-step ratio in [0.98, 1.02].
    Why it holds: on the CPU a bf16 model loads with eager attention, which computes each query row
    with the same operations whatever the number of rows (decode: 1 row, teacher forcing: all), and
    the head, CFG mixing and log-softmax run in float32 in both; what remains is the two log-softmax
    implementations' float32 rounding (~1e-6 of the ~10-nat log-probs). With SDPA the same model
    gives 0.106 (cfg) / 0.016 (conditional) on 64 tokens: benchmarks/bf16_logprob_gap.py."""
    from uniloop.policies.janus import JanusPolicy

    policy = JanusPolicy.from_pretrained(janus_1b_wide, dtype="bfloat16")
    assert policy.janus.model.language_model.config._attn_implementation == "eager"
    prompts, seeds = ["a red image", "a picture of a green and blue photo"], [3, 4]
    r = policy.sample_images(prompts, seeds, cfg_scale=5.0, decode=False, sampler="plain")
    assert r.image_tokens.unique().numel() > 8  # a spread distribution (16384 codes), not a collapsed one
    with torch.no_grad():
        for mode in ("cfg", "conditional"):
            tf = policy.image_logprobs(r.prompt_ids, r.prompt_mask, r.image_tokens, mode=mode, cfg_scale=5.0).float()
            gap = (tf - r.logprobs(mode)).abs().max().item()
            assert gap <= 0.02, (mode, gap)
            w = sampler_is_weights("token_truncate", tf, r.logprobs(mode), torch.ones_like(tf), None, None)
            assert 0.98 <= w.min().item() and w.max().item() <= 1.02, mode
