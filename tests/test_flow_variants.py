"""The Flow-GRPO family beyond plain Flow-GRPO: flow_grpo-compatible settings (KL form, population /
global std, detached unconditional branch, EMA), sliding SDE windows, CPS, CFG-free training and
DiffusionNFT; all on the tiny real SD3 pipeline of tests/conftest.py.
"""
import math

import numpy as np
import pytest
import torch
from conftest import perturb_adapter

from uniloop.policies.flow import FlowPolicy
from uniloop.policies.flow_sde import cps_step, sde_window_mask
from uniloop.rl.config import load_config
from uniloop.rl.losses import grpo_advantages


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # toy tensors: extra threads only contend


def config(tmp_path, path, algorithm="flow_grpo", flow="", grpo="", extra=""):
    return load_config(text=f"""
output_dir: {tmp_path / 'run'}
algorithm: {algorithm}
flow: {{name_or_path: {path}, max_sequence_length: 8, num_steps: 4, cfg_scale: 2.0, noise_level: 0.7{flow}}}
lora: {{r: 4, alpha: 8}}
rollout: {{num_generations: 4}}
grpo: {{learning_rate: 1.0e-2, beta: 0.04, epsilon: 0.2, per_device_train_batch_size: 64, max_steps: 2{grpo}}}
image_task: {{prompts: [a red image, a blue image], prompts_per_step: 2}}
rewards: [{{name: color}}]
logging: {{progress_bar: false, tensorboard: false, image_grid_every: 0, save_every: 0}}
{extra}""")


# ----------------------------------------------------------------------------- flow_grpo's official code
class OfficialStatTracker:
    """flow_grpo's PerPromptStatTracker (flow_grpo/stat_tracking.py), re-implemented from its description:
    per prompt string, mean of the prompt's rewards, np.std (ddof 0) + 1e-4 of the prompt's or, with
    global_std, of all rewards."""

    def __init__(self, global_std):
        self.global_std = global_std

    def update(self, prompts, rewards):
        prompts, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
        adv = np.zeros_like(rewards)
        for p in np.unique(prompts):
            r = rewards[prompts == p]
            std = (np.std(rewards) if self.global_std else np.std(r)) + 1e-4
            adv[prompts == p] = (r - np.mean(r)) / std
        return adv


def official_step_loss(policy, batch, j, advantages, cfg_scale, noise_level, clip_range, beta, adv_clip_max):
    """flow_grpo's train_sd3.py loss of timestep j on the same tensors: the CFG forward with the
    unconditional half detached, sde_step_with_logprob, the clipped loss and its KL, torch.mean over the batch."""
    x, x_next = batch.latents[:, j], batch.latents[:, j + 1]
    sigma, sigma_next = batch.sigmas[:, j].view(-1, 1, 1, 1), batch.sigmas[:, j + 1].view(-1, 1, 1, 1)
    sigma_max = batch.sigmas[:, 1].view(-1, 1, 1, 1)

    def forward():
        emb, pooled = policy.encode_prompts(batch.prompts)
        nemb, npooled = policy.encode_prompts([""] * len(batch))
        out = policy.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([batch.sigmas[:, j]] * 2) * 1000,
                                 encoder_hidden_states=torch.cat([nemb, emb]),
                                 pooled_projections=torch.cat([npooled, pooled]), return_dict=False)[0]
        uncond, text = out.chunk(2)
        uncond = uncond.detach()
        return uncond + cfg_scale * (text - uncond)

    def sde(v):
        dt = sigma_next - sigma
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        mean = x * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
        s = std_dev_t * torch.sqrt(-1 * dt)
        logp = -((x_next.detach() - mean) ** 2) / (2 * s ** 2) - torch.log(s) - torch.log(
            torch.sqrt(2 * torch.as_tensor(math.pi)))
        return logp.mean(dim=(1, 2, 3)), mean, std_dev_t

    with torch.no_grad():
        policy.transformer.disable_adapters()
        _, mean_ref, _ = sde(forward())
        policy.transformer.enable_adapters()
    logp, mean, std_dev_t = sde(forward())
    adv = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(logp - batch.logprobs[:, j])
    policy_loss = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)))
    kl = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t ** 2)
    return policy_loss + beta * torch.mean(kl)


def test_kl_form_flow_grpo_step_loss_and_gradient_equal_the_official_loss(tmp_path, tiny_sd3_dir):
    from uniloop.rl.flow_grpo import FlowGRPOTrainer

    cfg = config(tmp_path, tiny_sd3_dir, flow=", kl_form: flow_grpo, detach_uncond: true",
                 grpo=", std_ddof: 0, std_floor: 0.0, scale_rewards: batch")
    cfg.grpo.epsilon = 1e-2
    trainer = FlowGRPOTrainer(cfg)
    policy = trainer.policy
    batch = policy.sample_images(["a red image"] * 3 + ["a blue image"] * 3, list(range(6)), num_steps=4,
                                 cfg_scale=2.0, noise_level=0.7, group_ids=[0, 0, 0, 1, 1, 1])
    perturb_adapter(policy, 0.05)  # theta != theta_old (ratios off 1, some clipped) and != the reference (KL > 0)
    rewards = torch.tensor([0.1, 0.7, 0.4, 0.9, 0.2, 0.25])
    # the advantages: population std, global (flow_grpo's default global_std) and per prompt
    for scale, global_std in (("batch", True), ("group", False)):
        adv, _ = grpo_advantages(rewards, batch.group_ids, scale_rewards=scale, std_floor=0.0, ddof=0)
        want = OfficialStatTracker(global_std).update(batch.prompts, rewards.numpy())
        assert np.abs(adv.numpy() - want).max() < 1e-5
    adv = torch.as_tensor(OfficialStatTracker(True).update(batch.prompts, rewards.numpy()), dtype=torch.float32)
    params = policy.trainable_parameters()
    clipped_any = False
    for j in range(4):
        idx = torch.full((6,), j, dtype=torch.long)
        per, ratio, clipped, kl, _, _ = trainer.transition_loss(batch, idx, adv)
        ours = per.mean()
        grads = torch.autograd.grad(ours, params)
        theirs = official_step_loss(policy, batch, j, adv, 2.0, 0.7, 1e-2, 0.04, 5.0)
        official_grads = torch.autograd.grad(theirs, params)
        assert kl.mean() > 0 and abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item()) + 1e-7, (j, ours, theirs)
        for a, b in zip(grads, official_grads):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8
        clipped_any |= bool(clipped.any())
    assert clipped_any
    # the exact form is the same KL divided by (-dt): a different number for the same beta
    cfg.flow.kl_form = "exact"
    idx = torch.full((6,), 1, dtype=torch.long)
    kl_exact = trainer.transition_loss(batch, idx, adv)[3]
    cfg.flow.kl_form = "flow_grpo"
    kl_official = trainer.transition_loss(batch, idx, adv)[3]
    dt = batch.sigmas[:, 1] - batch.sigmas[:, 2]
    assert torch.allclose(kl_official, kl_exact * dt, rtol=1e-5) and (kl_exact > kl_official).all()


def test_detach_uncond_keeps_values_and_drops_the_unconditional_gradient(tiny_sd3_dir):
    policy = FlowPolicy.from_pretrained(tiny_sd3_dir, max_sequence_length=8).add_lora(r=4, alpha=8)
    perturb_adapter(policy, 0.1)
    x, t = torch.randn(2, policy.latent_channels, 4, 4), torch.full((2,), 0.6)
    params = policy.trainable_parameters()
    full = policy.velocity(x, t, ["a red image"] * 2, 3.0)
    detached = policy.velocity(x, t, ["a red image"] * 2, 3.0, detach_uncond=True)
    assert torch.equal(full, detached)
    g_det = torch.autograd.grad(detached.sum(), params)
    cond = policy.velocity(x, t, ["a red image"] * 2, 1.0)  # the conditional branch alone, times s
    g_cond = torch.autograd.grad(3.0 * cond.sum(), params)
    g_full = torch.autograd.grad(full.sum(), params, allow_unused=True)
    scale = max(g.abs().max() for g in g_cond)
    assert max((a - b).abs().max() for a, b in zip(g_det, g_cond)) <= 1e-4 * scale
    assert max((a - b).abs().max() for a, b in zip(g_full, g_cond)) > 1e-3 * scale


# ----------------------------------------------------------------------------- EMA
def test_adapter_ema_follows_flow_grpo_recurrence_evaluates_and_resumes(tmp_path, tiny_sd3_dir):
    from uniloop.rl.flow_grpo import FlowGRPOTrainer

    cfg = config(tmp_path, tiny_sd3_dir, flow=", ema_decay: 0.9, ema_update_every: 1, ema_for: eval_and_sampling",
                 extra="seed: 3")
    trainer = FlowGRPOTrainer(cfg)
    shadow = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    _, scored = trainer.train_step()
    for n in range(1):
        d = min(0.9, (1 + n) / (10 + n))
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, trainer.policy.trainable_parameters())]
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(trainer.ema.shadow, shadow))
    # step 2 samples with the EMA weights: its recorded log-probs are the EMA policy's
    current = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    _, (sb,) = trainer.train_step()
    with torch.no_grad():
        for p, s in zip(trainer.policy.trainable_parameters(), shadow):
            p.copy_(s)
        lp = trainer.policy.transition_logprobs(sb.batch.select([0, 1]), 0)[0]
    assert (lp - sb.batch.logprobs[:2, 0]).abs().max() < 1e-4
    assert max((a - b).abs().max() for a, b in zip(shadow, current)) > 1e-5  # EMA != the trained weights
    trainer.save()
    again = FlowGRPOTrainer(cfg)
    assert again.resume() and again.ema.updates == 2
    assert all(torch.equal(a, b) for a, b in zip(again.ema.shadow, trainer.ema.shadow))


# ----------------------------------------------------------------------------- windows, CPS
def test_sde_window_masks_follow_the_fast_and_mixgrpo_schedules():
    seeds = list(range(40))
    m = sde_window_mask(seeds, 10, {"size": 3, "range": [0, 5], "schedule": "random"})
    starts = m.float().argmax(1)
    assert (m.sum(1) == 3).all() and starts.min() == 0 and starts.max() == 2  # U{0, 1, 2}: all three drawn
    assert all(m[i, s:s + 3].all() for i, s in enumerate(starts.tolist()))
    assert torch.equal(m, sde_window_mask(seeds, 10, {"size": 3, "range": [0, 5]}))  # from the seeds alone
    w = {"size": 4, "range": [0, 10], "schedule": "sliding", "shift_every": 25}
    firsts = [int(sde_window_mask([0], 10, w, step)[0].float().argmax()) for step in (0, 24, 25, 50, 150, 175)]
    assert firsts == [0, 0, 1, 2, 6, 0]  # +1 every 25 steps, back to 0 after the last position (6)
    assert sde_window_mask([0, 1], 10, None).all()


def test_cps_step_preserves_the_interpolation_coefficients():
    g = torch.Generator().manual_seed(0)
    x0, eps, noise = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    t, t_next = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.6, 0.3, 0.0])
    tb, nb = t.view(-1, 1, 1, 1), t_next.view(-1, 1, 1, 1)
    x, v = (1 - tb) * x0 + tb * eps, eps - x0  # the exact velocity of this interpolation
    x_next, logp, mean, std = cps_step(v, x, t, t_next, 0.8, noise=noise)
    s = t_next * math.sin(0.8 * math.pi / 2)
    assert torch.allclose(std, s)
    want = (1 - nb) * x0 + torch.sqrt(nb ** 2 - s.view(-1, 1, 1, 1) ** 2) * eps + s.view(-1, 1, 1, 1) * noise
    assert torch.allclose(x_next, want, atol=1e-5)  # x0 weight 1 - t', noise variance t'^2
    assert torch.allclose(logp, -(s ** 2) * (noise ** 2).mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.equal(x_next[2], mean[2])  # the last step (t' = 0) is deterministic


@pytest.mark.parametrize("sde_type,window", [("sde", {"size": 2, "range": [0, 4]}), ("cps", None),
                                             ("cps", {"size": 2, "range": [1, 4], "schedule": "sliding"})])
def test_window_and_cps_logprobs_recorded_equal_recomputed(tiny_sd3_dir, sde_type, window):
    policy = FlowPolicy.from_pretrained(tiny_sd3_dir, max_sequence_length=8).add_lora(r=4, alpha=8)
    perturb_adapter(policy, 0.1)
    policy.transformer.eval()
    batch = policy.sample_images(["a red image", "a blue image"] * 2, [5, 6, 7, 8], num_steps=4, cfg_scale=2.0,
                                 noise_level=0.7, sde_type=sde_type, sde_window=window, step=3)
    mask = batch.stochastic_steps()
    assert mask.sum(1).tolist() == [window["size"] if window else 4] * 4
    with torch.no_grad():
        for k in range(4):
            lp, mean, _ = policy.transition_logprobs(batch, k)
            assert (lp - batch.logprobs[:, k]).abs().max() < 1e-4
            ode = ~mask[:, k]
            assert (batch.logprobs[ode, k] == 0).all()
            if ode.any():  # ODE steps: x' = x + v dt exactly
                assert (batch.latents[ode, k + 1] - mean[ode]).abs().max() < 1e-5
    again = policy.sample_images(["a red image", "a blue image"] * 2, [5, 6, 7, 8], num_steps=4, cfg_scale=2.0,
                                 noise_level=0.7, sde_type=sde_type, sde_window=window, step=3)
    assert torch.equal(again.latents, batch.latents)


# ----------------------------------------------------------------------------- learning, 3 seeds each
VARIANTS = {
    "flow_grpo_fast": ("flow_grpo", {"sde_window_size": 2, "sde_window_range": [0, 3]}),
    "cps": ("flow_grpo", {"sde_type": "cps", "train_timesteps": [0, 1, 2]}),
    "mixgrpo_sliding": ("flow_grpo", {"sde_window_size": 2, "sde_window_range": [0, 4],
                                      "sde_window_schedule": "sliding", "sde_window_shift_every": 4}),
    "diffusion_nft": ("diffusion_nft", {"nft_timesteps": 2}),
}


def learning_run(tmp_path, path, algorithm, flow: dict, seed: int, steps: int = 14):
    from uniloop.rl.algorithms import algorithms

    cfg = config(tmp_path / f"{algorithm}_{seed}", path, algorithm=algorithm, extra=f"seed: {seed}")
    cfg.flow.cfg_scale, cfg.flow.num_steps, cfg.flow.train_timesteps = 1.0, 6, [0, 1, 2]  # CFG-free
    cfg.flow.lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                    "to_add_out"]
    for k, v in flow.items():
        setattr(cfg.flow, k, v)
    cfg.image_task.prompts = ["a red image"]
    cfg.rollout.num_generations, cfg.grpo.beta, cfg.grpo.learning_rate = 8, 0.0, 3e-3
    cfg.grpo.eval_samples_per_prompt = 8
    trainer = algorithms()[algorithm](cfg)
    before = trainer.evaluate()["eval/reward/color/mean"]
    rewards = [trainer.train_step()[0]["reward/color/mean"] for _ in range(steps)]
    return before, rewards, trainer.evaluate()["eval/reward/color/mean"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_learns_the_color_task_on_three_seeds(tmp_path, tiny_sd3_dir, variant):
    algorithm, flow = VARIANTS[variant]
    for seed in (0, 1, 2):
        before, rewards, after = learning_run(tmp_path, tiny_sd3_dir, algorithm, flow, seed)
        assert all(math.isfinite(r) for r in rewards)
        assert after > before + 0.1, (variant, seed, before, after, rewards)


def test_diffusion_nft_runs_checkpoints_keep_the_old_adapter_and_resume(tmp_path, tiny_sd3_dir):
    import json

    from uniloop.rl.algorithms import algorithms, get_algorithm
    from uniloop.rl.checkpoint import latest_checkpoint, load_checkpoint
    from uniloop.rl.diffusion_nft import nft_loss

    cfg = config(tmp_path, tiny_sd3_dir, algorithm="diffusion_nft")
    cfg.flow.cfg_scale, cfg.logging.save_every = 1.0, 1
    summary = get_algorithm("diffusion_nft")(cfg, resume=False)
    assert summary["steps"] == 2 and math.isfinite(summary["reward/color/mean"]["last_10pct"])
    ckpt = latest_checkpoint(tmp_path / "run")
    state = load_checkpoint(ckpt)
    assert state["nft_old"]["updates"] == 2
    cfg.grpo.max_steps = 3
    get_algorithm("diffusion_nft")(cfg, resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # the loss: v == v_old gives x0(v+) == x0(v-), so L = c * err / beta whatever r; r = 1/2 + A / (2c)
    trainer = algorithms()["diffusion_nft"](cfg)
    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.9]).view(-1, 1, 1, 1)
    x_t = (1 - t) * x0 + t * eps
    loss, r = nft_loss(v, v, x_t, x0, t.flatten(), torch.tensor([-7.0, 0.0, 2.5]), beta=1.0, adv_clip_max=5.0)
    err = x_t - t * v - x0
    want = 5.0 * (err ** 2 / err.abs().mean(dim=(1, 2, 3), keepdim=True)).mean(dim=(1, 2, 3))
    assert torch.allclose(r, torch.tensor([0.0, 0.5, 0.75])) and torch.allclose(loss, want, rtol=1e-6)
    # the exact velocity (eps - x0) is a zero of the positive branch: r = 1 leaves only it
    loss, _ = nft_loss(eps - x0, v, x_t, x0, t.flatten(), torch.tensor([5.0] * 3), beta=1.0)
    assert loss.abs().max() < 1e-4
    assert trainer.sampling.image["sde_type"] == "ode"


def test_bad_window_and_kl_form_keys_fail_with_one_line_naming_the_key(tmp_path, tiny_sd3_dir):
    from uniloop.rl.config_loader import ConfigError

    with pytest.raises(ConfigError, match="flow.sde_window_size"):
        config(tmp_path, tiny_sd3_dir, flow=", sde_window_size: 3, sde_window_range: [0, 2]")
    with pytest.raises(ConfigError, match="flow.sde_window_range"):
        config(tmp_path, tiny_sd3_dir, flow=", sde_window_range: [2, 9]")
    with pytest.raises(ConfigError, match="flow.kl_form"):
        config(tmp_path, tiny_sd3_dir, flow=", kl_form: official")


@pytest.mark.parametrize("recipe", ["flow_grpo_fast_quickstart.yaml", "diffusion_nft_quickstart.yaml"])
def test_variant_recipes_load_and_validate(recipe):
    from pathlib import Path

    from uniloop.rl.validate import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parent.parent / "configs" / recipe)
    assert cfg.algorithm in ("flow_grpo", "diffusion_nft") and cfg.flow.cfg_scale == 1.0
