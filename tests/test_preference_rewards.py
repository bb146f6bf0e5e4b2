"""PickScore, aesthetic, HPSv2.1 and ImageReward on tiny real models loaded from disk through the same
path a hub id takes; every score is checked against the peer's formula computed by hand."""
import functools

import pytest
import torch
import torch.nn.functional as F

from tiny_reward_models import CTX, as_pil, bert_tokenizer_dir, image_batch, rand_images, tiny_clip_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only contend
PROMPTS = ["a photo of a red cat", "a blue dog on a sofa", "a painting"]


def assert_batch_equals_one_by_one(reward, batch, atol=1e-5):
    whole = reward.score(batch, CTX)
    for i in range(len(batch)):
        one = reward.score(batch.select([i]), CTX)
        assert bool(one.valid[0]) == bool(whole.valid[i])
        if whole.valid[i]:
            assert one.scores[0].item() == pytest.approx(whole.scores[i].item(), abs=atol)


# ----------------------------------------------------------------------------- PickScore
@pytest.fixture(scope="module")
def clip_dir():
    return str(tiny_clip_dir())


def test_pickscore_formula_batching_and_invalid(clip_dir):
    from transformers import AutoProcessor, CLIPModel

    from uniloop.rewards.pickscore import PickScoreReward

    reward = PickScoreReward(model=clip_dir, processor=clip_dir, batch_size=2)
    images = rand_images(3)
    out = reward.score(image_batch(PROMPTS, images), CTX)
    # by hand, as flow_grpo's pickscore_scorer: towers + projections, normalise, exp(logit_scale) * cos / 26
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        px = proc(images=as_pil(images), return_tensors="pt")["pixel_values"]
        tok = proc(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=tok["input_ids"],
                                                     attention_mask=tok["attention_mask"]).pooler_output)
        cos = F.cosine_similarity(img, txt, dim=-1)
    assert model.logit_scale.item() == pytest.approx(4.2)
    assert torch.allclose(out.scores, torch.exp(torch.tensor(4.2)) * cos / 26, atol=1e-5)
    assert out.valid.all() and out.scores.std() > 0
    # a NaN image is invalid; the other samples keep their scores
    bad = images.clone()
    bad[1, 3, 3, 0] = float("nan")
    out2 = reward.score(image_batch(PROMPTS, bad), CTX)
    assert out2.valid.tolist() == [True, False, True]
    assert torch.allclose(out2.scores[[0, 2]], out.scores[[0, 2]], atol=1e-6)
    assert_batch_equals_one_by_one(reward, image_batch(PROMPTS, images))


def test_pickscore_prefers_the_matching_prompt_once_weights_say_so(clip_dir):
    """Set the image projection so image k's embedding IS prompt k's text embedding: then image k must
    score exactly exp(logit_scale)/26 with its own prompt and less with the other one."""
    from uniloop.rewards.model_utils import pooled
    from uniloop.rewards.pickscore import PickScoreReward

    reward = PickScoreReward(model=clip_dir, processor=clip_dir, batch_size=4)
    m, proc = reward.model, reward.processor
    images, prompts = rand_images(2, seed=5), ["a red cat", "a blue dog"]
    with torch.no_grad():
        px = proc(images=as_pil(images), return_tensors="pt")["pixel_values"]
        v = m.vision_model(pixel_values=px).pooler_output  # (2, hidden)
        t = pooled(m.get_text_features(**proc(text=prompts, padding=True, return_tensors="pt")))  # (2, proj)
        m.visual_projection.weight.copy_(t.T @ torch.linalg.pinv(v.T))  # W v_k = t_k
    cross = reward.score(image_batch([prompts[0], prompts[0], prompts[1], prompts[1]],
                                     images[[0, 1, 0, 1]]), CTX).scores
    top = torch.exp(m.logit_scale).item() / 26
    assert cross[0].item() == pytest.approx(top, abs=1e-4) and cross[3].item() == pytest.approx(top, abs=1e-4)
    assert cross[0] > cross[1] + 1e-3 and cross[3] > cross[2] + 1e-3


# ----------------------------------------------------------------------------- aesthetic
REFERENCE_MLP_KEYS = {"layers.0": (1024, 16), "layers.2": (128, 1024), "layers.4": (64, 128),
                      "layers.6": (16, 64), "layers.7": (1, 16)}


def test_aesthetic_is_the_affine_map_of_the_normalised_embedding(clip_dir, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    from uniloop.rewards.aesthetic import AestheticReward

    g = torch.Generator().manual_seed(1)
    # the predictor file in the reference layout: Linear layers at indices 0, 2, 4, 6, 7 (Dropouts between)
    state = {}
    for name, (o, i) in REFERENCE_MLP_KEYS.items():
        state[f"{name}.weight"] = torch.randn(o, i, generator=g) / i ** 0.5
        state[f"{name}.bias"] = torch.randn(o, generator=g) * 0.1
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    reward = AestheticReward(clip_model=clip_dir, predictor=str(path), batch_size=2)
    images = rand_images(3, seed=2)
    out = reward.score(image_batch(["x", "y", "z"], images), CTX)
    # no activations: the head is one affine map W e + b of the normalised image embedding
    W, b = torch.eye(16), torch.zeros(16)
    for name in REFERENCE_MLP_KEYS:
        W, b = state[f"{name}.weight"] @ W, state[f"{name}.weight"] @ b + state[f"{name}.bias"]
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        px = proc(images=as_pil(images), return_tensors="pt")["pixel_values"]
        e = F.normalize(model.visual_projection(model.vision_model(pixel_values=px).pooler_output), dim=-1)
    assert torch.allclose(out.scores, (e @ W.T + b).squeeze(-1), atol=1e-4)
    assert out.valid.all()
    # the prompt plays no part
    same = reward.score(image_batch(["other", "prompts", "here"], images), CTX)
    assert torch.equal(same.scores, out.scores)
    assert_batch_equals_one_by_one(reward, image_batch(["x", "y", "z"], images))
    # a file of another layout fails loudly instead of leaving random weights
    torch.save({k.replace("layers.7", "layers.8"): v for k, v in state.items()}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="layers.8"):
        AestheticReward(clip_model=clip_dir, predictor=str(tmp_path / "bad.pth"))


# ----------------------------------------------------------------------------- HPSv2.1
def test_hps_checkpoint_file_format_and_formula(tmp_path):
    import open_clip

    from uniloop.rewards.clip import TINY_CLIP_CONFIG
    from uniloop.rewards.hps import HPSReward

    arch = "uniloop-test-hps"
    from uniloop.rewards.clip import register_clip_config
    register_clip_config(arch, TINY_CLIP_CONFIG)
    torch.manual_seed(7)
    src, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    src.eval()
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": src.state_dict()}, path)  # the checkpoint's format: ['state_dict']
    reward = HPSReward(model=arch, checkpoint=str(path), model_config=TINY_CLIP_CONFIG, batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(reward.model.state_dict().values(), src.state_dict().values()))
    images = rand_images(3, seed=3)
    out = reward.score(image_batch(PROMPTS, images), CTX)
    # by hand, as HPSv2's score.py: the model's forward gives normalised features; score = diag(img @ txt.T)
    with torch.no_grad():
        feats = src(torch.stack([preprocess(p) for p in as_pil(images)]), open_clip.get_tokenizer(arch)(PROMPTS))
        img, txt = (feats["image_features"], feats["text_features"]) if isinstance(feats, dict) else feats[:2]
    assert torch.allclose(out.scores, torch.diagonal(img @ txt.T), atol=1e-5)
    assert out.valid.all() and (out.scores.abs() <= 1).all()
    assert_batch_equals_one_by_one(reward, image_batch(PROMPTS, images))
    # a DDP-saved checkpoint (module. prefix) loads the same; a checkpoint with a missing key is refused
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "ddp.pt")
    again = HPSReward(model=arch, checkpoint=str(tmp_path / "ddp.pt"), model_config=TINY_CLIP_CONFIG)
    assert torch.allclose(again.score(image_batch(PROMPTS, images), CTX).scores, out.scores, atol=1e-6)
    broken = dict(src.state_dict())
    broken.pop("text_projection")
    torch.save({"state_dict": broken}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="text_projection"):
        HPSReward(model=arch, checkpoint=str(tmp_path / "broken.pt"), model_config=TINY_CLIP_CONFIG)


# ----------------------------------------------------------------------------- ImageReward
VD, VI, VL, TH, TI, TL, P = 48, 96, 2, 32, 64, 2, 40  # tiny widths: vision 48 != text 32 (cross-attn width)


def official_imagereward_state(vocab: int, g) -> dict:
    """Random weights under the official ImageReward.pt key names (BLIP-original modules), written out
    here independently of the reward's mapping table."""
    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"blip.visual_encoder.cls_token": r(1, 1, VD), "blip.visual_encoder.pos_embed": r(1, 17, VD),
          "blip.visual_encoder.patch_embed.proj.weight": r(VD, 3, 8, 8), "blip.visual_encoder.patch_embed.proj.bias": r(VD),
          "blip.visual_encoder.norm.weight": 1 + r(VD), "blip.visual_encoder.norm.bias": r(VD),
          "blip.text_encoder.embeddings.word_embeddings.weight": r(vocab, TH),
          "blip.text_encoder.embeddings.position_embeddings.weight": r(P, TH),
          "blip.text_encoder.embeddings.LayerNorm.weight": 1 + r(TH), "blip.text_encoder.embeddings.LayerNorm.bias": r(TH),
          "blip.text_encoder.embeddings.position_ids": torch.arange(P).unsqueeze(0),
          "blip.vision_proj.weight": r(256, VD), "blip.vision_proj.bias": r(256),  # ITC heads: unused
          "blip.text_proj.weight": r(256, TH), "blip.text_proj.bias": r(256)}
    for i in range(VL):
        b = f"blip.visual_encoder.blocks.{i}."
        sd |= {b + "norm1.weight": 1 + r(VD), b + "norm1.bias": r(VD), b + "norm2.weight": 1 + r(VD), b + "norm2.bias": r(VD),
               b + "attn.qkv.weight": r(3 * VD, VD), b + "attn.qkv.bias": r(3 * VD),
               b + "attn.proj.weight": r(VD, VD), b + "attn.proj.bias": r(VD),
               b + "mlp.fc1.weight": r(VI, VD), b + "mlp.fc1.bias": r(VI), b + "mlp.fc2.weight": r(VD, VI), b + "mlp.fc2.bias": r(VD)}
    for i in range(TL):
        b = f"blip.text_encoder.encoder.layer.{i}."
        for att, kv in (("attention", TH), ("crossattention", VD)):
            sd |= {b + f"{att}.self.query.weight": r(TH, TH), b + f"{att}.self.query.bias": r(TH),
                   b + f"{att}.self.key.weight": r(TH, kv), b + f"{att}.self.key.bias": r(TH),
                   b + f"{att}.self.value.weight": r(TH, kv), b + f"{att}.self.value.bias": r(TH),
                   b + f"{att}.output.dense.weight": r(TH, TH), b + f"{att}.output.dense.bias": r(TH),
                   b + f"{att}.output.LayerNorm.weight": 1 + r(TH), b + f"{att}.output.LayerNorm.bias": r(TH)}
        sd |= {b + "intermediate.dense.weight": r(TI, TH), b + "intermediate.dense.bias": r(TI),
               b + "output.dense.weight": r(TH, TI), b + "output.dense.bias": r(TH),
               b + "output.LayerNorm.weight": 1 + r(TH), b + "output.LayerNorm.bias": r(TH)}
    for name, (o, i) in {"0": (1024, TH), "2": (128, 1024), "4": (64, 128), "6": (16, 64), "7": (1, 16)}.items():
        sd |= {f"mlp.layers.{name}.weight": torch.randn(o, i, generator=g) / i ** 0.5, f"mlp.layers.{name}.bias": r(o)}
    return sd


def test_image_reward_official_checkpoint_layout_and_formula(tmp_path):
    import json

    from transformers import AutoTokenizer

    from uniloop.rewards.image_reward import MEAN, STD, ImageRewardScore

    tok_dir = str(bert_tokenizer_dir())
    vocab = len(AutoTokenizer.from_pretrained(tok_dir)) + 2  # + BLIP's [DEC] and [ENC]
    sd = official_imagereward_state(vocab, torch.Generator().manual_seed(4))
    torch.save(sd, tmp_path / "ImageReward.pt")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": TH, "initializer_range": 0.02, "intermediate_size": TI,
           "layer_norm_eps": 1e-12, "max_position_embeddings": P, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": TL, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab,
           "encoder_width": 768, "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    reward = ImageRewardScore(checkpoint=str(tmp_path / "ImageReward.pt"), med_config=str(tmp_path / "med_config.json"),
                              tokenizer=tok_dir, batch_size=2,
                              vision=dict(hidden_size=VD, intermediate_size=VI, num_hidden_layers=VL,
                                          num_attention_heads=2, image_size=32, patch_size=8))
    m = reward.model
    # every official tensor landed where the BLIP-original -> transformers names say
    expect = {"vision.embeddings.class_embedding": "blip.visual_encoder.cls_token",
              "vision.embeddings.position_embedding": "blip.visual_encoder.pos_embed",
              "vision.embeddings.patch_embedding.weight": "blip.visual_encoder.patch_embed.proj.weight",
              "vision.post_layernorm.weight": "blip.visual_encoder.norm.weight",
              "vision.encoder.layers.1.layer_norm1.bias": "blip.visual_encoder.blocks.1.norm1.bias",
              "vision.encoder.layers.1.layer_norm2.weight": "blip.visual_encoder.blocks.1.norm2.weight",
              "vision.encoder.layers.0.self_attn.qkv.weight": "blip.visual_encoder.blocks.0.attn.qkv.weight",
              "vision.encoder.layers.0.self_attn.projection.bias": "blip.visual_encoder.blocks.0.attn.proj.bias",
              "vision.encoder.layers.1.mlp.fc2.weight": "blip.visual_encoder.blocks.1.mlp.fc2.weight",
              "text.encoder.layer.1.crossattention.self.key.weight": "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
              "text.embeddings.word_embeddings.weight": "blip.text_encoder.embeddings.word_embeddings.weight",
              "mlp.layers.7.weight": "mlp.layers.7.weight"}
    ours = m.state_dict()
    for k, off in expect.items():
        assert torch.equal(ours[k], sd[off]), k
    n_used = sum(1 for k in sd if not k.startswith(("blip.vision_proj", "blip.text_proj")) and "position_ids" not in k)
    assert n_used == len([k for k in ours if "position_ids" not in k])  # nothing left at random init
    # tokenization as the reference: max_length 35 padding, [CLS] first (not swapped for [ENC])
    images = rand_images(3, seed=6)
    inp = reward.inputs(images, PROMPTS)
    assert inp["input_ids"].shape == (3, 35) and (inp["input_ids"][:, 0] == reward.tokenizer.cls_token_id).all()
    out = reward.score(image_batch(PROMPTS, images), CTX)
    # by hand: the [CLS] state after cross-attention, then the official MLP's affine map, then (x - mean) / std
    with torch.no_grad():
        cls = m.cls_features(**inp)
    W, b = torch.eye(TH), torch.zeros(TH)
    for i in ("0", "2", "4", "6", "7"):
        W, b = sd[f"mlp.layers.{i}.weight"] @ W, sd[f"mlp.layers.{i}.weight"] @ b + sd[f"mlp.layers.{i}.bias"]
    assert torch.allclose(out.scores, ((cls @ W.T + b).squeeze(-1) - MEAN) / STD, atol=1e-4)
    # the image matters through cross-attention, the padding does not
    other = reward.score(image_batch(PROMPTS, rand_images(3, seed=9)), CTX)
    assert (other.scores - out.scores).abs().max() > 1e-4
    assert_batch_equals_one_by_one(reward, image_batch(PROMPTS, images), atol=1e-4)
    # an unknown key in the checkpoint is refused
    torch.save(sd | {"blip.something_else.weight": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="something_else"):
        ImageRewardScore(checkpoint=str(tmp_path / "odd.pt"), med_config=str(tmp_path / "med_config.json"),
                         tokenizer=tok_dir, vision=dict(hidden_size=VD, intermediate_size=VI, num_hidden_layers=VL,
                                                        num_attention_heads=2, image_size=32, patch_size=8))


def test_image_reward_vision_mapping_matches_a_timm_vit():
    """BLIP's ViT is timm's VisionTransformer (same module names, qkv layout, pre-norm blocks, final norm):
    timm weights under `blip.visual_encoder.` loaded through the mapping give timm's token features."""
    timm = pytest.importorskip("timm")
    from transformers import BlipVisionConfig, BlipVisionModel

    from uniloop.rewards.image_reward import BLIP_VIT_LARGE, convert_official_state_dict

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=VD, depth=VL, num_heads=2, mlp_ratio=VI / VD, qkv_bias=True,
        num_classes=0, global_pool="", norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    with torch.no_grad():  # timm initialises cls/pos to small values; make them matter
        vit.cls_token.normal_()
        vit.pos_embed.normal_()
    state = convert_official_state_dict({f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()})
    hf = BlipVisionModel(BlipVisionConfig(**{**BLIP_VIT_LARGE, "hidden_size": VD, "intermediate_size": VI,
                                             "num_hidden_layers": VL, "num_attention_heads": 2,
                                             "image_size": 32, "patch_size": 8})).eval()
    hf.load_state_dict({k[len("vision."):]: v for k, v in state.items()}, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).last_hidden_state, vit.forward_features(x), atol=1e-5)
