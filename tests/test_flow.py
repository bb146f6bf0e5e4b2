"""Flow-matching policies: SDE log-probs, Flow-GRPO, Diffusion-DPO, adapters, the modular judge.

Everything runs on a tiny real StableDiffusion3Pipeline (SD3Transformer2DModel, AutoencoderKL, two
CLIP text encoders) written with save_pretrained and loaded back with from_pretrained.
"""
import math

import pytest
import torch

from uniloop.policies.flow import FlowPolicy, FlowRollout, sde_step
from uniloop.policies.tiny import solid_color_images
from uniloop.rl.config import load_config

PROMPTS = ["a red image", "a blue image"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Toy-sized tensors: intra-op threads only add synchronisation (and oversubscribe a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_policy(path, lora=True):
    policy = FlowPolicy.from_pretrained(path, max_sequence_length=8)
    if lora:
        policy.add_lora(r=4, alpha=8)
    return policy


def perturb(policy, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def flow_config(tmp_path, path, extra=""):
    return load_config(text=f"""
output_dir: {tmp_path / 'run'}
algorithm: flow_grpo
flow: {{name_or_path: {path}, max_sequence_length: 8, num_steps: 4, cfg_scale: 2.0, noise_level: 0.7}}
lora: {{r: 4, alpha: 8}}
rollout: {{num_generations: 4}}
grpo: {{learning_rate: 1.0e-2, beta: 0.04, epsilon: 0.2, per_device_train_batch_size: 64, max_steps: 2}}
image_task: {{prompts: [a red image, a blue image], prompts_per_step: 2}}
rewards: [{{name: color}}]
logging: {{progress_bar: false, tensorboard: false, image_grid_every: 0, save_every: 0}}
{extra}""")


# ----------------------------------------------------------------------------- the tiny pipeline
def test_tiny_pipeline_is_a_real_sd3_pipeline_with_a_color_latent_space(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    assert (tiny_sd3_dir / "model_index.json").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    out = pipe("a red image", num_inference_steps=2, guidance_scale=1.0, output_type="pt", max_sequence_length=8,
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 8, 8) and torch.isfinite(out).all()
    # the fitted VAE keeps colors: decode(encode(image)) ~ image
    policy = load_policy(tiny_sd3_dir, lora=False)
    imgs = solid_color_images(["red", "green", "blue", "yellow"], policy.image_size)
    rec = policy.decode(policy.encode_images(imgs))
    assert (rec - imgs).abs().mean() < 0.08


# ----------------------------------------------------------------------------- SDE log-probs
def test_sde_step_logprob_is_the_gaussian_density():
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t, t_next, cap = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.9, 0.4, 0.0]), torch.full((3,), 0.9)
    x_next, logp, mean, std = sde_step(v, x, t, t_next, 0.7, cap, noise=noise)
    sigma = 0.7 * torch.sqrt(torch.tensor([1.0 / (1 - 0.9), 0.6 / 0.4, 0.3 / 0.7]))
    dt = (t_next - t).view(-1, 1, 1, 1)
    tb, sb = t.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    expected_mean = x * (1 + sb ** 2 / (2 * tb) * dt) + v * (1 + sb ** 2 * (1 - tb) / (2 * tb)) * dt
    assert torch.allclose(mean, expected_mean, atol=1e-5)
    assert torch.allclose(std, sigma * torch.sqrt(-(t_next - t)), atol=1e-6)
    normal = torch.distributions.Normal(expected_mean, (sigma * torch.sqrt(t - t_next)).view(-1, 1, 1, 1))
    assert torch.allclose(logp, normal.log_prob(x_next).mean(dim=(1, 2, 3)), atol=1e-5)


def test_sampled_transition_logprobs_equal_their_recomputation(tiny_sd3_dir):
    policy = load_policy(tiny_sd3_dir)
    perturb(policy)
    batch = policy.sample_images(PROMPTS * 2, [11, 12, 13, 14], num_steps=4, cfg_scale=3.0, noise_level=0.7,
                                 group_ids=[0, 1, 0, 1], targets=["red", "blue"] * 2)
    assert isinstance(batch, FlowRollout) and batch.kind == "image" and len(batch) == 4
    assert batch.latents.shape[:2] == (4, 5) and batch.logprobs.shape == (4, 4)
    assert batch.images.shape == (4, 8, 8, 3) and 0 <= batch.images.min() and batch.images.max() <= 1
    with torch.no_grad():
        for k in range(4):
            logp, _, _ = policy.transition_logprobs(batch, k)
            assert torch.allclose(logp, batch.logprobs[:, k], atol=1e-4), k
        # one transition per row, in a different micro-batch
        rows = batch.select([3, 1])
        logp, _, _ = policy.transition_logprobs(rows, torch.tensor([2, 0]))
        assert torch.allclose(logp, torch.stack([batch.logprobs[3, 2], batch.logprobs[1, 0]]), atol=1e-4)
    # same seeds -> same samples, whatever the batching
    again = policy.sample_images(PROMPTS * 2, [11, 12, 13, 14], num_steps=4, cfg_scale=3.0, batch_size=1)
    assert torch.allclose(again.latents, batch.latents, atol=1e-5)
    # the adapter matters: the reference gives other log-probs for the same transitions
    with torch.no_grad(), policy.reference():
        ref, _, _ = policy.transition_logprobs(batch, 1)
    assert (ref - batch.logprobs[:, 1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- Flow-GRPO
def test_flow_grpo_loss_clips_ratio_and_advantages():
    from uniloop.rl.flow_grpo import flow_grpo_loss

    logp = torch.tensor([0.0, 0.5, -0.5, 0.1])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 2.0, -8.0, -1.0])
    kl = torch.tensor([0.0, 1.0, 2.0, 3.0])
    loss, ratio, clipped = flow_grpo_loss(logp, old, adv, epsilon=0.2, adv_clip_max=5.0, kl=kl, beta=0.1)
    a = adv.clamp(-5, 5)
    r = logp.exp()
    expected = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2)) + 0.1 * kl
    assert torch.allclose(loss, expected)
    assert clipped.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_flow_grpo_first_ratio_is_one_kl_zero_then_the_adapter_moves(tmp_path, tiny_sd3_dir):
    from uniloop.rl.flow_grpo import FlowGRPOTrainer

    trainer = FlowGRPOTrainer(flow_config(tmp_path, tiny_sd3_dir))
    base = {k: v.clone() for k, v in trainer.policy.transformer.state_dict().items() if "lora" not in k}
    lora0 = trainer.policy.adapter_state_dict()
    m1, scored = trainer.train_step()
    assert scored[0].batch.version == 0 and m1["adapter/version"] == 1
    assert m1["ratio/first_step_max_abs_dev"] < 1e-4  # recorded log-probs == the learner's
    assert m1["kl"] == 0.0  # one optimizer step per batch: every KL term is computed before it
    assert math.isfinite(m1["reward/color/mean"])
    m2, _ = trainer.train_step()
    assert m2["kl"] > 0.0  # after an update the policy differs from the reference
    lora1 = trainer.policy.adapter_state_dict()
    assert any((lora1[k] - lora0[k]).abs().max() > 0 for k in lora0)
    after = trainer.policy.transformer.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)  # the base stays frozen


def test_flow_grpo_learns_to_follow_a_color_prompt(tmp_path, tiny_sd3_dir):
    from uniloop.rl.flow_grpo import FlowGRPOTrainer

    cfg = flow_config(tmp_path, tiny_sd3_dir, extra="seed: 1")
    cfg.flow.cfg_scale, cfg.flow.num_steps, cfg.flow.train_timesteps = 1.0, 6, [0, 1, 2]
    cfg.flow.lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                    "to_add_out"]
    cfg.image_task.prompts = ["a red image"]
    cfg.rollout.num_generations, cfg.grpo.beta, cfg.grpo.learning_rate = 8, 0.0, 3e-3
    cfg.grpo.eval_samples_per_prompt = 8
    trainer = FlowGRPOTrainer(cfg)
    before = trainer.evaluate()["eval/reward/color/mean"]  # fixed seeds: the same samples every time
    assert trainer.evaluate()["eval/reward/color/mean"] == before
    rewards = [trainer.train_step()[0]["reward/color/mean"] for _ in range(14)]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards
    assert trainer.evaluate()["eval/reward/color/mean"] > before + 0.1


def test_flow_grpo_run_checkpoints_and_resumes(tmp_path, tiny_sd3_dir):
    import json

    from uniloop.rl.algorithms import get_algorithm
    from uniloop.rl.checkpoint import latest_checkpoint

    cfg = flow_config(tmp_path, tiny_sd3_dir)
    summary = get_algorithm("flow_grpo")(cfg, resume=False)
    run = tmp_path / "run"
    assert summary["steps"] == 2 and "reward/color/mean" in summary
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step_000002" and (ckpt / "adapter" / "adapter_config.json").exists()
    cfg = flow_config(tmp_path, tiny_sd3_dir)
    cfg.grpo.max_steps = 3
    get_algorithm("flow_grpo")(cfg, resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


# ----------------------------------------------------------------------------- Diffusion-DPO
def test_diffusion_dpo_loss_is_log2_before_training_and_matches_an_independent_computation(tiny_sd3_dir):
    from uniloop.rl.diffusion_dpo import (diffusion_dpo_loss, diffusion_pair_logps, flow_matching_errors,
                                          pairs_from_tensors)
    from uniloop.rl.losses import dpo_losses

    policy = load_policy(tiny_sd3_dir)
    size = policy.image_size
    pair = pairs_from_tensors(policy, ["a red image", "a blue image", "a green image"],
                              solid_color_images(["red", "blue", "green"], size),
                              solid_color_images(["blue", "green", "red"], size))
    g = torch.Generator().manual_seed(0)
    t = torch.rand(3, generator=g)
    noise = torch.randn(pair.chosen.shape, generator=g)
    beta = 100.0

    def losses():
        with torch.no_grad():
            with policy.reference():
                ref = diffusion_pair_logps(policy, pair, t, noise)
            return dpo_losses(diffusion_pair_logps(policy, pair, t, noise), ref, beta=beta).losses

    assert torch.allclose(losses(), torch.full((3,), math.log(2)), atol=1e-6)
    perturb(policy, scale=0.05)
    got = losses()
    with torch.no_grad():  # independent: the errors of each image on its own, then the formula
        errs = {}
        for name, lat in (("w", pair.chosen), ("l", pair.rejected)):
            x_t = (1 - t.view(-1, 1, 1, 1)) * lat + t.view(-1, 1, 1, 1) * noise
            emb, pooled = policy.encode_prompts(pair.prompts)
            v = policy.transformer(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=emb,
                                   pooled_projections=pooled, return_dict=False)[0]
            errs[name] = ((v - (noise - lat)) ** 2).mean(dim=(1, 2, 3))
            with policy.reference():
                errs["ref_" + name] = flow_matching_errors(policy, lat, pair.prompts, t, noise)
    expected = diffusion_dpo_loss(errs["w"], errs["l"], errs["ref_w"], errs["ref_l"], beta)
    manual = -torch.nn.functional.logsigmoid(-beta / 2 * ((errs["w"] - errs["l"]) - (errs["ref_w"] - errs["ref_l"])))
    assert torch.allclose(expected, manual)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - math.log(2)).abs().max() > 1e-3


def test_diffusion_dpo_trains_on_preference_files(tmp_path, tiny_sd3_dir):
    import json

    from uniloop.rl.algorithms import get_algorithm

    cfg = load_config(text=f"""
output_dir: {tmp_path / 'dpo'}
algorithm: diffusion_dpo
flow: {{name_or_path: {tiny_sd3_dir}, max_sequence_length: 8, num_steps: 4, cfg_scale: 1.0}}
lora: {{r: 4, alpha: 8}}
dpo: {{beta: 100.0, learning_rate: 3.0e-3, per_device_train_batch_size: 8, max_steps: 3, eval_steps: 3,
       eval_samples_per_prompt: 2}}
preference_data:
  synthetic: {{colors: [red, green, blue], kinds: [generation, understanding], pairs_per_combination: 2,
               eval_fraction: 0.34}}
image_task: {{prompts: [a red image]}}
rewards: [{{name: color}}]
logging: {{progress_bar: false, tensorboard: false, image_grid_every: 0, save_every: 0}}
""")
    summary = get_algorithm("diffusion_dpo")(cfg, resume=False)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and abs(rows[0]["eval/dpo/loss"] - math.log(2)) < 1e-6
    assert rows[0]["eval/dpo/accuracy"] == 0.5  # the fresh adapter ties every pair
    assert rows[0]["data/train_pairs"] > 0 and "eval/reward/color/mean" in rows[0]
    assert rows[-1]["step"] == 3 and summary["steps"] == 3
    assert (tmp_path / "dpo" / "checkpoints" / "step_000003" / "adapter" / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------- adapters
def test_adapter_saves_and_reloads_in_peft_and_diffusers_formats(tmp_path, tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline
    from peft import PeftModel

    policy = load_policy(tiny_sd3_dir)
    perturb(policy, scale=0.2)
    policy.save_adapter(tmp_path / "adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        assert (tmp_path / "adapter" / name).exists(), name
    want = policy.sample_images(PROMPTS, [5, 6], num_steps=3, cfg_scale=2.0)

    # our loader (PEFT files), as a resumed run or a rollout worker does
    fresh = load_policy(tiny_sd3_dir, lora=False).load_adapter(tmp_path / "adapter")
    got = fresh.sample_images(PROMPTS, [5, 6], num_steps=3, cfg_scale=2.0)
    assert torch.allclose(got.latents, want.latents, atol=1e-5)
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-4)

    x = want.latents[:, 1]
    t = want.sigmas[:, 1]
    with torch.no_grad():
        expected = policy.velocity(x, t, PROMPTS)
        # plain diffusers: the pipeline's own LoRA loader
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
        pipe.load_lora_weights(tmp_path / "adapter")
        emb, pooled = policy.encode_prompts(PROMPTS)
        v = pipe.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=emb, pooled_projections=pooled,
                             return_dict=False)[0]
        assert torch.allclose(v, expected, atol=1e-5)
        # plain PEFT: PeftModel.from_pretrained on the bare transformer
        bare = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None).transformer
        peft_model = PeftModel.from_pretrained(bare, str(tmp_path / "adapter"))
        v = peft_model(hidden_states=x, timestep=t * 1000, encoder_hidden_states=emb, pooled_projections=pooled,
                       return_dict=False)[0]
        assert torch.allclose(v, expected, atol=1e-5)
        with policy.reference():
            without = policy.velocity(x, t, PROMPTS)
        assert (without - expected).abs().max() > 1e-3


# ----------------------------------------------------------------------------- the modular route
def test_separate_understanding_model_judges_flow_images(tiny_sd3_dir, tiny_janus_dir):
    from uniloop.policies.janus import JanusPolicy
    from uniloop.rewards.base import RewardContext, reward_types

    policy = load_policy(tiny_sd3_dir)
    batch = policy.sample_images(PROMPTS, [1, 2], num_steps=2, cfg_scale=1.0)
    reward = reward_types()["understanding_model"](model=str(tiny_janus_dir))
    out = reward.score(batch, RewardContext(policy=policy, step=1))
    assert out.valid.all() and ((out.scores > 0) & (out.scores < 1)).all()
    judge = JanusPolicy.from_pretrained(tiny_janus_dir)
    direct = judge.yes_probability(batch.images, [f"Does this image show {p}? Answer yes or no." for p in PROMPTS])
    assert torch.allclose(out.scores, direct.float(), atol=1e-5)
