"""GRPO advantages and loss against independent computations."""
import math

import pytest
import torch

from uniloop.rl.losses import aggregate, grpo_advantages, grpo_token_loss, rloo_advantages


def test_zero_variance_group_gives_zero_advantages_never_nan():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 3.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, stats = grpo_advantages(r, g)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:4], torch.zeros(4))
    expect = (r[4:] - r[4:].mean()) / (r[4:].std() + 1e-4)
    assert torch.allclose(adv[4:], expect)
    assert stats["advantage/flat_group_fraction"] == 0.5


def test_near_identical_rewards_do_not_give_illusory_advantages():
    r = torch.tensor([0.5, 0.5 + 1e-7, 0.5 - 1e-7, 0.5])
    adv, _ = grpo_advantages(r, torch.zeros(4, dtype=torch.long), std_floor=1e-4)
    assert torch.equal(adv, torch.zeros(4))


def test_invalid_samples_are_excluded_and_get_zero_advantage():
    r = torch.tensor([1.0, float("nan"), 0.0, 5.0])
    valid = torch.tensor([True, False, True, False])
    adv, _ = grpo_advantages(r, torch.zeros(4, dtype=torch.long), valid)
    assert adv[1] == 0 and adv[3] == 0
    assert torch.allclose(adv[[0, 2]], torch.tensor([0.5, -0.5]) / (torch.tensor([1.0, 0.0]).std() + 1e-4))


def test_scale_rewards_variants():
    r = torch.tensor([0.0, 2.0, 10.0, 14.0])
    g = torch.tensor([0, 0, 1, 1])
    none, _ = grpo_advantages(r, g, scale_rewards="none")
    assert torch.allclose(none, torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    batch, _ = grpo_advantages(r, g, scale_rewards="batch")
    assert torch.allclose(batch, none / (r.std() + 1e-4))


def test_loss_matches_independent_ppo_clip_and_k3():
    torch.manual_seed(0)
    logp = torch.randn(3, 5) * 0.1 - 2
    old = logp + torch.randn(3, 5) * 0.3
    ref = logp + torch.randn(3, 5) * 0.2
    adv = torch.tensor([1.0, -0.5, 2.0])
    loss, ratio, kl, clipped = grpo_token_loss(logp, old, adv, ref, epsilon=0.2, epsilon_high=0.28, beta=0.04)
    for i in range(3):
        for t in range(5):
            rho = math.exp(logp[i, t] - old[i, t])
            a = adv[i].item()
            pg = -min(rho * a, min(max(rho, 0.8), 1.28) * a)
            d = (ref[i, t] - logp[i, t]).item()
            expect = pg + 0.04 * (math.exp(d) - d - 1)
            assert abs(loss[i, t].item() - expect) < 1e-5
    assert (kl >= 0).all()


def test_ratio_is_exactly_one_when_old_is_detached_current():
    logp = torch.randn(2, 4, requires_grad=True)
    loss, ratio, _, clipped = grpo_token_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]))
    assert torch.equal(ratio, torch.ones_like(ratio))
    assert clipped.sum() == 0
    loss.sum().backward()
    # d/dlogp of -rho*A at rho=1 is -A: the policy gradient
    assert torch.allclose(logp.grad, torch.tensor([[-1.0] * 4, [1.0] * 4]))


def test_aggregation_modes_accumulate_to_full_batch_values():
    per_tok = torch.arange(12.0).view(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).float()
    full = {lt: aggregate(per_tok, mask, lt, 3, float(mask.sum()), 4) for lt in ("grpo", "bnpo", "dr_grpo")}
    assert torch.isclose(full["grpo"], torch.tensor((0.5 + 5.5 + 8.0) / 3))
    assert torch.isclose(full["bnpo"], torch.tensor((0 + 1 + 4 + 5 + 6 + 7 + 8) / 7.0))
    assert torch.isclose(full["dr_grpo"], torch.tensor(31 / 12.0))
    for lt in full:  # two micro-batches sum to the full-batch value
        parts = aggregate(per_tok[:2], mask[:2], lt, 3, float(mask.sum()), 4) + \
            aggregate(per_tok[2:], mask[2:], lt, 3, float(mask.sum()), 4)
        assert torch.isclose(parts, full[lt])


def test_gspo_sequence_ratio_matches_a_hand_computation():
    """GSPO (importance_sampling_level=sequence): one ratio per sequence, exp of its mean token log-ratio
    over the completion mask, clipped and multiplied by the sequence's advantage (TRL's definition)."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    old = torch.tensor([[-1.2, -1.9, -3.5], [-0.4, -0.7, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    loss, ratio, _, clipped = grpo_token_loss(logp, old, adv, epsilon=0.05, level="sequence", mask=mask)
    s0 = math.exp(((-1.0 + 1.2) + (-2.0 + 1.9) + (-3.0 + 3.5)) / 3)  # = exp(0.2) = 1.2214
    s1 = math.exp(((-0.5 + 0.4) + (-0.5 + 0.7)) / 2)  # the masked third token does not count: exp(0.05)
    assert ratio.shape == (2, 1)
    assert ratio[0, 0].item() == pytest.approx(s0, rel=1e-6) and ratio[1, 0].item() == pytest.approx(s1, rel=1e-6)
    # A > 0 and rho above 1 + eps: the clipped branch wins; A < 0 and rho above 1 + eps: the unclipped one
    want0 = -min(s0 * 1.0, 1.05 * 1.0)
    want1 = -min(s1 * -2.0, min(s1, 1.05) * -2.0)
    assert loss[0, 0].item() == pytest.approx(want0, rel=1e-6) and loss[1, 0].item() == pytest.approx(want1, rel=1e-6)
    # both ratios lie outside [1 - eps, 1 + eps] (clip_fraction counts those, whichever branch wins)
    assert clipped[:, 0].tolist() == [1.0, 1.0]
    # aggregated like any per-token loss (the sequence value broadcast over its tokens)
    total = aggregate(loss.expand(2, 3), mask, "grpo", 2, 5.0, 3)
    assert total.item() == pytest.approx((want0 + want1) / 2, rel=1e-6)


def test_dapo_normalises_by_the_rollout_batchs_tokens_per_optimizer_step():
    """TRL's `dapo`: every token of the generation batch weighs the same, whichever optimizer step it is in:
    token sum / (batch tokens / optimizer steps per batch); `bnpo` divides by the step's own tokens."""
    per_tok = torch.arange(8.0).view(2, 4)
    step1_mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # 3 tokens in optimizer step 1
    # suppose optimizer step 2 of the same rollout batch holds 5 tokens: 8 tokens over 2 steps -> 4 per step
    dapo = aggregate(per_tok, step1_mask, "dapo", 2, 3.0, 4, batch_tokens=8.0, steps_per_batch=2)
    assert dapo.item() == pytest.approx((0 + 1 + 4) / 4.0)
    bnpo = aggregate(per_tok, step1_mask, "bnpo", 2, 3.0, 4, batch_tokens=8.0, steps_per_batch=2)
    assert bnpo.item() == pytest.approx((0 + 1 + 4) / 3.0)
    # with the whole batch in one optimizer step, dapo and bnpo agree
    assert aggregate(per_tok, step1_mask, "dapo", 2, 3.0, 4).item() == pytest.approx(bnpo.item())


def test_rloo_is_the_leave_one_out_baseline():
    r = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    adv, stats = rloo_advantages(r, g)
    assert adv.tolist()[:3] == pytest.approx([1 - 4.0, 2 - 3.5, 6 - 1.5])  # r_i - mean of the others
    assert adv.tolist()[3:] == [0.0, 0.0] and stats["advantage/flat_group_fraction"] == 0.5


def test_a_registered_aggregation_is_a_valid_config_value(tmp_path):
    from uniloop.rl.config import ConfigError, load_config
    from uniloop.rl.losses import LOSS_AGGREGATIONS, register_loss_aggregation

    p = tmp_path / "c.yaml"
    p.write_text("grpo:\n  loss_type: test_sum\n")
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(p)

    @register_loss_aggregation("test_sum")
    def token_sum(per_token, mask, norm):
        return (per_token * mask).sum()

    try:
        assert load_config(p).grpo.loss_type == "test_sum"
        assert aggregate(torch.ones(2, 3), torch.ones(2, 3), "test_sum", 2, 6.0, 3).item() == 6.0
    finally:
        LOSS_AGGREGATIONS.pop("test_sum")
