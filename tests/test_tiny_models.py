"""The tiny Janus stands in for a pretrained model: its inputs must be distinguishable, its heads random.

And the pieces of the quickstart's task design that keep every prompt learning: prompts drawn in
shuffled passes (every prompt every step when prompts_per_step == their number) and the contrastive
color reward (no partial credit for the color between two targets).
"""
import itertools
from pathlib import Path

import pytest
import torch

from uniloop.policies.janus import JanusPolicy
from uniloop.policies.sampling import positions_from_mask
from uniloop.policies.tiny import COLORS, build_tiny_janus, solid_color_images
from uniloop.rl.tasks import step_indices
from uniloop.rewards.base import RewardContext
from uniloop.rewards.builtin import ColorAccuracyReward, ColorReward
from uniloop.policies.batches import ImageRollout

FOUR = ["red", "green", "blue", "yellow"]


def max_pairwise_cosine(h: torch.Tensor) -> float:
    cos = torch.nn.functional.cosine_similarity(h[:, None], h[None], dim=-1)
    return max(float(cos[i, j]) for i, j in itertools.combinations(range(len(h)), 2))


@torch.no_grad()
def prompt_states(policy):
    """The hidden state that predicts the first image token, for the four color prompts."""
    ids, mask = policy.encode_generation_prompts([f"a {c} image" for c in FOUR])
    out = policy._lm(inputs_embeds=policy._embed(ids), attention_mask=mask, position_ids=positions_from_mask(mask))
    return out.last_hidden_state[:, -1]


@torch.no_grad()
def question_states(policy):
    """The hidden state that predicts the answer to "What color is this image?" for four solid images."""
    ids, mask, pix = policy.encode_questions(solid_color_images(FOUR, policy.image_size),
                                             ["What color is this image? Answer in one word."] * 4)
    out = policy.janus(input_ids=ids, attention_mask=mask, pixel_values=pix, position_ids=positions_from_mask(mask),
                       output_hidden_states=True)
    return out.hidden_states[-1][:, -1]


@pytest.mark.parametrize("seed", [3, 7])
def test_input_recall_makes_prompts_and_images_distinguishable_and_leaves_the_heads(tmp_path, seed):
    # seeds 3 and 7 are the tiny models whose color prompts were nearly indistinguishable without it
    plain = JanusPolicy.from_pretrained(build_tiny_janus(tmp_path / "plain", seed=seed, vq_fit_steps=0,
                                                         input_recall_steps=0))
    fitted = JanusPolicy.from_pretrained(build_tiny_janus(tmp_path / "fitted", seed=seed, vq_fit_steps=0))
    assert max_pairwise_cosine(prompt_states(plain)) > 0.9
    assert max_pairwise_cosine(prompt_states(fitted)) < 0.6
    assert max_pairwise_cosine(question_states(fitted)) < 0.6
    # only the decoder layers moved: embeddings, heads, vision tower and VQ model are the random ones
    a, b = plain.janus.state_dict(), fitted.janus.state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith("model.language_model.") and ".embed_tokens." not in k for k in moved)


def test_tiny_build_is_deterministic(tmp_path):
    # the same settings give the same weights, bit for bit (a tokenizer's vocabulary dict comes in
    # hash order: the input-recall fit must not depend on it)
    a = build_tiny_janus(tmp_path / "a", seed=1, vq_fit_steps=0)
    b = build_tiny_janus(tmp_path / "b", seed=1, vq_fit_steps=0)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_tasks_draw_prompts_in_shuffled_passes():
    # prompts_per_step == n: every prompt every step, in a varying order
    steps = [step_indices(4, 4, seed=0, step=s, salt=1) for s in range(20)]
    assert all(sorted(s) == [0, 1, 2, 3] for s in steps) and len({tuple(s) for s in steps}) > 1
    # fewer per step: each pass over the items covers every item once
    flat = sum((step_indices(6, 2, seed=1, step=s, salt=2) for s in range(30)), [])
    assert all(sorted(flat[i:i + 6]) == list(range(6)) for i in range(0, 60, 6))
    # (seed, step) alone decide it: a resumed run draws what the original would have
    assert step_indices(6, 4, seed=5, step=11, salt=1) == step_indices(6, 4, seed=5, step=11, salt=1)
    assert step_indices(6, 4, seed=5, step=11, salt=1) != step_indices(6, 4, seed=6, step=11, salt=1)


def solid_batch(prompts, colors):
    images = solid_color_images(colors, 8)
    return ImageRollout(prompts=list(prompts), prompt_ids=torch.zeros(len(prompts), 1, dtype=torch.long),
                        prompt_mask=torch.ones(len(prompts), 1, dtype=torch.long),
                        image_tokens=torch.zeros(len(prompts), 1, dtype=torch.long),
                        logprobs_cfg=torch.zeros(len(prompts), 1), logprobs_cond=torch.zeros(len(prompts), 1),
                        images=images, group_ids=torch.arange(len(prompts)))


def test_contrastive_color_reward_gives_the_color_between_targets_no_credit():
    batch = solid_batch(["a red image", "a green image", "a red image", "a green image"],
                        ["yellow", "yellow", "red", "green"])
    distance = ColorReward().score(batch, RewardContext()).scores
    contrast = ColorReward(contrast_temperature=0.25).score(batch, RewardContext()).scores
    # distance: yellow earns 1 - 1/sqrt(3) = 0.42 for both "red" and "green"
    assert torch.allclose(distance[:2], torch.tensor(1 - 3 ** -0.5), atol=1e-6)
    # contrast: yellow is (nearly) certainly not red and not green; the right color is (nearly) certain
    names = list(COLORS)
    table = torch.tensor([COLORS[n] for n in names])
    expected = torch.softmax(-torch.cdist(table[[names.index("yellow")]], table) / 0.25, -1)[0, names.index("red")]
    assert torch.allclose(contrast[:2], expected, atol=1e-6) and float(expected) < 0.05
    assert (contrast[2:] > 0.9).all()
    # an image half red, half yellow scores the mean of its pixels' probabilities
    half = solid_batch(["a red image"], ["red"])
    half.images[0, :4] = torch.tensor(COLORS["yellow"])
    s = ColorReward(contrast_temperature=0.25).score(half, RewardContext()).scores
    assert torch.allclose(s, (contrast[2] + expected) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="contrast_temperature"):
        ColorReward(contrast_temperature=0.0)
    # color_accuracy (nearest named color) is unchanged by the option
    acc = ColorAccuracyReward().score(batch, RewardContext()).scores
    assert acc.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_a_bad_contrast_temperature_is_one_line_naming_the_key_before_any_model(tmp_path, capsys):
    import yaml

    from uniloop.rl.cli import main
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "quickstart.yaml").read_text())
    cfg["rewards"][0]["args"] = {"contrast_temperature": -1}
    cfg["model"]["tiny_dir"] = str(tmp_path / "never_built")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["train", str(tmp_path / "bad.yaml"), "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml:" in err[0] and "rewards[0].args" in err[0] and "contrast_temperature" in err[0]
    assert not (tmp_path / "never_built").exists()
