"""Every data-parallel algorithm on 2 gloo ranks makes its 1-rank update (rl/trainer.py's rank seam).

Per algorithm one step on a fixed batch, twice: learner.num_workers 1 with per_device_train_batch_size
2P and learner.num_workers 2 with P (the same global micro-batches, each rank taking half of every
one; odd micro-batches leave a rank a row short, and a 1-row micro-batch leaves one without rows).
The fixed batch: DPO and Diffusion-DPO read the same synthetic pairs in the same seeded order (and
Diffusion-DPO's flow times and noise are drawn on the driver); online DPO and Flow-GRPO sample on
the driver with the same seed and weights. The adapters start perturbed (a fresh LoRA B = 0 gives
A no gradient). Tolerance: as tests/test_learner.py (float32 sums split over two ranks: 1e-6 on the
weights whose AdamW step is well conditioned, `AdamConditioning`).
"""
import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import perturb_adapter  # noqa: E402
from test_learner import AdamConditioning, same_weights  # noqa: E402
from test_ray import ray_local  # noqa: E402,F401  (a fixture)
from uniloop.rl.algorithms import algorithms  # noqa: E402
from uniloop.rl.config import load_config  # noqa: E402
from uniloop.rl.distributed import trainable_state  # noqa: E402

LORA = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|up_proj)"
RANKS = ["learner.num_workers=2", "learner.num_cpus_per_worker=0.5"]
LOGGING = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.image_grid_every=0",
           "logging.save_every=0"]


@pytest.fixture(scope="module")
def janus_adapter(tiny_janus_dir, tmp_path_factory):
    from uniloop.policies.janus import JanusPolicy
    policy = JanusPolicy.from_pretrained(tiny_janus_dir)
    policy.add_lora(r=4, alpha=8, target_modules=LORA)
    perturb_adapter(policy, scale=0.05, seed=1)
    path = tmp_path_factory.mktemp("adapter") / "janus"
    policy.save_adapter(path)
    return path


@pytest.fixture(scope="module")
def sd3_adapter(tiny_sd3_dir, tmp_path_factory):
    from uniloop.policies.flow import FlowPolicy
    policy = FlowPolicy.from_pretrained(tiny_sd3_dir, max_sequence_length=8)
    policy.add_lora(r=4, alpha=8)
    perturb_adapter(policy, scale=0.05, seed=1, module=policy.transformer)
    path = tmp_path_factory.mktemp("adapter") / "sd3"
    policy.save_adapter(path)
    return path


def recipe(name, tiny_janus_dir, tiny_sd3_dir, janus_adapter, sd3_adapter, out):
    """(overrides, P, the metric that shows the update's loss) of one algorithm's fixed-batch step."""
    from pathlib import Path
    configs = Path(__file__).parent.parent / "configs"
    janus = [f"model.name_or_path={tiny_janus_dir}", f"lora.init_adapter={janus_adapter}", "lora.r=4",
             "lora.alpha=8", f"lora.target_modules={LORA}"]
    flow = [f"flow.name_or_path={tiny_sd3_dir}", "flow.max_sequence_length=8", "flow.num_steps=4",
            "flow.lora_target_modules=[to_q, to_k, to_v, to_out.0]", f"lora.init_adapter={sd3_adapter}", "lora.r=4",
            "lora.alpha=8"]
    common = [f"output_dir={out}", "seed=0", *LOGGING]
    if name == "dpo":  # generation and understanding pairs: chunks of both kinds, odd sizes
        return (str(configs / "dpo_quickstart.yaml"), common + janus + [
            "dpo.gradient_accumulation_steps=2", "dpo.max_steps=1", "dpo.learning_rate=1e-3", "dpo.eval_steps=0",
            "preference_data.synthetic.colors=[red, green, blue, yellow]", "image_task=null", "text_task=null",
            "rewards=[]"], 3, "dpo/loss")
    if name == "online_dpo":  # two optimizer steps on the round's pairs (AdamW's second step too)
        return (str(configs / "online_dpo_quickstart.yaml"), common + janus + [
            "image_task.prompts=[a red image, a green image, a blue image]", "image_task.prompts_per_step=3",
            "rollout.num_generations=4", "rollout.cfg_scale=1.0", "dpo.online_pairs_per_prompt=2",
            "dpo.online_margin=0.0", "dpo.online_updates=2", "dpo.max_steps=1", "dpo.learning_rate=1e-3",
            "dpo.eval_steps=0"], 2, "dpo/loss")
    if name == "diffusion_nft":  # the old (sampling) adapter is swapped in on the ranks and moves after the update
        return (str(configs / "diffusion_nft_quickstart.yaml"), common + flow + [
            "flow.nft_timesteps=2", "flow.nft_kl_weight=1e-2", "rollout.num_generations=4",
            "image_task.prompts=[a red image, a blue image]", "image_task.prompts_per_step=2",
            "grpo.learning_rate=1e-3", "grpo.gradient_accumulation_steps=1", "grpo.max_steps=1",
            "grpo.eval_steps=0", "flow.nft_old_decay_rate=0.5"], 2, "loss")
    if name in ("flow_grpo", "flow_grpo_ema"):  # KL to the adapter-free reference, 2 micro-batches per step
        ema = ["flow.ema_decay=0.9", "flow.ema_update_every=1"] if name == "flow_grpo_ema" else ["flow.ema_decay=0.0"]
        return (str(configs / "flow_grpo_quickstart.yaml"), common + flow + ema + [
            "flow.cfg_scale=2.0", "flow.noise_level=0.7", "rollout.num_generations=4",
            "image_task.prompts=[a red image, a blue image]", "image_task.prompts_per_step=2",
            "rewards=[{name: color}]", "grpo.learning_rate=1e-3", "grpo.beta=0.04", "grpo.num_iterations=1",
            "grpo.gradient_accumulation_steps=2", "grpo.max_steps=1", "grpo.eval_steps=0"], 2, "loss")
    assert name == "diffusion_dpo"
    return (str(configs / "diffusion_dpo_quickstart.yaml"), common + flow + [
        "dpo.gradient_accumulation_steps=2", "dpo.max_steps=1", "dpo.learning_rate=1e-3", "dpo.eval_steps=0",
        "preference_data.synthetic.colors=[red, green, blue]", "preference_data.synthetic.pairs_per_combination=1"],
        3, "dpo/loss")


def one_step(recipe_file, overrides, name):
    trainer = algorithms()[name.removesuffix("_ema")](load_config(recipe_file, overrides))
    try:
        before, watch = trainable_state(trainer.policy), AdamConditioning(trainer)
        metrics, _ = trainer.train_step()
        metrics["_conditioned"] = watch.masks()
        metrics["_extra"] = trainer.extra_state()  # the EMA / old adapter the driver samples with
        return before, trainable_state(trainer.policy), metrics
    finally:
        trainer.close()


@pytest.mark.parametrize("name", ["dpo", "online_dpo", "flow_grpo", "flow_grpo_ema", "diffusion_dpo", "diffusion_nft"])
def test_two_ranks_make_the_one_rank_update(name, ray_local, tiny_janus_dir, tiny_sd3_dir, janus_adapter,
                                           sd3_adapter, tmp_path):
    file, base, p, loss_key = recipe(name, tiny_janus_dir, tiny_sd3_dir, janus_adapter, sd3_adapter, tmp_path / "run")
    section = "grpo" if name.startswith(("flow_grpo", "diffusion_nft")) else "dpo"
    w0, w1, m1 = one_step(file, base + [f"{section}.per_device_train_batch_size={2 * p}",
                                        f"output_dir={tmp_path / 'one'}"], name)
    v0, w2, m2 = one_step(file, base + RANKS + [f"{section}.per_device_train_batch_size={p}",
                                                f"output_dir={tmp_path / 'two'}"], name)
    assert set(w1) == set(w2) and all(torch.equal(w0[k], v0[k]) for k in w0)  # the same start
    for key in ("reward/mean", "online/pairs", "dpo/pairs"):  # the same batch
        assert m1.get(key) == m2.get(key), key
    change = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    diff, left = same_weights(w1, w2, m1["_conditioned"])
    total = sum(t.numel() for t in w1.values())
    print(f"{name}: 1 vs 2 ranks max abs diff {diff:.3g} on {total - left} of {total} elements, update {change:.3g}")
    assert change > 1e-4, change  # the step moved the adapter (lr 1e-3: AdamW moves each weight ~lr)
    assert diff < 1e-6, (diff, change)
    assert left < 0.01 * total, left
    assert abs(m1[loss_key] - m2[loss_key]) < 1e-6 * max(1.0, abs(m1[loss_key]))
    assert m2["learner/weights_bytes"] > 0 and "learner/weights_bytes" not in m1
    for key, state in m1["_extra"].items():  # the ranks' EMA reached the driver and equals the 1-rank one
        other = m2["_extra"][key]
        assert state["updates"] == other["updates"] > 0, key
        moved = max((s - w0[k]).abs().max().item() for s, k in zip(state["shadow"], w0))
        assert moved > 1e-5, key  # it followed the step
        # an EMA element is a mix of its weight's values: it inherits the weight's AdamW conditioning, so
        # it is held to 1e-6 on the same elements as the weights (CI measured 4e-6 on an ill-conditioned one)
        shadow_diff, _ = same_weights(dict(zip(w0, state["shadow"])), dict(zip(w0, other["shadow"])),
                                      m1["_conditioned"])
        assert shadow_diff < 1e-6, (key, shadow_diff)
