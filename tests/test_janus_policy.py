"""The Janus policy: sampled log-probs vs teacher forcing, HF generate parity, LoRA, save/load."""
import torch
from conftest import perturb_adapter

from uniloop.policies.janus import JanusPolicy
from uniloop.policies.tiny import solid_color_images

PROMPTS = ["a red image", "a green image of a photo", "a blue image"]  # different lengths: left padding


def test_sampled_logprobs_equal_teacher_forced_in_both_modes(tiny_policy):
    tiny_policy.add_lora(r=4)
    perturb_adapter(tiny_policy)
    batch = tiny_policy.sample_images(PROMPTS * 2, seeds=list(range(6)), cfg_scale=4.0, temperature=0.9, top_k=40)
    assert batch.image_tokens.shape == (6, tiny_policy.num_image_tokens)
    assert batch.images.shape[0] == 6 and batch.images.shape[-1] == 3
    assert 0 <= batch.images.min() and batch.images.max() <= 1
    for mode in ("cfg", "conditional"):
        tf = tiny_policy.rollout_logprobs(batch, mode)
        assert tf.requires_grad, "teacher forcing must keep gradients for the update"
        diff = (tf.detach() - batch.logprobs(mode)).abs().max().item()
        # float32 rounding of an incremental (KV-cached) vs a full forward, amplified by CFG (the
        # guided logit is (1 + s) * cond - s * uncond): typically 2e-5..4e-5, 1.5e-4 seen once; a wrong
        # position or distribution gives differences of order 1
        assert diff <= 5e-4, f"{mode}: sampled vs teacher-forced log-probs differ by {diff}"
    # the two modes are genuinely different distributions
    assert (batch.logprobs_cfg - batch.logprobs_cond).abs().max() > 1e-2


def test_sampling_is_seeded_per_sample(tiny_policy):
    a = tiny_policy.sample_images(["a red image", "a blue image"], seeds=[11, 12], cfg_scale=3.0)
    b = tiny_policy.sample_images(["a blue image", "a red image", "a red image"], seeds=[12, 11, 99], cfg_scale=3.0)
    # a sample's tokens depend on its prompt and seed only, not on its batch
    assert torch.equal(a.image_tokens[0], b.image_tokens[1])
    assert torch.equal(a.image_tokens[1], b.image_tokens[0])
    assert not torch.equal(b.image_tokens[1], b.image_tokens[2])


def test_greedy_cfg_tokens_equal_hf_generate(tiny_policy):
    from transformers import GenerationConfig

    tok = tiny_policy.tokenizer
    for prompt in ["a red image", "a yellow picture of the color yellow"]:
        ours = tiny_policy.sample_images([prompt], seeds=[0], cfg_scale=5.0, temperature=0)
        ids, mask = tiny_policy.encode_generation_prompts([prompt])
        gc = GenerationConfig(do_sample=False, guidance_scale=5.0, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id,
                              generation_kwargs={"boi_token_id": tok.convert_tokens_to_ids(tok.boi_token)})
        hf = tiny_policy.janus.generate(ids, attention_mask=mask, generation_mode="image", generation_config=gc)
        assert torch.equal(hf.cpu(), ours.image_tokens), prompt


def test_understanding_logprobs_and_yes_probability(tiny_policy):
    tiny_policy.add_lora(r=4)
    perturb_adapter(tiny_policy, seed=1)
    images = solid_color_images(["red", "green", "blue", "yellow"], tiny_policy.image_size)
    qs = ["what color is this image?", "what color is this?", "is this red?", "what color is it?"]
    batch = tiny_policy.answer(images, qs, seeds=[1, 2, 3, 4], max_new_tokens=5, temperature=1.0)
    assert batch.answer_ids.shape[0] == 4 and len(batch.answers) == 4
    tf = tiny_policy.text_logprobs(batch)
    assert (tf.detach() - batch.logprobs_sampled).abs().max() <= 1e-4
    assert (batch.answer_mask.sum(1) >= 1).all()
    special = set(tiny_policy.tokenizer.all_special_ids) - {tiny_policy.tokenizer.eos_token_id}
    real = batch.answer_ids[batch.answer_mask.bool()].tolist()
    assert not special & set(real), "answers never contain special tokens other than EOS"
    p = tiny_policy.yes_probability(images, ["does this image show red? answer yes or no."] * 4)
    assert p.shape == (4,) and ((p > 0) & (p < 1)).all()
    # independent computation from the full logits
    ids, mask, px = tiny_policy.encode_questions(images[:1], ["does this image show red? answer yes or no."])
    logits = tiny_policy.janus(input_ids=ids, pixel_values=px, attention_mask=mask).logits[0, -1]
    yes, no = tiny_policy.tokenizer.convert_tokens_to_ids(["yes", "no"])
    expect = logits[yes].exp() / (logits[yes].exp() + logits[no].exp())
    assert torch.allclose(p[0], expect, atol=1e-5)


def test_padded_answer_positions_give_zero_logprob_and_finite_gradients(tiny_policy):
    """An answer that ended early is padded with a token the sampler never emits (its logit is -inf):
    the teacher-forced log-prob there must be 0, not -inf * 0 = NaN, or the whole loss turns NaN."""
    tiny_policy.add_lora(r=4)
    perturb_adapter(tiny_policy, seed=2)
    images = solid_color_images(["red", "blue"], tiny_policy.image_size)
    batch = tiny_policy.answer(images, ["what color is this image?"] * 2, seeds=[5, 6], max_new_tokens=4)
    tok = tiny_policy.tokenizer
    batch.answer_ids[0, 1], batch.answer_ids[0, 2:] = tok.eos_token_id, tok.pad_token_id  # ended at step 2
    batch.answer_mask[0, 2:] = 0
    lp = tiny_policy.text_logprobs(batch)
    assert torch.isfinite(lp).all() and (lp[0, 2:] == 0).all() and (lp[0, :2] < 0).all()
    lp.sum().backward()
    grads = [p.grad for p in tiny_policy.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_local_checkpoint_loads_through_the_hub_code_path(tiny_janus_dir, tmp_path):
    """save_pretrained -> from_pretrained(local dir) is the same call a hub id takes."""
    a = JanusPolicy.from_pretrained(tiny_janus_dir)
    a.janus.save_pretrained(tmp_path / "copy")
    a.processor.save_pretrained(tmp_path / "copy")
    b = JanusPolicy.from_pretrained(str(tmp_path / "copy"))
    ra = a.sample_images(PROMPTS, seeds=[1, 2, 3], cfg_scale=2.0)
    rb = b.sample_images(PROMPTS, seeds=[1, 2, 3], cfg_scale=2.0)
    assert torch.equal(ra.image_tokens, rb.image_tokens)
    assert torch.equal(ra.logprobs_cfg, rb.logprobs_cfg)


def test_saved_adapter_reloads_with_peft_on_a_fresh_base(tiny_janus_dir, tmp_path):
    from peft import PeftModel

    pol = JanusPolicy.from_pretrained(tiny_janus_dir).add_lora(r=4)
    perturb_adapter(pol, seed=3)
    pol.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    batch = pol.sample_images(PROMPTS, seeds=[5, 6, 7], cfg_scale=3.0)
    fresh = JanusPolicy.from_pretrained(tiny_janus_dir)
    fresh.model = PeftModel.from_pretrained(fresh.model, str(tmp_path / "adapter"))
    with torch.no_grad():
        a = pol.rollout_logprobs(batch, "cfg")
        b = fresh.rollout_logprobs(batch, "cfg")
        base = JanusPolicy.from_pretrained(tiny_janus_dir).rollout_logprobs(batch, "cfg")
    assert torch.equal(a, b)
    assert (a - base).abs().max() > 1e-3, "the adapter must matter, or this test proves nothing"


def test_lora_targets_language_model_only(tiny_policy):
    tiny_policy.add_lora(r=4)
    names = [n for n, p in tiny_policy.model.named_parameters() if p.requires_grad]
    assert names and all("language_model" in n and "lora_" in n for n in names)


def test_reference_context_disables_the_adapter(tiny_policy):
    base = tiny_policy.sample_images(["a red image"], seeds=[3], cfg_scale=3.0)
    tiny_policy.add_lora(r=4)
    perturb_adapter(tiny_policy)
    with torch.no_grad():
        with tiny_policy.reference():
            ref = tiny_policy.rollout_logprobs(base, "cfg")
        pol = tiny_policy.rollout_logprobs(base, "cfg")
    assert torch.allclose(ref, base.logprobs_cfg, atol=1e-5)
    assert (pol - ref).abs().max() > 1e-3
