"""GenEval-style scoring: the rules on hand-made detections, then the `detector` reward on a tiny real
OWLv2 whose class and box heads are set so that what it detects is known in advance."""
import json

import pytest
import torch

from tiny_reward_models import CTX, image_batch, tiny_clip_dir, tiny_owlv2_dir
from uniloop.rewards.geneval import (Detection, evaluate, geneval_iou, parse_metadata, relative_position,
                                     select_detections)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only contend


def det(x0, y0, x1, y1, s=0.9):
    return Detection((x0, y0, x1, y1), s)


# ----------------------------------------------------------------------------- rules on hand-made detections
def test_relative_position():
    a, b = det(0, 40, 20, 60), det(60, 40, 80, 60)  # same row, a far to the left
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position(det(40, 0, 60, 20), det(40, 60, 60, 80)) == {"above"}  # y grows downwards
    assert relative_position(det(0, 0, 20, 20), det(60, 60, 80, 80)) == {"left of", "above"}  # diagonal: both
    # centres closer than 0.1 x the summed sizes: no relation at all
    assert relative_position(det(0, 0, 100, 100), det(5, 0, 105, 100)) == set()
    # a mostly vertical offset with a small horizontal one: only "below"
    assert relative_position(det(10, 80, 30, 100), det(0, 0, 20, 20)) == {"below"}


def test_selection_threshold_cap_and_nms():
    dets = [det(0, 0, 10, 10, 0.5), det(1, 1, 11, 11, 0.8), det(50, 50, 60, 60, 0.3), det(0, 0, 10, 10, 0.2)]
    assert [d.score for d in select_detections(dets, 0.3)] == [0.8, 0.5]  # strictly above, most confident first
    assert [d.score for d in select_detections(dets, 0.1, nms_iou=0.5)] == [0.8, 0.3]  # overlapping boxes merged
    assert len(select_detections(dets, 0.1, max_objects=2)) == 2
    assert geneval_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0  # +1 pixel convention: a 10x10 box
    assert geneval_iou((0, 0, 9, 9), (10, 0, 19, 9)) == 0.0


def test_evaluate_counting_colors_positions_exclusions():
    counting = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    two, three = [det(0, 0, 10, 10), det(20, 0, 30, 10)], [det(0, 0, 10, 10), det(20, 0, 30, 10), det(40, 0, 50, 10)]
    assert evaluate({"cat": two}, counting).correct
    v = evaluate({"cat": three}, counting)
    assert not v.correct and v.partial == 0.5 and "expected cat<3, found 3" in v.reasons[0]
    v = evaluate({"cat": two[:1]}, counting)
    assert not v.correct and v.partial == 0.5 and "expected cat>=2, found 1" in v.reasons[0]
    # colors: only the `count` most confident objects are classified
    colors = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    seen = []

    def classify(dets, cls):
        seen.append((len(dets), cls))
        return ["red" if d.box[0] < 50 else "blue" for d in dets]

    assert evaluate({"car": [det(0, 0, 10, 10), det(60, 0, 70, 10)]}, colors, classify).correct and seen == [(1, "car")]
    assert not evaluate({"car": [det(60, 0, 70, 10), det(0, 0, 10, 10)]}, colors, classify).correct
    with pytest.raises(ValueError, match="color classifier"):
        evaluate({"car": two}, colors)
    # position: each dog must be left of every bench matched by clause 0
    pos = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                          {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    bench, left_dog, right_dog = det(60, 40, 90, 60), det(0, 40, 20, 60), det(95, 40, 120, 60)
    assert evaluate({"bench": [bench], "dog": [left_dog]}, pos).correct
    v = evaluate({"bench": [bench], "dog": [right_dog]}, pos)
    assert not v.correct and v.satisfied == 1 and "found right of" in v.reasons[0]
    v = evaluate({"dog": [left_dog]}, pos)  # no bench: the relation has no target
    assert not v.correct and v.satisfied == 0 and "no target for dog" in v.reasons[1]
    # exclusions alone
    assert evaluate({}, {"tag": "x", "exclude": [{"class": "cat", "count": 1}]}).correct
    assert not evaluate({"cat": two}, {"tag": "x", "exclude": [{"class": "cat", "count": 1}]}).correct


@pytest.mark.parametrize("text,reason", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"tag": "single_object"}', "non-empty"),
    ('{"include": [{"count": 1}]}', "'class'"),
    ('{"include": [{"class": "cat", "count": 0}]}', "count"),
    ('{"include": [{"class": "cat", "count": "2"}]}', "count"),
    ('{"include": [{"class": "cat", "count": 1, "color": "teal"}]}', "teal"),
    ('{"include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]}', "earlier"),
    ('{"include": [{"class": "a"}, {"class": "b", "position": ["next to", 0]}]}', "relation"),
])
def test_metadata_validation(text, reason):
    meta, err = parse_metadata(text)
    assert meta is None and reason in err


# ----------------------------------------------------------------------------- the detector reward
CAT, DOG = "a photo of a cat", "a photo of a dog"


@pytest.fixture(scope="module")
def detector():
    """Tiny OWLv2 set up to see a cat in every one of its 4x4 patches and never a dog: every patch's
    class embedding is the cat query's text embedding, shift/scale put the threshold halfway between the
    cat's and the dog's cosine, and the box head outputs 0, so each box is its patch's grid cell."""
    from uniloop.rewards.detector import DetectorReward

    clip_dir = str(tiny_clip_dir())
    reward = DetectorReward(model=str(tiny_owlv2_dir()), batch_size=2, threshold=0.2, counting_threshold=0.3,
                            nms_iou=0.5, color_model=clip_dir)
    m, proc = reward.model, reward.processor
    from PIL import Image
    with torch.no_grad():
        out = m(**proc(text=[[CAT, DOG]], images=[Image.new("RGB", (64, 64))], return_tensors="pt"))
        q = out.text_embeds[0]
        cos = torch.nn.functional.cosine_similarity(q[0], q[1], dim=0).item()
        head = m.class_head
        head.dense0.weight.zero_()
        head.dense0.bias.copy_(q[0])
        head.logit_shift.weight.zero_()
        head.logit_shift.bias.fill_(-(1 + cos) / 2)
        head.logit_scale.weight.zero_()
        head.logit_scale.bias.fill_(12 / (1 - cos) - 1)  # elu(b) + 1 = scale: logits +-6
        m.box_head.dense2.weight.zero_()
        m.box_head.dense2.bias.zero_()
    assert cos < 1 - 1e-3
    return reward


def meta(*include, exclude=(), tag="single_object"):
    return json.dumps({"tag": tag, "include": list(include), "exclude": list(exclude)})


def test_detector_post_processed_outputs_are_the_controlled_ones(detector):
    from PIL import Image
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    res = detector.detect([img, img], [["a photo of a cat", "a photo of a dog"], ["a photo of a dog"]], [0.2, 0.2])
    assert len(res[0]["scores"]) == 16 and (res[0]["labels"] == 0).all() and (res[0]["scores"] > 0.99).all()
    assert len(res[1]["scores"]) == 0  # the dog alone is never detected
    boxes = sorted(tuple(round(v) for v in b) for b in res[0]["boxes"].tolist())
    # OWL biases each patch's box to the grid corner coordinates (16, 32, 48, 64), a patch wide; the
    # boxes are relative to the padded square and clipped to the image
    cells = [(16 * i + 8, 16 * j + 8, min(64, 16 * i + 24), min(64, 16 * j + 24)) for i in range(4) for j in range(4)]
    assert boxes == sorted(cells)


def test_detector_reward_presence_counts_and_invalid(detector):
    images = torch.rand(7, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    images[6, 0, 0, 0] = float("nan")
    cat1 = {"class": "cat", "count": 1}
    targets = [meta(cat1),  # a cat: yes
               meta({"class": "dog", "count": 1}),  # a dog: no
               meta({"class": "cat", "count": 2}, exclude=[{"class": "cat", "count": 3}], tag="counting"),  # 16 != 2
               meta({"class": "cat", "count": 16}, exclude=[{"class": "cat", "count": 17}], tag="counting"),  # 16
               meta(cat1, exclude=[{"class": "dog", "count": 1}]),  # a cat and no dog
               "{broken json",  # invalid, never 0
               meta(cat1)]  # NaN image: invalid
    batch = image_batch(["p"] * 7, images, targets)
    out = detector.score(batch, CTX)
    assert out.valid.tolist() == [True] * 5 + [False] * 2
    assert out.scores[:5].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert "expected cat<3, found 16" in out.details["geneval_reason"][2]
    assert "not JSON" in out.details["geneval_reason"][5] and out.details["geneval_reason"][6] == "non-finite pixels"
    detector.mode = "partial"
    try:
        part = detector.score(batch, CTX)
    finally:
        detector.mode = "strict"
    assert part.scores[:5].tolist() == [1.0, 0.0, 0.5, 1.0, 1.0]
    # samples with different query lists share a forward pass, yet each equals its own run
    whole = out.scores
    for i in range(5):
        assert detector.score(batch.select([i]), CTX).scores[0].item() == whole[i].item()
    # no targets at all: every sample invalid
    assert not detector.score(image_batch(["p", "q"], images[:2]), CTX).valid.any()


def test_detector_color_clause_uses_clip_zero_shot_on_the_box(detector):
    """The color of the most confident cat (the first cell, box (8, 8, 24, 24): all cells tie, the first is kept) is
    GenEval's zero-shot CLIP classification of its crop, recomputed here by hand."""
    import torch.nn.functional as F
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    from uniloop.rewards.geneval import COLORS

    images = torch.zeros(1, 64, 64, 3)
    images[..., 0] = 1.0  # red, with a blue square exactly where the first cell's box is
    images[0, 8:24, 8:24] = torch.tensor([0.0, 0.0, 1.0])
    pil = Image.fromarray((images[0] * 255).round().to(torch.uint8).numpy())
    clip_dir = str(tiny_clip_dir())
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)

    def by_hand(box):
        with torch.no_grad():
            px = proc(images=[pil.crop(box)], return_tensors="pt")["pixel_values"]
            img = F.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1)[0]
            sims = []
            for c in COLORS:
                texts = [f"a photo of a {c} cat", f"a photo of a {c}-colored cat", f"a photo of a {c} object"]
                t = model.get_text_features(**proc(text=texts, padding=True, return_tensors="pt")).pooler_output
                sims.append(img @ F.normalize(F.normalize(t, dim=-1).mean(0), dim=0))
        return COLORS[int(torch.stack(sims).argmax())]

    expected = by_hand((8, 8, 24, 24))
    assert by_hand((24, 8, 40, 24)) != expected  # the next cell (all red) reads otherwise: the crop matters
    other = next(c for c in COLORS if c != expected)
    targets = [meta({"class": "cat", "count": 1, "color": expected}, tag="colors"),
               meta({"class": "cat", "count": 1, "color": other}, tag="colors")]
    out = detector.score(image_batch(["p", "p"], images.repeat(2, 1, 1, 1), targets), CTX)
    assert out.scores.tolist() == [1.0, 0.0] and out.valid.all()


def test_metadata_from_a_prompt_file_or_a_python_literal(detector, tmp_path):
    from uniloop.rewards.geneval import read_metadata_file

    good = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    assert parse_metadata(str(good))[0] == good  # what a rollout job makes of a JSON-object `target`
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text(json.dumps(good | {"prompt": "a photo of a cat"}) + "\n\n"
                    + json.dumps({"tag": "single_object", "include": [{"class": "dog", "count": 1}],
                                  "prompt": "a photo of a dog"}) + "\n")
    assert set(read_metadata_file(str(path))) == {"a photo of a cat", "a photo of a dog"}
    detector.by_prompt = read_metadata_file(str(path))
    try:
        images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(2))
        # a training image task carries a color word (or "") in targets: the prompt's file entry is used
        out = detector.score(image_batch(["a photo of a cat", "a photo of a dog", "a photo of a cow"], images,
                                         ["red", "", ""]), CTX)
        assert out.valid.tolist() == [True, True, False] and out.scores[:2].tolist() == [1.0, 0.0]
    finally:
        detector.by_prompt = {}
    path.write_text(json.dumps(good | {"prompt": "p"}) + "\n" + json.dumps({"exclude": [{"class": "x"}], "prompt": "p"}))
    with pytest.raises(ValueError, match="two different"):
        read_metadata_file(str(path))
