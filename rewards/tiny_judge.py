"""A tiny, real VLM judge built offline: a Qwen2.5-VL with a few hundred thousand weights.

`build_tiny_vlm_judge(dir)` writes a `Qwen2_5_VLForConditionalGeneration` checkpoint (model,
byte-level BPE tokenizer, image/video processors, chat template) with `save_pretrained`, so the
tests and the quickstart load it through exactly the `from_pretrained` path a hub id such as
`CodeGoat24/UnifiedReward-qwen-7b` takes, locally or behind `uniloop serve-judge`.

A random tiny VLM writes garbage, which exercises the invalid path but nothing else. So, like the
tiny Janus VQ, the judge is *fitted* (teacher forcing on our default templates, the loss on the
verdict tokens only) towards grading the synthetic color task in all four modes:

- generation pointwise: `Final Score: k`, k = 1 + round(4 * r) where r = 1 - mean pixel distance
  to the color named in the caption / sqrt(3) (the `color` reward, quantised to 1..5);
- generation pairwise: `Image 1 is better` / `Image 2 is better` (higher r wins);
- understanding pointwise: `Final Score: 100` if the answer names the image's color, else 0;
- understanding pairwise: `Answer 1 is better` / `Answer 2 is better` (the correct one wins).

What the default budget (60 steps, ~15 s on 2 busy CPU cores) buys, measured on 192 fresh
requests: 100% well-formed verdicts in every mode, but grades near chance (a 2-layer, 64-wide
model does not learn to bind the caption's color to the image's in that budget, nor in 1500
steps). So it is a real model with learnt weights whose verdicts come from its forward pass and
go through the real parsing path, not a grader to learn from. `fit_steps: 0` keeps it random
(garbage text: every verdict unparseable). The result is cached by `path` + settings.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from ..policies.tiny import COLORS, built_with, palette, publish_build
from .judge_backends import (COT_SUFFIX, DEFAULT_TEMPLATES, JudgeRequest, default_template, fill_template,
                             request_to_messages)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]

# Qwen's chat layout; images become <|vision_start|><|image_pad|><|vision_end|> (the processor
# expands <|image_pad|> to one token per merged patch).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_JUDGE_DEFAULTS = dict(hidden_size=64, num_layers=2, num_heads=4, vision_hidden=32, image_size=32,
                           patch_size=8, vocab_size=640, fit_steps=60, fit_batch=16, lr=1e-2)

CAPTIONS = ["a {c} image", "a {c} picture", "an image that is {c}", "a photo of something {c}"]
QUESTIONS = ["What color is this image?", "What color is this image? Answer in one word.",
             "Which color does the picture show?"]
FILLER = "a an the image picture of with and is this that what color does show yes no".split()


def default_tiny_judge_dir() -> Path:
    """$UNILOOP_CACHE/tiny_vlm_judge (default ~/.cache/uniloop/tiny_vlm_judge)."""
    return Path(os.environ.get("UNILOOP_CACHE", Path.home() / ".cache" / "uniloop")) / "tiny_vlm_judge"


def _corpus() -> list[str]:
    lines = list(DEFAULT_TEMPLATES.values()) + [COT_SUFFIX]
    for c in COLORS:
        lines += [t.format(c=c) for t in CAPTIONS] + [f"The answer is {c}."]
    lines += QUESTIONS + ["Final Score: %d" % k for k in range(101)]
    lines += [f"{s} {k} is better" for s in ("Image", "Answer") for k in (1, 2)]
    lines += ["<think>", "</think>", "<answer>", "</answer>", " ".join(FILLER)]
    return lines * 4


def build_tokenizer(vocab_size: int):
    """A byte-level BPE (as Qwen's): every string round-trips, our templates compress well."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def build_processor(tokenizer, image_size: int, patch_size: int):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    px = image_size * image_size  # every image is resized to image_size^2 pixels
    kw = dict(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=px, max_pixels=px, **kw),
        video_processor=Qwen2VLVideoProcessor(**kw), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_tiny_vlm_judge(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write (once) a fitted tiny Qwen2.5-VL judge to `path` and return the path."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    unknown = set(overrides) - set(TINY_JUDGE_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tiny judge option(s) {sorted(unknown)}; known: {sorted(TINY_JUDGE_DEFAULTS)}")
    spec = {**TINY_JUDGE_DEFAULTS, **overrides, "seed": seed, "format": 1}
    path = Path(path)
    if built_with(path, "uniloop_tiny_judge.json", spec):
        return path

    tokenizer = build_tokenizer(spec["vocab_size"])
    processor = build_processor(tokenizer, spec["image_size"], spec["patch_size"])
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    h, heads = spec["hidden_size"], spec["num_heads"]
    half = h // heads // 2  # mrope splits each head's rotary half into (time, height, width)
    section = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h,
                         num_hidden_layers=spec["num_layers"], num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=4096, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}),
        vision_config=dict(depth=2, hidden_size=spec["vision_hidden"], intermediate_size=2 * spec["vision_hidden"],
                           num_heads=2, patch_size=spec["patch_size"], spatial_merge_size=2, temporal_patch_size=2,
                           window_size=2 * spec["patch_size"], out_hidden_size=h, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    fit_color_judge(model, processor, steps=spec["fit_steps"], batch=spec["fit_batch"], lr=spec["lr"], seed=seed)

    return publish_build(path, "uniloop_tiny_judge.json", spec, model, processor)


# ----------------------------------------------------------------------------- fitting
def color_match(image: torch.Tensor, color: str) -> float:
    """The `color` reward: 1 - mean pixel distance to the named color / sqrt(3), in [0, 1]."""
    return float(1 - (image - torch.tensor(COLORS[color])).norm(dim=-1).mean() / 3 ** 0.5)


def _random_image(rng: random.Random, target: str) -> torch.Tensor:
    """An 8x8 image like the tiny Janus draws: a 4x4 grid of 2x2 palette patches, sometimes solid,
    sometimes mostly the target color."""
    pal = palette()
    kind = rng.random()
    if kind < 0.35:  # solid, target or another named color
        name = target if rng.random() < 0.5 else rng.choice(list(COLORS))
        grid = torch.tensor(COLORS[name]).expand(4, 4, 3).clone()
    else:
        share = 0.0 if kind < 0.55 else rng.random()
        grid = torch.stack([torch.tensor(COLORS[target]) if rng.random() < share else pal[rng.randrange(len(pal))]
                            for _ in range(16)]).view(4, 4, 3)
    return grid.repeat_interleave(2, 0).repeat_interleave(2, 1)


def _wrong_answer(rng: random.Random, color: str) -> str:
    if rng.random() < 0.6:
        return rng.choice([c for c in COLORS if c != color])
    return " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 4)))


def color_judge_example(rng: random.Random) -> tuple[list, str]:
    """(request content, target verdict) for one random mode, using our default templates."""
    mode = rng.choice(["generation_pointwise", "generation_pairwise", "understanding_pointwise",
                       "understanding_pairwise"])
    t = default_template(mode)
    color = rng.choice(list(COLORS))
    if mode == "generation_pointwise":
        img = _random_image(rng, color)
        k = 1 + round(4 * color_match(img, color))
        return fill_template(t, [img], prompt=rng.choice(CAPTIONS).format(c=color), low="1", high="5"), \
            f"Final Score: {k}"
    if mode == "generation_pairwise":
        while True:
            a, b = _random_image(rng, color), _random_image(rng, color)
            ra, rb = color_match(a, color), color_match(b, color)
            if abs(ra - rb) > 0.05:
                break
        return fill_template(t, [a, b], prompt=rng.choice(CAPTIONS).format(c=color)), \
            f"Image {1 if ra > rb else 2} is better"
    img = torch.tensor(COLORS[color]).expand(8, 8, 3).clone()
    right = color if rng.random() < 0.5 else f"{rng.choice(['', 'it is ', 'the image is '])}{color}".strip()
    q = rng.choice(QUESTIONS)
    if mode == "understanding_pointwise":
        good = rng.random() < 0.5
        return fill_template(t, [img], question=q, answer=right if good else _wrong_answer(rng, color),
                             low="0", high="100"), f"Final Score: {100 if good else 0}"
    first_good = rng.random() < 0.5
    wrong = _wrong_answer(rng, color)
    a1, a2 = (right, wrong) if first_good else (wrong, right)
    return fill_template(t, [img], question=q, answer1=a1, answer2=a2), f"Answer {1 if first_good else 2} is better"


def fit_color_judge(model, processor, steps: int = 60, batch: int = 16, lr: float = 1e-2, seed: int = 0):
    """Teacher-forced fitting on (request, verdict) pairs; the loss covers the verdict tokens only."""
    if steps <= 0:
        return None
    rng = random.Random(seed)
    tok = processor.tokenizer
    threads = torch.get_num_threads()
    # Ops this small run fastest on one thread; extra threads only fight over shared cores.
    torch.set_num_threads(1)
    try:
        return _fit(model, processor, tok, rng, steps, batch, lr)
    finally:
        torch.set_num_threads(threads)


def _fit(model, processor, tok, rng, steps, batch, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    with torch.enable_grad():
        for _ in range(steps):
            examples = [color_judge_example(rng) for _ in range(batch)]
            convs = [request_to_messages(JudgeRequest(c)) for c, _ in examples]
            texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) + v + tok.eos_token
                     for (m, _), (_, v) in zip(convs, examples)]
            enc = processor(text=texts, images=[im for _, im in convs], padding=True, return_tensors="pt")
            labels = torch.full_like(enc["input_ids"], -100)
            for i, (_, v) in enumerate(examples):
                n = len(tok(v + tok.eos_token, add_special_tokens=False)["input_ids"])
                labels[i, -n:] = enc["input_ids"][i, -n:]  # left padding: the verdict ends every row
            loss = model(**enc, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()
    return float(loss.detach())
