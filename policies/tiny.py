"""Tiny, real Janus checkpoints built offline from config.

The quickstart and the tests use these: a `JanusForConditionalGeneration` with a few hundred
thousand random weights, a word-level tokenizer built with `tokenizers`, and a `JanusProcessor`,
all written with `save_pretrained` so that they are loaded back through exactly the
`from_pretrained` path a hub id such as `deepseek-community/Janus-Pro-1B` takes.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

COLORS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}

# Janus-Pro's own chat format ("<|User|>: ...\n\n<|Assistant|>:"), images as a placeholder token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|User|>: {% else %}<|Assistant|>: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image_placeholder>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n\n"
    "{% endfor %}{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)

WORDS = (
    "a an the image picture photo of with and is this that what which color colour does show shows "
    "answer yes no or in one word only there it"
).split() + list(COLORS)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<image_placeholder>", "<begin_of_image>",
            "<end_of_image>", "<|User|>", "<|Assistant|>"]
PUNCT = ["?", ".", ",", ":", "!"]

TINY_DEFAULTS = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     image_size=32, patch_size=8, vision_hidden=32, vq_fit_steps=300, init_scale=1.0,
                     extra_words=(), tie_word_embeddings=False, input_recall_steps=50)

# Words the reasoning quickstart's indirect prompts need ("an image the color of a ripe banana").
# They are an option (`model.tiny.extra_words`), not part of WORDS: a bigger vocabulary changes the
# random init of every tiny model, so the default one is left as it is.
# `tie_word_embeddings: false` (the default) gives the text head its own unit-std
# weights. A tied random head mostly repeats an input token (":" of "<|Assistant|>:", p ~ 0.998; or
# "is" at p 1.00 for a green image on seed 7), so an answer or a plan never samples the right word
# and its GRPO groups stay flat; untied, the first answer token starts near uniform over the
# vocabulary (p(right color) 0.003-0.19 on seeds 0 and 7) and the understanding task learns every color.
REASONING_WORDS = ("ripe banana clear sky fresh grass tomato snow coal lemon night ocean leaf fire "
                   "milk ink lime blood sun daytime think plan so").split()

# init_scale: weight std of the language model and the vision tower in units of 1/sqrt(width).
#   transformers' initializer_range=0.02 is that scale for a real model (width ~2048); at width 64 it
#   makes attention and MLP outputs ~6x too small, the residual stream carries the last token only,
#   and "a red image" and "a blue image" get the same hidden state (cosine 1.000, next-token
#   distributions 0.01 apart in total variation): no adapter can learn prompt-conditioned images
#   from that. At 1.0 the four color prompts are 0.25-0.46 apart and solid-color images 0.5-0.85
#   (0.16 reproduces the old 0.02).
# The tiny VQ codebook is a 4x4x4 RGB palette: token k decodes to a patch of PALETTE[k].
PALETTE_LEVELS = (0.0, 1 / 3, 2 / 3, 1.0)


def build_tokenizer(extra_words=()):
    """The tiny word-level tokenizer; `extra_words` (not already known) are appended after WORDS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = WORDS + [w for w in dict.fromkeys(w.lower() for w in extra_words) if w not in WORDS]
    vocab = {t: i for i, t in enumerate(SPECIALS + PUNCT + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                              "eoi_token": "<end_of_image>"})


def built_with(path: Path, marker_name: str, spec: dict) -> bool:
    """`path` holds a build of exactly `spec` (its marker file says so)."""
    marker = Path(path) / marker_name
    return marker.exists() and json.loads(marker.read_text()) == spec


def publish_build(path: Path, marker_name: str, spec: dict, *parts) -> Path:
    """Write `parts` (anything with `save_pretrained`) and the spec marker into a sibling temp dir,
    then rename it to `path`: concurrent builders (Ray workers, parallel tests) never see half a
    checkpoint, and a build of other settings at `path` is replaced."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    for part in parts:
        part.save_pretrained(tmp)
    (tmp / marker_name).write_text(json.dumps(spec))
    try:
        os.rename(tmp, path)
    except OSError:  # someone else finished first, or an old build is in the way
        if built_with(path, marker_name, spec):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
    return path


def build_tiny_janus(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write a tiny Janus checkpoint (model + processor) to `path` and return it.

    Re-uses an existing checkpoint at `path` built with the same settings, so tests and repeated
    quickstarts pay the (sub-second) build once.
    """
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusImageProcessor,
                              JanusProcessor, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig)

    spec = {**TINY_DEFAULTS, **overrides, "seed": seed}
    spec["extra_words"] = list(spec["extra_words"])  # JSON-comparable with the marker file
    unknown = set(overrides) - set(TINY_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tiny-model option(s) {sorted(unknown)}; known: {sorted(TINY_DEFAULTS)}")
    path = Path(path)
    if built_with(path, "uniloop_tiny.json", spec):
        return path

    tokenizer = build_tokenizer(spec["extra_words"])
    vocab_size = len(tokenizer)
    h = spec["hidden_size"]
    n_img = (spec["image_size"] // spec["patch_size"]) ** 2
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=h, intermediate_size=spec["intermediate_size"],
                       num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
                       num_key_value_heads=spec["num_heads"], max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id,
                       # fan-in init (see TINY_DEFAULTS): transformers' 0.02 is ~1/sqrt(2048), a real
                       # model's width; at width 64 it leaves every prompt with the same hidden state
                       initializer_range=spec["init_scale"] * h ** -0.5)
    vision = JanusVisionConfig(hidden_size=spec["vision_hidden"], num_hidden_layers=2, num_attention_heads=2,
                               initializer_range=spec["init_scale"] * spec["vision_hidden"] ** -0.5,
                               image_size=spec["image_size"], patch_size=spec["patch_size"],
                               num_image_tokens=n_img, projection_dim=h, mlp_ratio=2.0)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=len(PALETTE_LEVELS) ** 3, latent_channels=32,
                          base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1,
                          projection_dim=h, image_token_embed_dim=h)
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"),
                         tie_word_embeddings=spec["tie_word_embeddings"])
    # fork_rng: building the model must not move the caller's global RNG (a run that builds the
    # tiny model would otherwise initialise its adapter differently from one that finds it cached)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
        _scale_output_heads(model, h)
        fit_palette_vq(model.model.vqmodel, steps=spec["vq_fit_steps"], seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = JanusProcessor(
        image_processor=JanusImageProcessor(size={"height": spec["image_size"], "width": spec["image_size"]}),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, num_image_tokens=n_img)
    with torch.random.fork_rng():
        fit_input_recall(model, processor, spec["input_recall_steps"], seed=seed, n_img=n_img)

    return publish_build(path, "uniloop_tiny.json", spec, model, processor)


def _scale_output_heads(model, hidden: int):
    """Give the random heads O(1) logits, as a trained model has.

    With the default init (std 0.02) the generation head and the tied text head produce logits of
    ~0.03 whatever the (RMS-normalised) hidden state is: sampling is uniform and no adapter on the
    language model can move it. Unit-variance fan-in init keeps the tiny model steerable.
    """
    with torch.no_grad():
        head = model.model.generation_head
        head.proj_out.weight.normal_(0, hidden ** -0.5)
        head.vision_head.weight.normal_(0, 2 * head.vision_head.in_features ** -0.5)
        model.model.language_model.embed_tokens.weight.normal_(0, 2 * hidden ** -0.5)
        model.model.generation_embeddings.weight.normal_(0, 1.0)
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.normal_(0, hidden ** -0.5)


def fit_input_recall(model, processor, steps: int, seed: int = 0, n_img: int = 16):
    """Make the tiny language model carry what it was shown to the positions that answer.

    A pretrained Janus attends to what the prompt says and what the image shows; a random 2-layer
    model mostly averages its attention over the ~12 template tokens, so at the position that
    predicts the first image token (and at every later one) "a red image" and "a yellow image" can
    be 0.93-0.95 cosine-similar (tiny seeds 3 and 7). An adapter then moves such prompts together:
    their GRPO updates add up and both drift to the color between them (lime for green + yellow).

    So the decoder layers are fitted for `steps` Adam steps, with throwaway linear probes, to
    (1) read the word w of the generation prompt "a w image" from the hidden state at the last
    prompt position and at each following one (random image tokens as input), and (2) read which of
    the 64 solid palette images an understanding question was asked about from its last position.
    The probes are discarded. Nothing maps inputs to outputs: the generation and text heads, the
    embeddings, the vision tower and the VQ model are untouched, so which image a prompt asks for
    and which word answers a question must still be learned; the inputs only become as
    distinguishable as they are to a pretrained model. (Recall of the prompt alone made the
    understanding side ignore its image: the image recall keeps it looking.)
    """
    if steps <= 0:
        return
    from .sampling import positions_from_mask

    tok = processor.tokenizer
    vocab = tok.get_vocab()  # a dict in hash order: sorted by id, so that every build is the same
    words = sorted((w for w in vocab if w.isalpha()), key=vocab.get)
    chat = lambda text, image: processor.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}],
        add_generation_prompt=True, tokenize=False)
    gen = processor(text=[chat(f"a {w} image", False) for w in words], generation_mode="image", padding=True,
                    return_tensors="pt")
    word_ids = torch.tensor(tok.convert_tokens_to_ids(words))
    pal = palette()
    size = processor.image_processor.size["height"]
    pix = [(c * 255).round().to(torch.uint8)[:, None, None].expand(3, size, size) for c in pal]
    questions = ["What color is this image? Answer in one word.", "What is this image?"]
    und = [processor(text=[chat(q, True)] * len(pal), images=pix, padding=True, return_tensors="pt")
           for q in questions]
    lm = model.model.language_model
    params = [p for n, p in lm.named_parameters() if not n.startswith("embed_tokens")]
    torch.manual_seed(seed)
    word_probe = torch.nn.Linear(lm.config.hidden_size, len(tok))
    image_probe = torch.nn.Linear(lm.config.hidden_size, len(pal))
    opt = torch.optim.Adam(params + list(word_probe.parameters()) + list(image_probe.parameters()), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    ce = torch.nn.functional.cross_entropy
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and far faster on a loaded machine
    try:
        with torch.enable_grad():
            for _ in range(steps):
                image = torch.randint(0, len(pal), (len(words), n_img - 1), generator=g)
                embeds = torch.cat([lm.embed_tokens(gen["input_ids"]),
                                    model.prepare_embeddings_for_image_generation(image)], 1)
                mask = torch.cat([gen["attention_mask"], torch.ones_like(image)], 1)
                hidden = lm(inputs_embeds=embeds, attention_mask=mask,
                            position_ids=positions_from_mask(mask)).last_hidden_state
                logits = word_probe(hidden[:, gen["input_ids"].shape[1] - 1:])
                loss = ce(logits.flatten(0, 1), word_ids.repeat_interleave(n_img))
                for enc in und:
                    out = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                      pixel_values=enc["pixel_values"],
                                      position_ids=positions_from_mask(enc["attention_mask"]), use_cache=False)
                    loss = loss + ce(image_probe(out.last_hidden_state[:, -1]), torch.arange(len(pal)))
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.zero_grad(set_to_none=True)


def palette() -> torch.Tensor:
    import itertools
    return torch.tensor(list(itertools.product(PALETTE_LEVELS, repeat=3)), dtype=torch.float32)


def fit_palette_vq(vq, steps: int = 300, seed: int = 0, batch: int = 8):
    """Teach a random tiny VQ-VAE the palette code: token k <-> a patch of color PALETTE[k].

    A random VQ decoder maps every token to near-identical grey noise, which would leave nothing
    for an image reward to learn from. 300 Adam steps (~10 s on 2 cores) make the tiny
    model a working (if crude) image tokenizer: decode(tokens) shows colors and encode(image)
    returns tokens, as with the real Janus VQ model.

    Every step shows the decoder all 64 solid images (and a few random mixtures). Solid images are
    what the color prompts ask for and the hardest case for this decoder: its GroupNorms have one
    channel per group, so a spatially constant input is normalised to zero and only the convs'
    border effects tell the colors apart. Fitting them on a random few per step left 3-4 of the
    8 named colors wrong on every seed (a solid "blue" decoded as magenta); with all 64 each step
    the mean pixel error is 0.013 and all 8 decode to their own color on seeds 0-2.
    """
    if steps <= 0:
        return
    g = torch.Generator().manual_seed(seed)
    pal = palette()
    n = vq.config.num_patches
    scale = 2 ** (len(vq.config.channel_multiplier) - 1)
    opt = torch.optim.Adam(vq.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    vq.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is as fast, and far faster on a loaded machine
    try:
        _fit_steps(vq, opt, sched, pal, n, scale, steps, batch, g)
    finally:
        torch.set_num_threads(threads)
    vq.eval()


def _fit_steps(vq, opt, sched, pal, n, scale, steps, batch, g):
    solid = torch.arange(len(pal))[:, None].expand(len(pal), n * n)
    with torch.enable_grad():
        for _ in range(steps):
            tok = torch.cat([solid, torch.randint(0, len(pal), (batch, n * n), generator=g)])
            b = tok.shape[0]
            target = pal[tok].view(b, n, n, 3).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            out = (vq.decode(tok).permute(0, 2, 3, 1) + 1) / 2
            enc = vq.quant_conv(vq.encoder(target.permute(0, 3, 1, 2) * 2 - 1))
            code = vq.quantize.embedding(tok).view(b, n, n, -1).permute(0, 3, 1, 2).detach()
            loss = ((out - target) ** 2).mean() + ((enc - code) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def solid_color_images(names: list[str], size: int, noise: float = 0.0, generator=None) -> torch.Tensor:
    """(B, size, size, 3) float images of the named colors, optionally with pixel noise."""
    rgb = torch.tensor([COLORS[n] for n in names], dtype=torch.float32)
    img = rgb[:, None, None, :].expand(len(names), size, size, 3).clone()
    if noise:
        img = (img + noise * torch.randn(img.shape, generator=generator)).clamp(0, 1)
    return img


# Janus-Pro language-model shapes (Llama, no grouped KV heads) and the real 16384-code generation head.
JANUS_PRO_SHAPES = {"1b": dict(hidden=2048, heads=16, inter=5632, vocab=102400, layers=24),
                    "7b": dict(hidden=4096, heads=32, inter=11008, vocab=102400, layers=30)}


def build_janus_shaped(path: str | os.PathLike, shape: str = "1b", num_layers: int = 2, image_tokens: int = 16,
                       vocab_size: int | None = None, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A Janus-Pro-shaped checkpoint with random weights (default init), written with save_pretrained:
    the real hidden size, heads, MLP width and generation head (16384 codes), `num_layers` layers,
    `image_tokens` image tokens (a square number), the text vocabulary `vocab_size` (default: the
    real 102400; prompt ids are small, so a smaller table changes no image computation). The SigLIP
    encoder and the VQ convolutions are tiny: image sampling and teacher forcing never run them. For
    numerics at real width (tests/test_bf16_logprobs.py, benchmarks/bf16_logprob_gap.py)."""
    from transformers import (JanusConfig, JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor,
                              JanusVisionConfig, JanusVQVAEConfig, LlamaConfig)

    s = JANUS_PRO_SHAPES[shape]
    side = int(round(image_tokens ** 0.5))
    if side * side != image_tokens:
        raise ValueError(f"image_tokens must be a square number, got {image_tokens}")
    spec = {"shape": shape, "num_layers": num_layers, "image_tokens": image_tokens, "vocab_size": vocab_size,
            "dtype": dtype, "seed": seed}
    path = Path(path)
    if built_with(path, "uniloop_shaped.json", spec):
        return path
    tok = build_tokenizer()
    h = s["hidden"]
    text = LlamaConfig(vocab_size=vocab_size or s["vocab"], hidden_size=h, intermediate_size=s["inter"],
                       num_hidden_layers=num_layers, num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                       max_position_embeddings=16384, rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8 * side,
                               patch_size=8, num_image_tokens=image_tokens, projection_dim=h, mlp_ratio=2.0)
    vq = JanusVQVAEConfig(num_embeddings=16384, embed_dim=8, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=h, image_token_embed_dim=h)
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    previous = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_default_dtype(getattr(torch, dtype))  # built directly in the checkpoint's dtype
        try:
            model = JanusForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    processor = JanusProcessor(image_processor=JanusImageProcessor(size={"height": 8 * side, "width": 8 * side}),
                               tokenizer=tok, chat_template=CHAT_TEMPLATE, num_image_tokens=image_tokens)
    return publish_build(path, "uniloop_shaped.json", spec, model, processor)
