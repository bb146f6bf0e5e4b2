"""`uniloop export`: merged Janus and SD3 checkpoints load in plain transformers / diffusers and give the
log-probs / images of policy + adapter (1e-5); the adapter alone; hub push dry-run; exit-2 errors."""
import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import perturb_adapter

from uniloop.policies.registry import build_policy
from uniloop.rl.checkpoint import save_checkpoint
from uniloop.rl.cli import main as cli
from uniloop.rl.config import load_config, save_config
from uniloop.rl.trainer import policy_spec

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # merged W + s*B@A vs the LoRA forward W x + s*B(A x): float32 reassociation only


def fake_run(tmp_path, recipe, overrides, section, seed=0, scale=0.3):
    """A run directory as `uniloop train` leaves it: config.yaml and a complete checkpoint whose adapter
    moves the outputs (random B)."""
    run = tmp_path / "run"
    cfg = load_config(REPO / "configs" / recipe, [f"output_dir={run}", *overrides])
    torch.manual_seed(seed)
    policy = build_policy(policy_spec(cfg, section))
    perturb_adapter(policy, scale=scale, seed=seed)
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_checkpoint(run, 3, policy, {"version": 3})
    policy.model.eval()
    return run, policy


def lora_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    keys = []
    for f in path.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys += [k for k in st.keys() if "lora" in k.lower()]
    return keys


@torch.no_grad()
def test_merged_janus_loads_in_plain_transformers_with_the_same_logprobs(tmp_path, tiny_janus_dir):
    from transformers import JanusForConditionalGeneration, JanusProcessor

    from uniloop.policies.janus import JanusPolicy

    run, policy = fake_run(tmp_path, "quickstart.yaml", [f"model.name_or_path={tiny_janus_dir}"], "model", scale=0.1)
    out = tmp_path / "merged"
    assert cli(["export", str(run / "checkpoints" / "step_000003"), "--out", str(out)]) == 0
    assert lora_keys(out) == [] and not (out / "adapter_config.json").exists()
    plain = JanusPolicy(JanusForConditionalGeneration.from_pretrained(out).eval(), JanusProcessor.from_pretrained(out))
    base = JanusPolicy.from_pretrained(tiny_janus_dir)
    prompts = ["a red image", "a blue image"]
    ids, mask = policy.encode_generation_prompts(prompts)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, policy.codebook_size, (2, policy.num_image_tokens), generator=g)
    s = 3.0
    # conditional: 1e-5; CFG: the guided logits u + s(c - u) scale each branch's rounding by up to 2s + 1
    for mode, tol in (("conditional", TOL), ("cfg", TOL * (2 * s + 1))):
        want = policy.image_logprobs(ids, mask, tokens, mode=mode, cfg_scale=s)
        got = plain.image_logprobs(ids, mask, tokens, mode=mode, cfg_scale=s)
        assert (got - want).abs().max().item() <= tol, mode
        # the adapter matters: without it the log-probs are far from these
        assert (base.image_logprobs(ids, mask, tokens, mode=mode, cfg_scale=s) - want).abs().max().item() > 1e-2
    # understanding: the answers' log-probs too (the LoRA covers the shared language model)
    images = torch.rand(2, policy.image_size, policy.image_size, 3, generator=g)
    q = ["What color is this image? Answer in one word."] * 2
    assert torch.allclose(plain.yes_probability(images, q), policy.yes_probability(images, q), atol=TOL, rtol=0)


@torch.no_grad()
def test_merged_sd3_loads_in_plain_diffusers_with_the_same_images(tmp_path, tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    from uniloop.policies.flow import FlowPolicy

    run, policy = fake_run(tmp_path, "flow_grpo_quickstart.yaml", [f"flow.name_or_path={tiny_sd3_dir}"], "flow",
                           scale=0.05)
    out = tmp_path / "merged_sd3"
    assert cli(["export", str(run), "--out", str(out)]) == 0  # a run directory: its latest checkpoint
    assert lora_keys(out) == []
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    plain = FlowPolicy(pipe, max_sequence_length=policy.max_sequence_length)
    kw = dict(num_steps=4, cfg_scale=2.0, noise_level=0.7)
    prompts, seeds = ["a red image", "a green image"], [5, 6]
    want = policy.sample_images(prompts, seeds, **kw)
    got = plain.sample_images(prompts, seeds, **kw)
    assert (got.images - want.images).abs().max().item() <= TOL
    assert (got.latents - want.latents).abs().max().item() <= TOL
    with policy.reference():
        ref = policy.sample_images(prompts, seeds, **kw)
    assert (ref.images - want.images).abs().max().item() > 1e-3, "the adapter must change the images"


def test_adapter_only_and_push_dry_run(tmp_path, tiny_janus_dir, capsys, monkeypatch):
    import huggingface_hub

    run, _ = fake_run(tmp_path, "quickstart.yaml", [f"model.name_or_path={tiny_janus_dir}"], "model")
    out = tmp_path / "adapter"

    def no_network(*a, **k):
        raise AssertionError("a dry run must not reach the hub")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    assert cli(["export", str(run), "--out", str(out), "--adapter-only", "--push-to-hub", "me/janus-lora",
                "--dry-run"]) == 0
    src = run / "checkpoints" / "step_000003" / "adapter"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert (out / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()
    text = capsys.readouterr().out
    assert "would upload" in text and "https://huggingface.co/me/janus-lora" in text
    assert "adapter_model.safetensors" in text and "adapter_config.json" in text


def test_export_errors_exit_2(tmp_path, capsys):
    assert cli(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such run or checkpoint" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep")
    assert cli(["export", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "o" / "x").exists()
    assert cli(["export", str(tmp_path), "--out", str(tmp_path / "p"), "--dry-run"]) == 2
