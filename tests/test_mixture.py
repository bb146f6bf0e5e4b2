"""Reward mixtures: weights, per-component normalisation, clipping, combine modes."""
import pytest
import torch

from uniloop.policies.batches import ImageRollout
from uniloop.rewards.base import Reward, RewardContext, RewardMixture, RewardOutput, RewardSpec, group_zscore


class Fixed(Reward):
    modalities = ("image",)

    def __init__(self, values):
        self.values = torch.tensor(values, dtype=torch.float32)

    def score(self, batch, context):
        return RewardOutput.from_scores(self.values)


def batch(n=4, groups=(0, 0, 1, 1)):
    z = torch.zeros(n, 1)
    return ImageRollout(prompts=["a red image"] * n, prompt_ids=z.long(), prompt_mask=z.long(), image_tokens=z.long(),
                        logprobs_cfg=z, logprobs_cond=z, images=torch.zeros(n, 2, 2, 3),
                        group_ids=torch.tensor(groups))


def test_weighted_sum_and_invalid_exclusion():
    mix = RewardMixture([RewardSpec("a", 2.0, Fixed([1, 2, 3, float("nan")])), RewardSpec("b", 0.5, Fixed([4, 4, 4, 4]))])
    out = mix(batch(), RewardContext())
    assert torch.allclose(out.total[:3], torch.tensor([4.0, 6.0, 8.0]))
    assert out.valid.tolist() == [True, True, True, False]
    assert out.components["a"].valid.tolist() == [True, True, True, False]


def test_group_normalisation_and_clipping():
    a = [0.0, 10.0, 5.0, 5.0]
    mix = RewardMixture([RewardSpec("a", 1.0, Fixed(a), normalize="group", clip=(-0.5, 0.5))])
    out = mix(batch(), RewardContext())
    z = group_zscore(torch.tensor(a), torch.ones(4, dtype=torch.bool), torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(z, torch.tensor([-0.7071, 0.7071, 0.0, 0.0]), atol=1e-4)
    assert torch.allclose(out.total, torch.tensor([-0.5, 0.5, 0.0, 0.0]))


def test_normalize_then_sum_equalises_scales():
    big, small = [0.0, 100.0, 0.0, 100.0], [1.0, 0.0, 1.0, 0.0]
    raw = RewardMixture([RewardSpec("big", 1.0, Fixed(big)), RewardSpec("small", 1.0, Fixed(small))])
    norm = RewardMixture([RewardSpec("big", 1.0, Fixed(big)), RewardSpec("small", 1.0, Fixed(small))],
                         combine="normalize_then_sum")
    assert raw(batch(), RewardContext()).total[1] > 90  # the 0-100 component dominates
    assert torch.allclose(norm(batch(), RewardContext()).total, torch.zeros(4), atol=1e-5)  # they cancel


def test_running_normalisation_uses_all_scores_so_far():
    mix = RewardMixture([RewardSpec("a", 1.0, Fixed([1.0, 3.0, 1.0, 3.0]), normalize="running")])
    out1 = mix(batch(), RewardContext())
    assert torch.allclose(out1.total, (torch.tensor([1.0, 3.0, 1.0, 3.0]) - 2) / torch.tensor([1.0, 3.0, 1.0, 3.0]).std())
    stats = mix.running["a"]
    mix(batch(), RewardContext())
    assert stats.n == 8 and stats.mean == pytest.approx(2.0)


def test_bad_mixture_settings_are_rejected():
    with pytest.raises(ValueError, match="normalize must be one of"):
        RewardMixture([RewardSpec("a", 1.0, Fixed([1.0]), normalize="zscore")])
    with pytest.raises(ValueError, match="clip must be"):
        RewardMixture([RewardSpec("a", 1.0, Fixed([1.0]), clip=(1.0, -1.0))])
    with pytest.raises(ValueError, match="combine mode"):
        RewardMixture([RewardSpec("a", 1.0, Fixed([1.0]))], combine="avg")
