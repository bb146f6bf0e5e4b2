"""Think, then draw: plan-then-image rollouts (T2I-R1), their log-probs, and the per-segment GRPO loss."""
from pathlib import Path

import pytest
import torch
from conftest import perturb_adapter

from uniloop.policies.batches import ReasonedImageRollout
from uniloop.rl.config import load_config
from uniloop.rl.config_loader import ConfigError
from uniloop.rl.grpo import GRPOTrainer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red image", "a green image of a photo", "a blue image"]  # different lengths: left padding
INSTRUCTION = "{prompt} what color is it? answer in one word."


def _reasoned(policy, cfg_scale, **kw):
    return policy.sample_reasoned_images(PROMPTS * 2, seeds=list(range(6)), instruction=INSTRUCTION,
                                         max_new_tokens=4, stop=["."], cfg_scale=cfg_scale, temperature=0.9, **kw)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_plan_and_image_logprobs_equal_teacher_forced(tiny_policy, cfg_scale):
    tiny_policy.add_lora(r=4)
    perturb_adapter(tiny_policy)
    b = _reasoned(tiny_policy, cfg_scale, top_k=40)
    P, T = b.plan_ids.shape[1], tiny_policy.num_image_tokens
    assert b.segments == {"plan": slice(0, P), "image": slice(P, P + T)}
    assert b.logprobs("cfg").shape == b.completion_mask.shape == (6, P + T)
    # the plan ends at the first stop token (kept) or at max_new_tokens; nothing is recorded after it
    stop = tiny_policy.tokenizer.convert_tokens_to_ids(".")
    for i in range(6):
        n = int(b.plan_mask[i].sum())
        ends = torch.isin(b.plan_ids[i, :n], torch.tensor([stop, tiny_policy.tokenizer.eos_token_id]))
        ends = ends.nonzero().flatten().tolist()
        assert ends in ([], [n - 1]) and (ends or n == 4), (b.plan_ids[i], n)
        assert (b.plan_logprobs[i, n:] == 0).all()
        # the image was conditioned on prompt + plan (T2I-R1's "{prompt}. {plan}")
        want = tiny_policy.encode_generation_prompts([f"{b.prompts[i]}. {b.plans[i]}"])[0][0].cpu()
        assert torch.equal(b.prompt_ids[i][b.prompt_mask[i].bool()], want), (b.prompts[i], b.plans[i])
        special = set(tiny_policy.tokenizer.added_tokens_decoder)  # dropped by decoding (as in T2I-R1's text)
        sampled = [t for t in b.plan_ids[i, :n].tolist() if t not in special]
        assert sampled == tiny_policy.tokenizer.encode(b.plans[i], add_special_tokens=False)
    assert b.plan_logprobs[b.plan_mask.bool()].lt(0).all()
    for mode in ("cfg", "conditional"):
        tf = tiny_policy.rollout_logprobs(b, mode)
        assert tf.requires_grad
        diff = ((tf.detach() - b.logprobs(mode)) * b.completion_mask).abs()
        # float32 rounding of a KV-cached vs a full forward (CFG amplifies it: see test_janus_policy);
        # a wrong position, mask or branch gives differences of order 1
        assert diff[:, :P].max() <= 1e-4 and diff[:, P:].max() <= 5e-4, (mode, diff[:, :P].max(), diff[:, P:].max())
    # the plan changes what is drawn: the same image seeds without a plan give other tokens
    plain = tiny_policy.sample_images(PROMPTS * 2, seeds=list(range(6)), cfg_scale=cfg_scale, temperature=0.9, top_k=40)
    assert not torch.equal(plain.image_tokens, b.image_tokens)


def test_reasoned_batches_select_and_concat_like_one_batch(tiny_policy):
    b = _reasoned(tiny_policy, 3.0)
    parts = [b.select([0, 3]), b.select([1, 2, 4, 5])]
    c = ReasonedImageRollout.concat(parts)
    order = [0, 3, 1, 2, 4, 5]
    assert c.plans == [b.plans[i] for i in order] and c.prompts == [b.prompts[i] for i in order]
    for name in ("logprobs_cfg", "image_tokens"):
        assert torch.equal(getattr(c, name), getattr(b, name)[order])
    tf = tiny_policy.rollout_logprobs(c, "cfg").detach()  # re-padded rows still teacher-force alike
    assert ((tf - c.logprobs("cfg")) * c.completion_mask).abs().max() <= 5e-4


def test_plan_ablation_samples_no_plan(tiny_policy):
    b = _reasoned(tiny_policy, 3.0, enabled=False)
    plain = tiny_policy.sample_images(PROMPTS * 2, seeds=list(range(6)), cfg_scale=3.0, temperature=0.9)
    assert b.plan_ids.shape[1] == 0 and b.plans == [""] * 6
    assert torch.equal(b.image_tokens, plain.image_tokens) and b.segments["plan"] == slice(0, 0)
    assert torch.allclose(tiny_policy.rollout_logprobs(b, "cfg").detach(), b.logprobs("cfg"), atol=5e-4)


def reasoning_cfg(tmp_path, tiny_janus_dir, *extra):
    return load_config(REPO / "configs" / "reasoning_quickstart.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_janus_dir}", "model.tiny={}",
        "rollout.num_generations=4", "image_task.prompts=[a red image, a blue image]", "image_task.targets=[]",
        "image_task.prompts_per_step=2", f"reasoning.instruction={INSTRUCTION}", "reasoning.max_new_tokens=3",
        "logging.progress_bar=false", "logging.tensorboard=false", "grpo.max_steps=2", "grpo.eval_steps=0",
        "logging.image_grid_every=0", "reasoning.plan_rewards=[]", "reasoning.image_rewards=[]", *extra])


def test_grpo_step_on_reasoned_rollouts_ratio_one_base_frozen(tmp_path, tiny_janus_dir):
    tr = GRPOTrainer(reasoning_cfg(tmp_path, tiny_janus_dir, "grpo.beta=0.04"))
    named = dict(tr.policy.model.named_parameters())
    base_before = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in named.items() if "lora_" in n}
    metrics, scored = tr.train_step()
    assert isinstance(scored[0].batch, ReasonedImageRollout) and len(scored[0].batch.plans) == 8
    assert metrics["ratio/first_step_max_abs_dev"] == 0.0, "rho must be exactly 1 on the first on-policy step"
    assert metrics["kl"] == 0.0 and metrics["logprob/sampler_vs_learner_max_abs_diff"] <= 5e-4
    assert all(torch.equal(p, named[n]) for n, p in base_before.items()), "base weights must stay frozen"
    assert any(not torch.equal(p, named[n]) for n, p in lora_before.items()), "the adapter must change"
    assert {"entropy/plan", "entropy/image", "reward/plan_target/mean"} <= set(metrics)
    metrics2, _ = tr.train_step()
    assert metrics2["kl"] > 0.0


def test_segments_are_aggregated_apart_and_weighted(tmp_path, tiny_janus_dir):
    """The gradient of the GRPO loss is w_text * grad(L_plan) + w_image * grad(L_image), each segment's
    loss aggregated over its own tokens: checked against a direct computation of both (ratio 1 on the
    first on-policy pass, so d/dtheta of -A * rho is -A * dlogp)."""
    tr = GRPOTrainer(reasoning_cfg(tmp_path, tiny_janus_dir, "grpo.loss_type=bnpo"))
    params = tr.policy.trainable_parameters()
    grads = []
    tr.optimizer_step = lambda: grads.append(torch.cat([p.grad.flatten().clone() for p in params])) or 0.0
    _, scored = tr.train_step()  # the sampling step; the captured update did not move the weights
    sb = scored[0]
    sb.advantages = torch.linspace(-1.0, 1.5, len(sb.batch))  # every row weighs differently
    got = {}
    for wt, wi in ((1.0, 0.0), (0.0, 1.0), (2.0, 0.5)):
        tr.opt.text_loss_weight, tr.opt.image_loss_weight = wt, wi
        grads.clear()
        tr.update(scored)
        got[wt, wi] = grads[0]
    b, P = sb.batch, sb.batch.plan_ids.shape[1]
    for p in params:
        p.grad = None
    lp = tr.policy.rollout_logprobs(b, "cfg")
    m = b.completion_mask
    A = sb.advantages[:, None]
    plan = -(A * lp[:, :P] * m[:, :P]).sum() / m[:, :P].sum()  # bnpo: token mean over the plan tokens only
    image = -(A * lp[:, P:]).sum() / m[:, P:].sum()
    for loss, key in ((plan, (1.0, 0.0)), (image, (0.0, 1.0))):
        want = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])
        err = ((got[key] - want).abs().max() / want.abs().max()).item()
        assert err <= 1e-4, (key, err)
    assert torch.allclose(got[2.0, 0.5], 2 * got[1.0, 0.0] + 0.5 * got[0.0, 1.0], rtol=1e-4,
                          atol=1e-6 * got[2.0, 0.5].abs().max())


def test_plan_target_reward_reads_the_plans():
    from uniloop.rewards.builtin import PlanTargetReward
    b = ReasonedImageRollout(prompts=["an image the color of a ripe banana"] * 4, prompt_ids=torch.zeros(4, 1).long(),
                             prompt_mask=torch.ones(4, 1).long(), image_tokens=torch.zeros(4, 1).long(),
                             logprobs_cfg=torch.zeros(4, 1), logprobs_cond=torch.zeros(4, 1),
                             images=torch.zeros(4, 2, 2, 3), group_ids=torch.zeros(4).long(), targets=["yellow"] * 4,
                             plan_prompt_ids=torch.zeros(4, 1).long(), plan_prompt_mask=torch.ones(4, 1).long(),
                             plan_ids=torch.zeros(4, 1).long(), plan_mask=torch.ones(4, 1).long(),
                             plan_logprobs=torch.zeros(4, 1), plan_entropy=torch.zeros(4, 1),
                             plans=["yellow .", "Yellow", "red yellow", "blue"])
    out = PlanTargetReward().score(b, None)
    assert out.scores.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert PlanTargetReward(exclusive=False).score(b, None).scores.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_bad_reasoning_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="reasoning.image_prompt.*{plan}"):
        load_config(REPO / "configs" / "reasoning_quickstart.yaml", ["reasoning.image_prompt={prompt} only"])
    with pytest.raises(ConfigError, match="image_task.targets"):
        load_config(REPO / "configs" / "reasoning_quickstart.yaml", ["image_task.targets=[red]"])


def test_tiny_extra_words_extend_the_vocabulary_only_when_asked():
    from uniloop.policies.tiny import REASONING_WORDS, build_tokenizer
    plain, extended = build_tokenizer(), build_tokenizer(REASONING_WORDS)
    assert plain.get_vocab() == {k: v for k, v in extended.get_vocab().items() if v < len(plain)}
    ids = extended("a ripe banana")["input_ids"]
    assert extended.unk_token_id not in ids and plain.unk_token_id in plain("a ripe banana")["input_ids"]


def test_segment_rewards_give_each_segment_its_own_advantage(tmp_path, tiny_janus_dir):
    """reasoning.plan_rewards / image_rewards: the plan's advantage is the GRPO advantage of plan_target
    alone, the image's that of the image rewards alone, and the loss credits each segment's tokens with
    its own: the gradient equals the direct computation with the two advantages."""
    from uniloop.rl.losses import grpo_advantages
    tr = GRPOTrainer(reasoning_cfg(tmp_path, tiny_janus_dir, "grpo.loss_type=bnpo",
                                   "reasoning.plan_rewards=[plan_target]",
                                   "reasoning.image_rewards=[color_accuracy, color]"))
    params = tr.policy.trainable_parameters()
    grads = []
    tr.optimizer_step = lambda: grads.append(torch.cat([p.grad.flatten().clone() for p in params])) or 0.0
    metrics, scored = tr.train_step()
    sb, g = scored[0], tr.opt
    comps = {k: v.scores for k, v in sb.components.items()}
    for seg, reward in (("plan", comps["plan_target"]), ("image", comps["color_accuracy"] + comps["color"])):
        want, _ = grpo_advantages(reward, sb.batch.group_ids, sb.valid, g.scale_rewards, g.std_floor, ddof=g.std_ddof)
        assert torch.allclose(sb.segment_advantages[seg], want, atol=1e-6), seg
        assert f"advantage/{seg}/abs_mean/image" in metrics  # per segment, then per kind
    whole, _ = grpo_advantages(sb.rewards, sb.batch.group_ids, sb.valid, g.scale_rewards, g.std_floor, ddof=g.std_ddof)
    assert torch.equal(sb.advantages, whole)  # the trajectory's advantage is still logged and kept

    n = len(sb.batch)
    sb.segment_advantages = {"plan": torch.linspace(-1.0, 1.5, n), "image": torch.linspace(2.0, -0.5, n)}
    grads.clear()
    tr.update(scored)
    b, P = sb.batch, sb.batch.plan_ids.shape[1]
    for p in params:
        p.grad = None
    lp = tr.policy.rollout_logprobs(b, "cfg")
    m = b.completion_mask
    a_plan, a_image = sb.segment_advantages["plan"][:, None], sb.segment_advantages["image"][:, None]
    loss = -(a_plan * lp[:, :P] * m[:, :P]).sum() / m[:, :P].sum() - (a_image * lp[:, P:]).sum() / m[:, P:].sum()
    want = torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)])
    assert ((grads[0] - want).abs().max() / want.abs().max()).item() <= 1e-4


def test_segment_rewards_must_name_configured_rewards():
    from uniloop.rl.validate import load_run_config
    with pytest.raises(ConfigError, match="--set reasoning.plan_rewards.*'plan_targt'.*not a "
                                          "configured reward"):
        load_run_config(REPO / "configs" / "reasoning_quickstart.yaml", ["reasoning.plan_rewards=[plan_targt]"])
