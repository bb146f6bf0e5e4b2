"""The contract every registered policy family passes: the bar for a new one (README "Bring your own
unified model"). Each test runs on every family of the registry that has a tiny model; checks that need
token log-probs (image tokens, answers) skip the flow-matching family, whose transitions have their own
tests (tests/test_flow.py).

Tolerances: float32; a KV-cached decode step and one full teacher-forced forward sum in different
orders, so logits differ by ~eps32 x the residual magnitude per layer, amplified by (1 + 2s) under CFG
scale s: measured <= ~5e-5 here; 5e-4 leaves room, while a wrong position or distribution is off by O(0.1).
"""
import dataclasses

import pytest
import torch
from conftest import perturb_adapter

from uniloop.policies.batches import ImageRollout, TextRollout
from uniloop.policies.registry import LoraSpec, PolicySpec, build_policy, policy_families
from uniloop.policies.tiny import solid_color_images

TOL = 5e-4
FAMILIES = sorted(name for name, fam in policy_families().items() if fam.tiny is not None)
TOKEN_FAMILIES = [f for f in FAMILIES if "text" in policy_families()[f].cls.modalities]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_sd3_dir):
    """One tiny checkpoint per family, built through the registry's tiny rule (sd3: the session fixture)."""
    root = tmp_path_factory.mktemp("contract")
    out = {}
    for name in FAMILIES:
        if name == "sd3":
            out[name] = str(tiny_sd3_dir)
        else:
            out[name] = str(policy_families()[name].tiny(root / name, seed=0))
    return out


def spec(family, tiny_dirs, lora=True):
    load = {"max_sequence_length": 8} if family == "sd3" else {}
    return PolicySpec(family, tiny_dirs[family], load=load, lora=LoraSpec(r=4, alpha=8) if lora else None)


def perturbed(family, tiny_dirs, seed=0):
    policy = build_policy(spec(family, tiny_dirs))
    perturb_adapter(policy, scale=0.1, seed=seed)
    return policy


def sample(policy, seeds, prompts=None):
    prompts = prompts or ["a red image", "a blue image of a photo", "a green image"][:len(seeds)]
    if isinstance(policy.modalities, tuple) and "text" in policy.modalities:
        return policy.sample_images(prompts, seeds, cfg_scale=3.0, temperature=1.0)
    return policy.sample_images(prompts, seeds, num_steps=3, cfg_scale=1.0, noise_level=0.7)


def first_output(policy, batch):
    """A number per sample that depends on every weight: token log-probs, or the first transition's."""
    with torch.no_grad():
        if isinstance(batch, (ImageRollout, TextRollout)):
            return policy.rollout_logprobs(batch, "cfg").float().cpu()
        return policy.transition_logprobs(batch, 0)[0].float().cpu()


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
def test_sampled_logprobs_equal_teacher_forcing(family, tiny_dirs, one_torch_thread):
    policy = perturbed(family, tiny_dirs)
    batch = sample(policy, [1, 2, 3])
    for mode in ("cfg", "conditional"):
        with torch.no_grad():
            forced = policy.rollout_logprobs(batch, mode).cpu()
        assert (forced - batch.logprobs(mode)).abs().max() < TOL, mode
    images = solid_color_images(["red", "blue"], policy.image_size)
    answers = policy.answer(images, ["What color is this image?"] * 2, [4, 5], max_new_tokens=3)
    with torch.no_grad():
        forced = policy.text_logprobs(answers).cpu()
    assert ((forced - answers.logprobs_sampled) * answers.answer_mask).abs().max() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_seeds_reproduce_independently_of_the_batch(family, tiny_dirs, one_torch_thread):
    policy = perturbed(family, tiny_dirs)
    together = sample(policy, [7, 8, 9])
    alone = sample(policy, [8], prompts=[together.prompts[1]])
    assert torch.allclose(together.images[1], alone.images[0], atol=1e-5)
    again = sample(policy, [7, 8, 9])
    assert torch.equal(together.images, again.images)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_the_base_model_and_the_adapter_round_trips(family, tiny_dirs, tmp_path, one_torch_thread):
    policy = perturbed(family, tiny_dirs)
    batch = sample(policy, [1, 2])
    with policy.reference():
        ref = first_output(policy, batch)
    base = build_policy(spec(family, tiny_dirs, lora=False))
    assert (ref - first_output(base, batch)).abs().max() < 1e-5, "reference() must be the base model"
    assert (first_output(policy, batch) - ref).abs().max() > 1e-3, "the test adapter must change the outputs"
    policy.save_adapter(tmp_path / "adapter")
    loaded = build_policy(dataclasses.replace(spec(family, tiny_dirs), lora=LoraSpec(init_adapter=str(tmp_path / "adapter"))))
    assert torch.equal(first_output(loaded, batch), first_output(policy, batch))
    fresh = build_policy(spec(family, tiny_dirs))
    fresh.set_adapter_state_dict(policy.adapter_state_dict(), version=5)
    assert fresh.version == 5 and torch.equal(first_output(fresh, batch), first_output(policy, batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_an_optimizer_step_moves_the_adapter_only(family, tiny_dirs, one_torch_thread):
    policy = perturbed(family, tiny_dirs)
    batch = sample(policy, [1, 2])
    named = dict(policy.model.named_parameters())
    frozen = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "only adapter tensors train"
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    if isinstance(batch, ImageRollout):
        loss = policy.rollout_logprobs(batch, "cfg").sum()
    else:
        loss = policy.transition_logprobs(batch, 0)[0].sum()
    loss.backward()
    opt.step()
    assert all(torch.equal(p, named[n]) for n, p in frozen.items()), "base weights stay frozen"
    assert any(not torch.equal(p, named[n]) for n, p in trainable.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_batches_select_and_concat_row_wise(family, tiny_dirs, one_torch_thread):
    policy = perturbed(family, tiny_dirs)
    batch = sample(policy, [1, 2, 3])
    parts = [batch.select([0]), batch.select([1, 2])]
    merged = type(batch).concat(parts)
    assert len(merged) == 3 and torch.equal(merged.images, batch.images)
    assert torch.equal(first_output(policy, merged), first_output(policy, batch))


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
def test_first_grpo_step_has_ratio_exactly_one(family, tiny_dirs, tmp_path, one_torch_thread):
    """Through the real trainer: the family plugs into GRPO unchanged."""
    from uniloop.rl.config import load_config
    from uniloop.rl.grpo import GRPOTrainer

    cfg = load_config(None, [f"model.name_or_path={tiny_dirs[family]}", f"model.family={family}",
                             f"output_dir={tmp_path / 'run'}", "rollout.num_generations=4", "rollout.cfg_scale=3.0",
                             "image_task.prompts=[a red image, a blue image]", "image_task.prompts_per_step=2",
                             "text_task.synthetic_colors=[red, blue]", "text_task.prompts_per_step=2",
                             "rollout.max_new_tokens=2", "rewards=[{name: color}, {name: exact_match}]",
                             "grpo.max_steps=1", "logging.tensorboard=false"])
    metrics, _ = GRPOTrainer(cfg).train_step()
    assert metrics["ratio/first_step_max_abs_dev"] == 0.0
    assert metrics["logprob/sampler_vs_learner_max_abs_diff"] < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_save_merged_is_a_plain_checkpoint_with_the_adapters_outputs(family, tiny_dirs, tmp_path, one_torch_thread):
    """`uniloop export`'s merge: the saved directory has no LoRA tensors and loads back (from_pretrained of
    the family, no adapter) with the outputs of policy + adapter: the same images to 1e-5 (flow), the same
    guided token log-probs to 1e-5 times 2s + 1 (CFG s = 3 scales each branch's float32 rounding)."""
    from safetensors import safe_open

    policy = perturbed(family, tiny_dirs)
    batch = sample(policy, [1, 2])
    want = first_output(policy, batch)
    with policy.reference():
        assert (first_output(policy, batch) - want).abs().max() > 1e-3, "the test adapter must change the outputs"
    policy.save_merged(tmp_path / "merged")
    for f in (tmp_path / "merged").rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            assert not [k for k in st.keys() if "lora" in k.lower()], f
    load = {"max_sequence_length": 8} if family == "sd3" else {}
    plain = policy_families()[family].cls.from_pretrained(tmp_path / "merged", **load)
    assert not plain.has_adapter
    if isinstance(batch, (ImageRollout, TextRollout)):
        assert (first_output(plain, batch) - want).abs().max() <= 1e-5 * 7
    else:  # a transition log-prob sums thousands of latent terms: compare what it samples instead
        assert (sample(plain, [1, 2]).images - batch.images).abs().max() <= 1e-5
