"""The Emu3 policy on a tiny Emu3 (fp32): constrained sampling == teacher forcing, layout, seeds, LoRA,
reference, adapter round trip, batches, understanding, and parity with HF generate."""
import time

import pytest
import torch
from conftest import perturb_adapter

from uniloop.policies.batches import ImageRollout, TextRollout
from uniloop.policies.emu3 import Emu3Policy
from uniloop.policies.emu3_tiny import build_tiny_emu3
from uniloop.policies.tiny import COLORS, palette, solid_color_images

PROMPTS = ["a red image", "a green image of a photo", "a blue image"]  # different lengths: left padding
# float32 rounding: a KV-cached step and one full forward sum in different orders, so logits differ by
# ~eps32 (1.2e-7) x the residual-stream magnitude (<= ~10 with a realistic adapter) per layer; CFG
# multiplies that by (1 + 2s) = 7 at s = 3. Measured <= 3e-6 over 12 adapter seeds; 1e-4 leaves a wide
# margin, while a wrong position, mask or distribution is off by O(1e-1..1). The adapter scale matters:
# B ~ N(0, 0.5^2) at LoRA scale alpha/r = 8 blows the residuals up to ~200 and the differences to ~1e-4.
TOL = 1e-4
ADAPTER_SCALE = 0.1


def lora(policy, seed=0):
    """A seeded LoRA adapter (r=4) with non-zero B, so it changes the outputs."""
    torch.manual_seed(seed)
    policy.add_lora(r=4)
    perturb_adapter(policy, scale=ADAPTER_SCALE, seed=seed)
    return policy


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    return build_tiny_emu3(tmp_path_factory.mktemp("models") / "tiny_emu3", seed=0)


@pytest.fixture()
def policy(emu3_dir, one_torch_thread):
    return Emu3Policy.from_pretrained(emu3_dir)


def full_vocab_constrained(pol, batch, cfg_scale):
    """Independent reference: HF forward over prompt + full layout, full-vocab logits, CFG over the whole
    vocabulary, then `allowed_tokens` as a -inf mask and a log-softmax. Returns the log-probs of every
    layout token under (guided, conditional, guided without the mask)."""
    from uniloop.policies.emu3 import positions_from_mask

    ids, mask = batch.prompt_ids, batch.prompt_mask
    B = ids.shape[0]
    layout = pol.layout(batch.image_tokens)
    if cfg_scale > 1:
        ids, mask = pol.cfg_inputs(ids, mask)
    rows = ids.shape[0]
    L = ids.shape[1]
    full = torch.cat([ids, layout.repeat(rows // B, 1)[:, :-1]], 1)
    fmask = torch.cat([mask, mask.new_ones(rows, layout.shape[1] - 1)], 1)
    with torch.no_grad():
        logits = pol.emu3(input_ids=full, attention_mask=fmask, position_ids=positions_from_mask(fmask)).logits
    logits = logits[:, L - 1:].float() / batch.temperature
    cond = logits[:B]
    guided = logits[B:] + cfg_scale * (cond - logits[B:]) if cfg_scale > 1 else cond
    allowed = torch.full_like(cond[0], float("-inf"))
    for t in range(layout.shape[1]):
        allowed[t, pol.allowed_tokens(t)] = 0.0
    pick = lambda x: torch.log_softmax(x, -1).gather(-1, layout.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    return pick(guided + allowed), pick(cond + allowed), pick(guided)


@pytest.mark.parametrize("cfg_scale", [3.0, 1.0])
def test_sampled_logprobs_equal_teacher_forced_under_the_constraint(policy, cfg_scale):
    lora(policy)
    batch = policy.sample_images(PROMPTS * 2, seeds=list(range(6)), cfg_scale=cfg_scale, temperature=0.9, top_k=40)
    assert batch.image_tokens.shape == (6, policy.num_image_tokens) == (6, 16)
    for mode in ("cfg", "conditional"):
        tf = policy.rollout_logprobs(batch, mode)
        assert tf.requires_grad, "teacher forcing must keep gradients for the update"
        diff = (tf.detach() - batch.logprobs(mode)).abs().max().item()
        assert diff <= TOL, f"{mode}: sampled vs teacher-forced log-probs differ by {diff}"
    if cfg_scale > 1:
        assert (batch.logprobs_cfg - batch.logprobs_cond).abs().max() > 1e-2  # genuinely different modes
    # the same numbers from the full vocabulary with an explicit -inf mask (top_k=40 < 64 codes only
    # touches the cfg mode, so compare it without top-k): forced tokens get log-prob exactly 0
    plain = policy.sample_images(PROMPTS, seeds=[7, 8, 9], cfg_scale=cfg_scale, temperature=0.9)
    ref_cfg, ref_cond, unmasked = full_vocab_constrained(policy, plain, cfg_scale)
    grid = policy.grid_index
    forced = torch.ones(policy.layout_length, dtype=torch.bool)
    forced[grid] = False
    assert (ref_cfg[:, forced] == 0).all() and (ref_cond[:, forced] == 0).all()
    assert (ref_cfg[:, grid] - plain.logprobs_cfg).abs().max() <= TOL
    assert (ref_cond[:, grid] - plain.logprobs_cond).abs().max() <= TOL
    # the constraint is not a no-op: unmasked, the model puts mass on non-visual tokens
    assert (unmasked[:, grid] - plain.logprobs_cfg).abs().mean() > 1e-2


def test_negative_prompt_is_the_unconditional_branch(emu3_dir, one_torch_thread):
    """CFG's second branch is the negative prompt through the same processor (same image header); a
    negative prompt longer than the prompts left-pads the conditional rows, which changes nothing."""
    neg = "a blue image of a photo with a color"
    pol = Emu3Policy.from_pretrained(emu3_dir, negative_prompt=neg)
    batch = pol.sample_images(PROMPTS[:2], seeds=[1, 2], cfg_scale=3.0)
    ids2, mask2 = pol.cfg_inputs(batch.prompt_ids, batch.prompt_mask)
    expect, _ = pol.encode_generation_prompts([neg])
    assert ids2.shape[1] == expect.shape[1] > batch.prompt_ids.shape[1]
    real = lambda ids, mask, i: ids[i][mask[i].bool()]  # noqa: E731
    assert all(torch.equal(real(ids2, mask2, i), real(batch.prompt_ids, batch.prompt_mask, i)) for i in (0, 1))
    assert all(torch.equal(real(ids2, mask2, i), expect[0]) for i in (2, 3))
    with torch.no_grad():
        for mode in ("cfg", "conditional"):
            assert (pol.rollout_logprobs(batch, mode) - batch.logprobs(mode)).abs().max() <= TOL
        plain = Emu3Policy.from_pretrained(emu3_dir)  # negative prompt "": the header alone
        assert (plain.rollout_logprobs(batch, "cfg") - batch.logprobs_cfg).abs().max() > 1e-2
        assert (plain.rollout_logprobs(batch, "conditional") - batch.logprobs_cond).abs().max() <= TOL


def test_sampled_layout_obeys_the_constraints_and_decodes(policy):
    batch = policy.sample_images(PROMPTS, seeds=[1, 2, 3], cfg_scale=2.0)
    codes = batch.image_tokens
    assert codes.min() >= 0 and codes.max() < len(policy.visual_ids)
    layout = policy.layout(codes)
    h, w = policy.grid
    assert layout.shape == (3, h * (w + 1) + 3)
    rows = layout[:, :h * (w + 1)].view(3, h, w + 1)
    assert (rows[:, :, w] == policy.eol_id).all(), "every row ends in EOL"
    assert torch.isin(rows[:, :, :w], policy.visual_ids).all(), "only visual tokens inside the grid"
    assert layout[:, -3:].tolist() == [[policy.eof_id, policy.eoi_id, policy.eos_id]] * 3
    for t in range(layout.shape[1]):
        assert set(layout[:, t].tolist()) <= set(policy.allowed_tokens(t))
    assert torch.equal(policy.codes_from_layout(layout), codes)
    # prompt = <bos> text <|image start|> h*w <|image token|>, written by the processor
    text = policy.tokenizer.convert_ids_to_tokens(batch.prompt_ids[0][batch.prompt_mask[0].bool()])
    assert text[-5:] == ["<|image start|>", str(h), "*", str(w), "<|image token|>"]
    # decode: codes or layout, (B, H, W, 3) in [0, 1], equal to HF's decode_image_tokens
    assert batch.images.shape == (3, 32, 32, 3) and 0 <= batch.images.min() and batch.images.max() <= 1
    assert torch.equal(policy.decode(layout), batch.images)
    hf = policy.emu3.decode_image_tokens(image_tokens=layout, height=h, width=w)
    assert torch.allclose((hf.permute(0, 2, 3, 1) * 0.5 + 0.5).clamp(0, 1), batch.images, atol=1e-6)
    # the palette VQ: code k decodes to a solid 8x8 patch of palette()[k]
    expect = palette()[codes].view(3, h, w, 3).repeat_interleave(8, 1).repeat_interleave(8, 2)
    assert (batch.images - expect).abs().max() < 1e-5


def test_greedy_cfg_layout_equals_hf_generate(policy):
    """HF generate with Emu3's own CFG (negative_prompt_ids + guidance_scale) and the layout as
    prefix_allowed_tokens_fn writes exactly the greedy layout of our sampler."""
    tok = policy.tokenizer
    neg_ids, neg_mask = policy.encode_generation_prompts([policy.negative_prompt])
    for prompt in ["a red image", "a yellow picture of the color yellow"]:
        ours = policy.sample_images([prompt], seeds=[0], cfg_scale=3.0, temperature=0)
        ids, mask = policy.encode_generation_prompts([prompt])
        L = ids.shape[1]
        out = policy.emu3.generate(
            ids, attention_mask=mask, max_new_tokens=policy.layout_length, do_sample=False, guidance_scale=3.0,
            negative_prompt_ids=neg_ids, negative_prompt_attention_mask=neg_mask, pad_token_id=tok.pad_token_id,
            prefix_allowed_tokens_fn=lambda b, seq: policy.allowed_tokens(seq.shape[0] - L))
        assert torch.equal(out[:, L:].cpu(), policy.layout(ours.image_tokens)), prompt


def test_sampling_is_seeded_per_sample(policy):
    a = policy.sample_images(["a red image", "a blue image"], seeds=[11, 12], cfg_scale=3.0)
    b = policy.sample_images(["a blue image of a photo", "a blue image", "a red image", "a red image"],
                             seeds=[5, 12, 11, 99], cfg_scale=3.0)
    assert torch.equal(a.image_tokens[0], b.image_tokens[2]) and torch.equal(a.image_tokens[1], b.image_tokens[1])
    assert not torch.equal(b.image_tokens[2], b.image_tokens[3])
    again = policy.sample_images(["a red image", "a blue image"], seeds=[11, 12], cfg_scale=3.0)
    assert torch.equal(again.image_tokens, a.image_tokens) and torch.equal(again.logprobs_cfg, a.logprobs_cfg)


def test_reference_is_the_base_model(emu3_dir, policy):
    base = policy.sample_images(PROMPTS, seeds=[3, 4, 5], cfg_scale=3.0)
    lora(policy)
    images = solid_color_images(["red", "blue"], policy.image_size)
    with torch.no_grad():
        with policy.reference():
            ref = policy.rollout_logprobs(base, "cfg")
            ref_yes = policy.yes_probability(images, ["is this red?"] * 2)
        pol = policy.rollout_logprobs(base, "cfg")
        pol_yes = policy.yes_probability(images, ["is this red?"] * 2)
    plain = Emu3Policy.from_pretrained(emu3_dir)
    assert (ref - base.logprobs_cfg).abs().max() <= TOL
    assert torch.allclose(ref_yes, plain.yes_probability(images, ["is this red?"] * 2), atol=1e-6)
    assert (pol - ref).abs().max() > 1e-2 and (pol_yes - ref_yes).abs().max() > 1e-4


def test_lora_step_moves_the_adapter_only(policy):
    torch.manual_seed(0)
    policy.add_lora(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")  # the Janus-style default
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert names and all(".text_model." in n and "lora_" in n for n in names)
    assert not any("vqmodel" in n and "lora_" in n for n, _ in policy.model.named_parameters())
    named = dict(policy.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    batch = policy.sample_images(PROMPTS, seeds=[1, 2, 3], cfg_scale=3.0)
    images = solid_color_images(["red", "green"], policy.image_size)
    text = policy.answer(images, ["what color is this image?"] * 2, seeds=[1, 2], max_new_tokens=3)
    loss = -policy.rollout_logprobs(batch, "cfg").mean() - policy.text_logprobs(text).sum()
    loss.backward()
    opt.step()
    frozen = [n for n in named if "lora_" not in n]
    assert all(torch.equal(before[n], named[n]) for n in frozen), "base weights (LM and VQ) must stay frozen"
    assert any(not torch.equal(before[n], named[n]) for n in names), "the adapter must move"


def test_adapter_round_trip(emu3_dir, tmp_path):
    pol = lora(Emu3Policy.from_pretrained(emu3_dir), seed=3)
    pol.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    batch = pol.sample_images(PROMPTS, seeds=[5, 6, 7], cfg_scale=3.0)
    fresh = Emu3Policy.from_pretrained(emu3_dir).load_adapter(tmp_path / "adapter")
    other = Emu3Policy.from_pretrained(emu3_dir).add_lora(r=4)
    other.set_adapter_state_dict(pol.adapter_state_dict(), version=5)
    weights = Emu3Policy.from_pretrained(emu3_dir).add_lora(r=4)
    weights.load_adapter_weights(tmp_path / "adapter", version=2)
    with torch.no_grad():
        a = pol.rollout_logprobs(batch, "cfg")
        lps = [p.rollout_logprobs(batch, "cfg") for p in (fresh, other, weights)]
        base = Emu3Policy.from_pretrained(emu3_dir).rollout_logprobs(batch, "cfg")
    assert all(torch.equal(a, b) for b in lps)
    assert (other.version, weights.version) == (5, 2)
    assert (a - base).abs().max() > 1e-2, "the adapter must matter, or this test proves nothing"
    again = fresh.sample_images(PROMPTS, seeds=[5, 6, 7], cfg_scale=3.0)
    assert torch.equal(again.image_tokens, batch.image_tokens)


def test_batches_select_concat_and_the_rollout_worker(policy):
    import uniloop.rollouts.worker as W

    if hasattr(W, "Sampling"):  # the refactored worker: sampling settings instead of the rollout config
        settings = W.Sampling(image=dict(cfg_scale=2.0, temperature=1.0, top_k=0), text=dict(max_new_tokens=4),
                              batch_size=3)
    else:
        class settings:  # noqa: N801  (the rollout config section the worker reads)
            cfg_scale, temperature, top_k, max_new_tokens, batch_size, sampler = 2.0, 1.0, 0, 4, 3, "auto"
    RolloutRequest = W.RolloutRequest
    worker = W.RolloutWorker(policy, settings, seed=0, shares_learner_policy=True)
    img = worker.generate(RolloutRequest("image", ["a red image", "a green image of a photo"], 3, step=1,
                                         targets=["red", "green"]))
    assert isinstance(img, ImageRollout) and len(img) == 6 and img.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        lp = policy.rollout_logprobs(img, "cfg")
        assert (lp - img.logprobs_cfg).abs().max() <= TOL  # re-padded across forward batches
        sel = img.select([4, 1])
        assert torch.allclose(policy.rollout_logprobs(sel, "cfg"), lp[[4, 1]], atol=TOL)
        cat = ImageRollout.concat([img.select([0, 1]), img.select([5])])
        assert torch.allclose(policy.rollout_logprobs(cat, "cfg"), lp[[0, 1, 5]], atol=TOL)
    images = solid_color_images(["red", "blue"], policy.image_size)
    txt = worker.generate(RolloutRequest("text", ["what color is this image?", "is it blue?"], 2, step=1,
                                         targets=["red", "blue"], images=images))
    assert isinstance(txt, TextRollout) and len(txt) == 4
    both = TextRollout.concat([txt.select([0, 1]), txt.select([2, 3])])
    with torch.no_grad():
        assert (policy.text_logprobs(both) - txt.logprobs_sampled).abs().max() <= TOL


def test_understanding_round_trip(policy):
    lora(policy, seed=1)
    images = solid_color_images(["red", "green", "blue", "yellow"], policy.image_size)
    qs = ["what color is this image?", "what color is this?", "is this red?", "what color is it?"]
    batch = policy.answer(images, qs, seeds=[1, 2, 3, 4], max_new_tokens=5, temperature=1.0)
    tf = policy.text_logprobs(batch)
    assert tf.requires_grad and (tf.detach() - batch.logprobs_sampled).abs().max() <= TOL
    assert (batch.answer_mask.sum(1) >= 1).all() and len(batch.answers) == 4
    bad = set(policy.tokenizer.all_special_ids) | set(policy.visual_ids.tolist())
    bad.discard(policy.eos_id)
    assert not bad & set(batch.answer_ids[batch.answer_mask.bool()].tolist())
    # the processor's expansion with the placeholders replaced by the image's VQ tokens (rows + EOL)
    h, w = policy.grid
    ids = batch.prompt_ids[0]
    start = (ids == policy.tokenizer.convert_tokens_to_ids("<|image token|>")).nonzero()[0, 0] + 1
    img_ids = ids[start:start + h * (w + 1)].view(h, w + 1)
    assert (img_ids[:, w] == policy.eol_id).all()
    assert ids[start + h * (w + 1)] == policy.eof_id and policy.processor.image_token_id not in ids.tolist()
    assert torch.equal(policy.codes_from_layout(torch.cat([img_ids.flatten(), ids.new_zeros(3)])[None])[0],
                       policy.encode_images(images[:1])[0])
    # different colors give different image tokens, so the understanding task is learnable
    codes = policy.encode_images(solid_color_images(list(COLORS), policy.image_size))
    assert len({tuple(c.tolist()) for c in codes}) == len(COLORS)
    p = policy.yes_probability(images, ["does this image show red? answer yes or no."] * 4)
    assert p.shape == (4,) and ((p > 0) & (p < 1)).all()
    with torch.no_grad():
        ids, mask, _ = policy.encode_questions(images[:1], ["does this image show red? answer yes or no."])
        logits = policy.emu3(input_ids=ids, attention_mask=mask).logits[0, -1]
    yes, no = policy.tokenizer.convert_tokens_to_ids(["yes", "no"])
    assert torch.allclose(p[0], torch.sigmoid(logits[yes] - logits[no]), atol=1e-5)


def test_tiny_build_is_fast_atomic_and_reused(tmp_path):
    t = time.perf_counter()
    path = build_tiny_emu3(tmp_path / "m", seed=1)
    assert time.perf_counter() - t < 5.0
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_emu3(tmp_path / "m", seed=1) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp, "same spec: re-used, not rebuilt"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dir left behind"
    build_tiny_emu3(tmp_path / "m", seed=2)  # other settings replace it
    pol = Emu3Policy.from_pretrained(path)
    assert (pol.grid, pol.image_size, pol.num_image_tokens) == ((4, 4), 32, 16)
    with pytest.raises(ValueError, match="unknown tiny-Emu3 option"):
        build_tiny_emu3(tmp_path / "x", hidden=3)
