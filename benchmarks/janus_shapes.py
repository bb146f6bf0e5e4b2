"""Janus-Pro-shaped models with random weights, built in memory (no downloads), for the benchmarks.

Only the shapes matter for speed and memory: the language model, generation head/embeddings and
VQ model follow Janus-Pro-1B / -7B; the tokenizer is the tiny word-level one from
`uniloop.policies.tiny` (prompt token ids are small integers, which the 102400-entry embedding
table accepts).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
import sys
import tempfile
from pathlib import Path

import torch

SHAPES = {
    # Janus-Pro-1B / -7B language models (Llama, no grouped KV heads) and their projection widths.
    "1b": dict(hidden=2048, layers=24, heads=16, inter=5632, vocab=102400, image_size=384, patch=16),
    "7b": dict(hidden=4096, layers=30, heads=32, inter=11008, vocab=102400, image_size=384, patch=16),
    # CPU smoke test of the scripts themselves.
    "tiny": dict(hidden=64, layers=2, heads=4, inter=128, vocab=256, image_size=32, patch=8),
}


def ensure_uniloop_importable():
    """Make `import uniloop.policies` work from a bare checkout (e.g. on a GPU box without an install)."""
    try:
        import uniloop.policies  # noqa: F401
        return
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[1]
    shim = Path(tempfile.mkdtemp(prefix="uniloop_shim_")) / "uniloop"
    shim.mkdir()
    (shim / "__init__.py").write_text("")
    for d in ("policies", "rl", "rollouts", "rewards", "configs"):
        (shim / d).symlink_to(root / d)
    sys.path.insert(0, str(shim.parent))
    import uniloop.policies  # noqa: F401


def janus_config(shape: str, tokenizer):
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    s = SHAPES[shape]
    text = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["heads"], max_position_embeddings=16384, rms_norm_eps=1e-6,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    n_img = (s["image_size"] // s["patch"]) ** 2
    if shape == "tiny":
        vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=s["image_size"], patch_size=s["patch"], num_image_tokens=n_img,
                                   projection_dim=s["hidden"], mlp_ratio=2.0)
        vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                              channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=s["hidden"],
                              image_token_embed_dim=s["hidden"])
    else:  # SigLIP-L/16 at 384 px and the 16384-code VQ of the real models
        vision = JanusVisionConfig(projection_dim=s["hidden"])
        vq = JanusVQVAEConfig(projection_dim=s["hidden"], image_token_embed_dim=s["hidden"])
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))


def build_random_policy(shape: str, device: str = "cuda", dtype=torch.bfloat16, seed: int = 0):
    """A JanusPolicy of the given shape with random weights, created directly on `device` in `dtype`."""
    ensure_uniloop_importable()
    from transformers import JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor

    from uniloop.policies.janus import JanusPolicy
    from uniloop.policies.tiny import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    cfg = janus_config(shape, tok)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained(dtype=...) does while building
    try:
        with torch.device(device):
            model = JanusForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    s = SHAPES[shape]
    processor = JanusProcessor(
        image_processor=JanusImageProcessor(size={"height": s["image_size"], "width": s["image_size"]}),
        tokenizer=tok, chat_template=CHAT_TEMPLATE, num_image_tokens=(s["image_size"] // s["patch"]) ** 2)
    return JanusPolicy(model, processor, device=device, dtype=dtype)


PROMPT_WORDS = ("a red image", "a picture of a green and blue photo", "the color yellow",
                "an image that shows one white and black picture with cyan", "magenta")


def prompts_for(batch: int, padded: bool = True) -> list[str]:
    """`batch` prompts; padded=True mixes lengths (left padding + attention mask), False repeats one."""
    if not padded:
        return ["a picture of a green and blue photo"] * batch
    return [PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(batch)]


def environment() -> dict:
    def ver(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__,
           "transformers": ver("transformers"), "peft": ver("peft"), "bitsandbytes": ver("bitsandbytes"),
           "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    return env


def measure_bandwidth_GBps(device="cuda", gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy bandwidth, counting bytes read + written (the bandwidth-floor denominator)."""
    n = int(gib * 2**30) // 2
    a = torch.randn(n, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / seconds / 1e9
