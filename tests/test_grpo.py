"""GRPO advantages and loss against independent computations."""
import math

import torch

from uniloop.rl.grpo import aggregate, grpo_advantages, grpo_token_loss


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
