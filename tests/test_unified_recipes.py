"""The unified-model recipes around GRPO: SRUM's local self-understanding rewards, PairUni's
pair-scaled advantages, and UniRL's loop (generated images become understanding questions)."""
import pytest
import torch

from uniloop.policies.batches import ImageRollout, ScoredBatch
from uniloop.policies.tiny import solid_color_images
from uniloop.rewards.base import RewardContext

Q = "Does this image show {prompt}? Answer yes or no."


def quadrant_image(major: str, minor: str, size: int, quadrant: int) -> torch.Tensor:
    """A solid `major` image whose quadrant `quadrant` (0 top-left, 1 top-right, 2 bottom-left,
    3 bottom-right) is `minor`."""
    img = solid_color_images([major], size)[0].clone()
    h = size // 2
    r, c = divmod(quadrant, 2)
    img[r * h:(r + 1) * h, c * h:(c + 1) * h] = solid_color_images([minor], h)[0]
    return img


def image_batch(prompts, images, group_ids=None, targets=()):
    B = len(prompts)
    z = torch.zeros(B, 1, dtype=torch.long)
    return ImageRollout(prompts=list(prompts), prompt_ids=z, prompt_mask=z, image_tokens=z,
                        logprobs_cfg=torch.zeros(B, 1), logprobs_cond=torch.zeros(B, 1), images=images,
                        group_ids=torch.as_tensor(group_ids if group_ids is not None else range(B)),
                        targets=list(targets))


@pytest.fixture(scope="module")
def fast_janus_dir(tmp_path_factory):
    """A tiny real Janus without the palette-VQ fitting (nothing here decodes image tokens)."""
    from uniloop.policies.tiny import build_tiny_janus
    return build_tiny_janus(tmp_path_factory.mktemp("srum") / "janus", vq_fit_steps=0)


@pytest.fixture(scope="module")
def majority_judge(fast_janus_dir, one_torch_thread):
    """A tiny real Janus whose LoRA is fitted (real PEFT, a few seconds) to answer "Does this image show
    a <c> image?" with yes iff c is the image's majority color: solid images and images with one
    quadrant of another color. A cropped quadrant is a solid image, so the judge can tell regions."""
    from uniloop.policies.janus import JanusPolicy

    pol = JanusPolicy.from_pretrained(fast_janus_dir)
    pol.add_lora(r=8, alpha=16)
    colors, size = ["red", "blue", "green"], pol.image_size
    images, majors = list(solid_color_images(colors, size)), list(colors)
    for major in colors:
        for minor in colors:
            if minor != major:
                for quadrant in range(4):
                    images.append(quadrant_image(major, minor, size, quadrant))
                    majors.append(major)
    imgs = torch.stack([im for im in images for _ in colors])
    qs = [Q.format(prompt=f"a {c} image") for _ in images for c in colors]
    labels = torch.tensor([float(m == c) for m in majors for c in colors])
    params = [p for p in pol.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        p = pol.yes_probability(imgs, qs, grad=True).clamp(1e-6, 1 - 1e-6)
        loss = torch.nn.functional.binary_cross_entropy(p, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ((p > 0.5).float() == labels).all() and ((p - labels).abs() < 0.1).all():
            break
    pol.model.eval()
    return pol


def test_srum_local_rewards_catch_a_wrong_region(majority_judge):
    from uniloop.rewards.self_understanding import SelfUnderstandingReward, crop_region

    pol, size = majority_judge, majority_judge.image_size
    right = solid_color_images(["red"], size)[0]
    wrong = quadrant_image("red", "blue", size, 3)  # right overall, its bottom-right quadrant blue
    # the crop of the wrong quadrant is exactly the solid blue image
    assert torch.equal(crop_region(wrong, (0.5, 0.5, 1.0, 1.0)), solid_color_images(["blue"], size)[0])
    ctx = RewardContext(policy=pol)
    batch = image_batch(["a red image", "a red image"], torch.stack([right, wrong]))
    # preconditions (the fitted judge): globally right, the blue quadrant judged not red
    q = [Q.format(prompt="a red image")]
    g_wrong = pol.yes_probability(wrong[None], q)[0].item()
    blue_yes = pol.yes_probability(solid_color_images(["blue"], size), q)[0].item()
    assert g_wrong >= 0.9 and blue_yes <= 0.1, (g_wrong, blue_yes)

    su = SelfUnderstandingReward(judge="policy", regions=[2, 2], global_weight=0.5, local_weight=0.5)
    out = su.score(batch, ctx)
    glob, local = torch.tensor(out.details["global"]), torch.tensor(out.details["local"])
    # local = mean of the 4 quadrants: at most (3 * 1 + blue_yes) / 4 <= 0.775 < 0.9 <= global
    assert local[1] <= (3 + blue_yes) / 4 + 1e-6
    assert local[1] < glob[1] - (0.9 - 0.775) + 1e-6
    assert local[0] >= 0.9 - 1e-6  # every quadrant of the right image is red
    assert torch.allclose(out.scores, 0.5 * glob + 0.5 * local, atol=1e-6)
    assert out.scores[0] > out.scores[1]
    # the global part alone is the plain reward's score
    plain = SelfUnderstandingReward(judge="policy").score(batch, ctx).scores
    assert torch.allclose(plain, glob, atol=1e-6)


def test_srum_boxes_from_a_regions_file(majority_judge, tmp_path):
    from uniloop.rewards.self_understanding import SelfUnderstandingReward

    pol, size = majority_judge, majority_judge.image_size
    f = tmp_path / "regions.jsonl"
    f.write_text('{"prompt": "red with a blue corner", "regions": [{"box": [0.5, 0.5, 1.0, 1.0], "question": '
                 '"Does this image show a blue image? Answer yes or no."}, {"box": [0, 0, 0.5, 0.5], '
                 '"question": "Does this image show a red image? Answer yes or no."}]}\n')
    su = SelfUnderstandingReward(judge="policy", regions_file=str(f), global_weight=0.0, local_weight=1.0)
    images = torch.stack([quadrant_image("red", "blue", size, 3), solid_color_images(["red"], size)[0]])
    out = su.score(image_batch(["red with a blue corner"] * 2, images), RewardContext(policy=pol))
    # the boxes' questions hold for the first image only (its corner is blue): each box >= 0.9 vs <= 0.1
    assert out.scores[0] >= 0.9 and out.scores[1] <= (1 + 0.1) / 2 + 1e-6
    f.write_text('{"prompt": "x", "regions": [{"box": [0.5, 0, 0.2, 1], "question": "q"}]}\n')
    with pytest.raises(ValueError, match="regions.jsonl:1: a box"):
        SelfUnderstandingReward(regions_file=str(f))
    with pytest.raises(ValueError, match="local_weight needs regions"):
        SelfUnderstandingReward(local_weight=0.5)


def test_pair_similarity_scales_paired_advantages_by_hand():
    from uniloop.rl.unirl import scale_pair_advantages, understanding_request

    # generation: 2 groups (ids 0, 1) of 3 images; understanding: 2 questions per group, 2 answers each
    images = torch.rand(6, 4, 4, 3)
    gen = ScoredBatch(image_batch(["a red image"] * 3 + ["a blue image"] * 3, images, [0, 0, 0, 1, 1, 1],
                                  ["red"] * 3 + ["blue"] * 3), torch.zeros(6), torch.ones(6, dtype=torch.bool))
    req, pairs = understanding_request(gen, "What color?", images_per_prompt=2, num_generations=2, step=3)
    assert pairs == [0, 0, 1, 1] and req.targets == ["red", "red", "blue", "blue"]
    assert torch.equal(req.images, images[[0, 1, 3, 4]])
    gen.advantages = torch.tensor([1.0, -1.0, 0.5, 2.0, -2.0, 0.0])
    und = ScoredBatch(gen.batch, torch.zeros(8), torch.ones(8, dtype=torch.bool))  # stands in: 8 answer rows
    und.batch = type("Rows", (), {"__len__": lambda self: 8})()
    und.advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    scale_pair_advantages(gen, und, pairs, {0: 0.8, 1: 0.25})
    assert torch.allclose(gen.advantages, torch.tensor([0.8, -0.8, 0.4, 0.5, -0.5, 0.0]))
    assert torch.allclose(und.advantages, torch.tensor([0.8, -0.8, 0.8, -0.8, 0.125, -0.125, 0.5, -0.5]))


def test_embedding_similarity_is_a_clamped_cosine(fast_janus_dir):
    from uniloop.policies.janus import JanusPolicy
    from uniloop.rl.unirl import embedding_similarity

    tiny_policy = JanusPolicy.from_pretrained(fast_janus_dir)

    tok, emb = tiny_policy.tokenizer, tiny_policy.model.get_input_embeddings()
    sims = embedding_similarity(tiny_policy, ["a red image", "red"], ["a red image", "blue"])
    assert sims[0].item() == pytest.approx(1.0, abs=1e-5)
    want = torch.nn.functional.cosine_similarity(emb.weight[tok.convert_tokens_to_ids("red")].detach(),
                                                 emb.weight[tok.convert_tokens_to_ids("blue")].detach(), dim=0)
    assert sims[1].item() == pytest.approx(max(want.item(), 0.0), abs=1e-5)


def unirl_cfg(tmp_path, model_dir, *extra):
    from pathlib import Path

    from uniloop.rl.config import load_config
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "unirl_quickstart.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={model_dir}", "rollout.num_generations=4",
        "image_task.prompts=[a red image, a blue image]", "image_task.prompts_per_step=2", "unirl.num_generations=3",
        "logging.progress_bar=false", "logging.tensorboard=false", "grpo.max_steps=2", "grpo.eval_steps=0", *extra])


def test_unirl_step_asks_about_its_own_images_and_trains_both(tmp_path, fast_janus_dir):
    from uniloop.policies.batches import TextRollout
    from uniloop.rl.grpo import GRPOTrainer

    tr = GRPOTrainer(unirl_cfg(tmp_path, fast_janus_dir, "unirl.pair_similarity=data",
                               "unirl.similarities=[1.0, 0.5]", "unirl.eval_colors=[red, blue]"))
    lora = {n: p for n, p in tr.policy.model.named_parameters() if "lora_B" in n}
    metrics, scored = tr.train_step()
    gen, und = scored
    assert gen.batch.kind == "image" and isinstance(und.batch, TextRollout)
    # 2 questions per prompt group (the group's first 2 images), each answered 3 times
    rows = [0, 1, 4, 5]
    assert len(und.batch) == 12 and metrics["unirl/questions"] == 4
    assert torch.allclose(und.batch.images[::3], gen.batch.images[rows])
    assert und.batch.targets[::3] == ["red", "red", "blue", "blue"]
    assert und.batch.prompts[0] == "What color is this image? Answer in one word."
    # exact_match scores the answers against the image prompt's target
    from uniloop.rewards.builtin import normalize_answer
    want = [float(normalize_answer(a) == t) for a, t in zip(und.batch.answers, und.batch.targets)]
    assert und.components["exact_match"].scores.tolist() == want
    assert "reward/exact_match/mean" in metrics and "reward/color/mean" in metrics
    assert metrics["unirl/pair_similarity/mean"] == pytest.approx(0.75)
    assert any(p.abs().sum() > 0 for p in lora.values()), "the shared adapter must have been updated"
    # the held-out understanding check: solid images of eval_colors, beside the image prompts
    assert [t.kind for t in tr.eval_tasks] == ["image", "text"] and len(tr.eval_tasks[1].items) == 2


def test_bad_unirl_config_names_the_key(tmp_path):
    from uniloop.rl.config_loader import ConfigError, source_of
    from uniloop.rl.validate import check_unirl

    for extra, key in ((["unirl.eval_colors=[purple]"], "unirl.eval_colors"),
                       (["unirl.pair_similarity=data", "unirl.similarities=[1.0]"], "unirl.similarities"),
                       (["unirl.similarities=[1.5, 0.2]"], "unirl.similarities"),
                       (["image_task=null"], "unirl")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            cfg = unirl_cfg(tmp_path, "tiny", *extra)
            check_unirl(cfg, source_of(cfg))


def test_image_task_cycle_order_takes_every_prompt_every_step():
    from uniloop.rl.tasks import ImageTask

    prompts = ["a red image", "a green image", "a blue image", "a yellow image"]
    cycle = ImageTask(prompts, 4, seed=0, order="cycle")
    for step in (1, 2, 7):
        assert cycle.request(step, 2).prompts == prompts
    three = ImageTask(prompts, 3, seed=0, order="cycle")  # steps continue where the last one stopped
    assert three.request(1, 2).prompts + three.request(2, 2).prompts == prompts + prompts[:2]
    # the default (shuffled passes) also shows every prompt every step, in an order that varies
    shuffled = ImageTask(prompts, 4, seed=0)
    orders = [shuffled.request(s, 2).prompts for s in range(1, 21)]
    assert all(sorted(o) == sorted(prompts) for o in orders) and any(o != prompts for o in orders)
