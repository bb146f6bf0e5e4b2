"""Tiny real reward models, built offline from configs and written in the formats the real checkpoints
use (save_pretrained directories, torch state-dict files), so the rewards load them through the same
`from_pretrained` / file path a hub id takes. Each builder writes once per test session (lru_cache)."""
from __future__ import annotations

import functools
import gzip
import tempfile
from pathlib import Path

import torch

from uniloop.policies.batches import ImageRollout
from uniloop.rewards.base import RewardContext

ROOT = Path(tempfile.mkdtemp(prefix="uniloop_tiny_rewards_"))
CTX = RewardContext()


def image_batch(prompts, images, targets=None):
    B = len(prompts)
    z = torch.zeros(B, 1, dtype=torch.long)
    return ImageRollout(prompts=list(prompts), prompt_ids=z, prompt_mask=z, image_tokens=z,
                        logprobs_cfg=torch.zeros(B, 1), logprobs_cond=torch.zeros(B, 1), images=images,
                        group_ids=torch.arange(B), targets=list(targets or []))


def rand_images(n, h=40, w=36, seed=0):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def as_pil(images):
    from PIL import Image
    return [Image.fromarray((x * 255).round().clamp(0, 255).to(torch.uint8).numpy()) for x in images]


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8)


@functools.lru_cache(maxsize=None)
def clip_tokenizer_dir() -> Path:
    """The real CLIP BPE tokenizer (49408 tokens), rebuilt from open_clip's bundled merges file: the same
    vocabulary and merges as `openai/clip-vit-*` tokenizers, no download."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)
    out = ROOT / "clip_tokenizer"
    tok.save_pretrained(out)
    return out


def clip_text_config(**kw) -> dict:
    return dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407) | kw


@functools.lru_cache(maxsize=None)
def tiny_clip_dir(seed: int = 0, projection_dim: int = 16) -> Path:
    """A tiny transformers CLIPModel + CLIPProcessor directory (PickScore / aesthetic / color tests)."""
    from transformers import (AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor)

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=clip_text_config(), vision_config=TINY_VISION, projection_dim=projection_dim)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.2)  # not the init value, so a formula using it is really checked
    out = ROOT / f"clip_{seed}_{projection_dim}"
    model.save_pretrained(out)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(clip_tokenizer_dir())).save_pretrained(out)
    return out


@functools.lru_cache(maxsize=None)
def tiny_owlv2_dir(seed: int = 0) -> Path:
    """A tiny Owlv2ForObjectDetection + Owlv2Processor directory: 64 px input, 16 px patches (4x4 grid)."""
    from transformers import (AutoTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor,
                              Owlv2Processor)

    torch.manual_seed(seed)
    cfg = Owlv2Config(text_config=clip_text_config(max_position_embeddings=16, num_hidden_layers=1),
                      vision_config=TINY_VISION | {"image_size": 64, "patch_size": 16, "num_hidden_layers": 1},
                      projection_dim=32)
    model = Owlv2ForObjectDetection(cfg).eval()
    out = ROOT / f"owlv2_{seed}"
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(clip_tokenizer_dir(), model_max_length=16)
    ip = Owlv2ImageProcessor(size={"height": 64, "width": 64})
    Owlv2Processor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out


BERT_WORDS = ("a photo of an the image painting cat dog red blue green sofa on with and two sign that says "
              "hello world big small").split()


@functools.lru_cache(maxsize=None)
def bert_tokenizer_dir() -> Path:
    """A small real WordPiece BertTokenizer (lower-case words + single letters) in a directory."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = specials + sorted(set(BERT_WORDS)) + [x for x in letters if x not in BERT_WORDS] + list(".,!?\"'")
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    out = ROOT / "bert_tokenizer"
    tok.save_pretrained(out)
    return out


def char_tokenizer(chars: str):
    """A character-level tokenizer (one token per character) with <s>, </s>, <pad>, <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(chars))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()  # characters are joined back without separators
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


OCR_CHARS = "abcdefghijklmnopqrstuvwxyz "


@functools.lru_cache(maxsize=None)
def tiny_trocr_dir(reads: str = "cat") -> Path:
    """A tiny TrOCR-style VisionEncoderDecoderModel (ViT encoder + TrOCR decoder) whose weights are set so
    that greedy decoding reads `reads` (distinct characters) whatever the image: one-hot token
    embeddings, zero positions, every sub-layer's output projection zero (the post-norm residual then
    only re-normalises the one-hot state), and an output projection that maps each character to the
    next one of `reads` and every other token to </s>. Everything else is a real random model run by
    `generate`, so the reward's OCR -> text -> accuracy path is exercised end to end."""
    from transformers import (TrOCRConfig, TrOCRForCausalLM, TrOCRProcessor, ViTConfig, ViTImageProcessor,
                              ViTModel, VisionEncoderDecoderModel)

    assert len(set(reads)) == len(reads), "the chain needs distinct characters"
    tok = char_tokenizer(OCR_CHARS)
    V, D = len(tok), 32
    torch.manual_seed(0)
    enc = ViTModel(ViTConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8))
    dcfg = TrOCRConfig(vocab_size=V, d_model=D, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                       max_position_embeddings=64, use_learned_position_embeddings=True, layernorm_embedding=False,
                       scale_embedding=False, tie_word_embeddings=False, is_decoder=True, add_cross_attention=True,
                       decoder_start_token_id=tok.bos_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    dec = TrOCRForCausalLM(dcfg)
    model = VisionEncoderDecoderModel(encoder=enc, decoder=dec)
    ids = [tok.bos_token_id] + tok.convert_tokens_to_ids(list(reads)) + [tok.eos_token_id]
    nxt = {a: b for a, b in zip(ids[:-1], ids[1:])}
    with torch.no_grad():
        d = model.decoder.model.decoder
        d.embed_tokens.weight.zero_()
        d.embed_tokens.weight[:, :V].copy_(torch.eye(V))
        d.embed_positions.weight.zero_()
        for layer in d.layers:
            for lin in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        proj = model.decoder.output_projection.weight
        proj.zero_()
        for t in range(V):
            proj[nxt.get(t, tok.eos_token_id), t] = 1.0
    for c in (model.config, model.generation_config):
        c.decoder_start_token_id, c.eos_token_id, c.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    out = ROOT / f"trocr_{reads}"
    model.save_pretrained(out)
    TrOCRProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(out)
    return out
