"""Verdict parsers, rule rewards, user Python rewards, mixtures' error/NaN handling, CLIP weights files,
and the self-understanding / cycle-consistency rewards on a tiny real Janus."""
import math
import textwrap

import pytest
import torch

from uniloop.policies.batches import ImageRollout, TextRollout
from uniloop.rewards.base import RewardContext, RewardError, RewardMixture, RewardSpec
from uniloop.rewards.parsing import parse_final_score, parse_preference, parse_verdict


# ----------------------------------------------------------------------------- pointwise parser
@pytest.mark.parametrize("text,value", [
    ("The colors match the caption well. Final Score: 4", 4.0),
    ("Final Score: 10", 10.0),
    ("final score:7.5", 7.5),
    ("**Final Score:** 9", 9.0),
    ("Final Score = 3.", 3.0),
    ("Final Score is 6/10", 6.0),
    ("Final Score: 8 out of 10\n", 8.0),
    ("Reasoning... 2 cats, 3 dogs.\nFinal Score: 5", 5.0),  # digits in earlier sentences are fine
])
def test_final_score_well_formed(text, value):
    v = parse_final_score(text, 1, 10)
    assert v.ok and v.value == value and isinstance(v.value, float)


def test_final_score_compares_as_numbers():
    # The string-comparison trap: "9" > "10" as strings, 10 > 9 as numbers.
    ten, nine = parse_final_score("Final Score: 10", 1, 10), parse_final_score("Final Score: 9", 1, 10)
    assert ten.value > nine.value
    assert max([nine, ten], key=lambda v: v.value) is ten


@pytest.mark.parametrize("text,finished,reason", [
    ("", True, "empty"),
    ("   \n ", True, "empty"),
    (None, True, "empty"),
    ("Final Score: 4", False, "truncated"),  # hit max_tokens: "4" may be the start of "40"
    ("The image is nice but", True, "no 'Final Score'"),
    ("Final Score:", True, "no number"),  # cut right after the marker
    ("Final Score: X", True, "no number"),
    ("Final Score: nan", True, "no number"),
    ("Final Score: five", True, "no number"),
    ("Final Score: 3\nFinal Score: 4", True, "several"),
    ("Final Score: 4. Final Score: 4", True, "several"),  # even when they agree
    ("Final Score: 3 or 4", True, "several numbers"),
    ("Final Score: 4.5.6", True, "several numbers"),
    ("Final Score: 5th", True, "malformed"),
    ("Final Score: 1e3", True, "malformed"),
    ("Final Score: 11", True, "out of range"),
    ("Final Score: 0", True, "out of range"),
    ("Final Score: -3", True, "out of range"),
    ("Final Score: 7/5", True, "out of 5"),  # a different scale is not silently rescaled
    ("Final Score: ٣", True, "no number"),  # only ASCII digits count
])
def test_final_score_unparseable(text, finished, reason):
    v = parse_final_score(text, 1, 10, finished=finished)
    assert not v.ok and v.value is None
    assert reason in v.error


def test_final_score_options():
    assert parse_final_score("Final Score: 3\nFinal Score: 4", 1, 5, several="last").value == 4.0
    assert not parse_final_score("Final Score: 3.5", 1, 5, integer=True).ok
    assert parse_final_score("Final Score: 3.0", 1, 5, integer=True).value == 3.0
    # understanding judges grade 0-100
    assert parse_verdict("Final Score: 85", "understanding_pointwise", score_range=(0, 100)).value == 85.0
    assert parse_verdict("Final Score: 0", "understanding_pointwise", score_range=(0, 100)).value == 0.0
    assert not parse_verdict("Final Score: 101", "understanding_pointwise", score_range=(0, 100)).ok


def test_cot_answer_block():
    ok = "<think>Image shows red, caption says red. Final Score: 1 would be wrong.</think><answer>Final Score: 5</answer>"
    assert parse_final_score(ok, 1, 5, cot=True).value == 5.0  # the score in <think> is ignored
    assert "several" in parse_final_score(ok, 1, 5, cot=False).error  # without cot both count
    assert "no <answer>" in parse_final_score("<think>hm</think> Final Score: 5", 1, 5, cot=True).error
    assert "unclosed" in parse_final_score("<think>x</think><answer>Final Score: 4", 1, 5, cot=True).error
    assert "several <answer>" in parse_final_score("<answer>Final Score: 4</answer><answer>Final Score: 2</answer>",
                                                   1, 5, cot=True).error
    assert parse_preference("<think>...</think>\n<answer> Image 2 is better </answer>", cot=True).value == 0.0


# ----------------------------------------------------------------------------- pairwise parser
@pytest.mark.parametrize("text,value", [
    ("Image 1 is better", 1.0),
    ("The second has the right color. Image 2 is better.", 0.0),
    ("image 2 is much better than image 1", 0.0),
    ("**Image (1) is better**", 1.0),
])
def test_preference_well_formed(text, value):
    assert parse_preference(text).value == value


@pytest.mark.parametrize("text,kw,reason", [
    ("", {}, "empty"),
    ("Image 1 is better", {"finished": False}, "truncated"),
    ("Image 1 is", {}, "no 'Image X is better'"),
    ("Image 3 is better", {}, "unknown label"),
    ("Image 1 is better. No wait, Image 2 is better.", {}, "several"),
    ("Neither Image 1 nor Image 2 is better", {}, "negated"),
    ("Image 1 is not better", {}, "no 'Image X is better'"),
    ("Both images are equally good", {}, "does not allow"),
    ("It's a tie, but Image 1 is better", {"allow_tie": True}, "contradictory"),
    ("Answer 1 is better", {}, "no 'Image X is better'"),  # wrong subject for an image judge
])
def test_preference_unparseable(text, kw, reason):
    v = parse_preference(text, **kw)
    assert not v.ok and reason in v.error


def test_preference_tie_and_answers():
    assert parse_preference("Both images are equally good.", allow_tie=True).value == 0.5
    assert parse_verdict("Answer 2 is better", "understanding_pairwise").value == 0.0
    assert parse_verdict("Answer B is better", "understanding_pairwise", labels=("A", "B")).value == 0.0
    assert not parse_verdict("Image 2 is better", "understanding_pairwise").ok
    assert parse_preference("Image 1 is better\nImage 1 is better", several="last").value == 1.0
    with pytest.raises(ValueError, match="unknown judge mode"):
        parse_verdict("x", "pointwise")


# ----------------------------------------------------------------------------- rules
def text_batch(answers, targets=None, prompts=None):
    B = len(answers)
    z = torch.zeros(B, 1, dtype=torch.long)
    return TextRollout(prompts=prompts or [f"q{i}" for i in range(B)], images=torch.zeros(B, 4, 4, 3),
                       prompt_ids=z, prompt_mask=z, pixel_values=torch.zeros(B, 3, 4, 4), answer_ids=z,
                       answer_mask=z, logprobs_sampled=torch.zeros(B, 1), answers=list(answers),
                       group_ids=torch.arange(B), targets=list(targets or []))


def image_batch(prompts, images=None, group_ids=None):
    B = len(prompts)
    z = torch.zeros(B, 1, dtype=torch.long)
    return ImageRollout(prompts=list(prompts), prompt_ids=z, prompt_mask=z, image_tokens=z,
                        logprobs_cfg=torch.zeros(B, 1), logprobs_cond=torch.zeros(B, 1),
                        images=images if images is not None else torch.rand(B, 8, 8, 3),
                        group_ids=torch.as_tensor(group_ids if group_ids is not None else range(B)))


CTX = RewardContext()


def test_multiple_choice():
    from uniloop.rewards.rules import MultipleChoiceReward, extract_choice

    assert [extract_choice(s) for s in ["B", "(B) a cat", "B. a cat", "The answer is (c).", "Answer: D",
                                        "A cat", "I think (C)", "A or B?", "answer is A, option B", ""]] == \
        ["B", "B", "B", "C", "D", None, "C", None, None, None]
    r = MultipleChoiceReward()
    out = r.score(text_batch(["(B) the dog", "A dog", "answer: b", "C"], ["B", "(A)", "B. dog", "b"]), CTX)
    assert out.scores.tolist() == [1.0, 0.0, 1.0, 0.0] and out.valid.all()  # no letter = wrong, not invalid
    with pytest.raises(ValueError, match="sample 0 has target 'dog'"):
        r.score(text_batch(["A"], ["dog"]), CTX)
    with pytest.raises(ValueError, match="reference answer"):
        r.score(text_batch(["A"]), CTX)


def test_numeric():
    from uniloop.rewards.rules import NumericReward, extract_numbers

    assert extract_numbers("It costs 1,234.5 dollars, or 3/4 of 50%") == [1234.5, 0.75, 0.5]
    assert extract_numbers("first 3 then \\boxed{42}") == [42.0]
    r = NumericReward(atol=0.01)
    out = r.score(text_batch(["The answer is 3.14", "3.2", "none", "2 apples and 7 pears", "-7"],
                             ["3.14159", "3.14159", "1", "7", "-7"]), CTX)
    assert out.scores.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert NumericReward(pick="only").score(text_batch(["2 apples and 7 pears"], ["7"]), CTX).scores.item() == 0.0
    assert NumericReward(pick="first").score(text_batch(["2 apples and 7 pears"], ["2"]), CTX).scores.item() == 1.0
    assert NumericReward(rtol=0.1).score(text_batch(["105"], ["100"]), CTX).scores.item() == 1.0
    with pytest.raises(ValueError, match="sample 0 has target 'many'"):
        r.score(text_batch(["1"], ["many"]), CTX)


def test_format():
    from uniloop.rewards.rules import FormatReward

    answers = ["<think>x</think><answer>red</answer>", "<answer> </answer>", "red", "<ANSWER>red</ANSWER>"]
    assert FormatReward(tag="answer").score(text_batch(answers), CTX).scores.tolist() == [1, 0, 0, 0]
    assert FormatReward(tag="answer", ignore_case=True).score(text_batch(answers), CTX).scores.tolist() == [1, 0, 0, 1]
    assert FormatReward(pattern=r"[a-z]+", fullmatch=True).score(text_batch(answers), CTX).scores.tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        FormatReward(pattern="(")
    with pytest.raises(ValueError, match="needs `tag`"):
        FormatReward()


USER_MODULE = textwrap.dedent('''
    def brevity(prompts, completions, targets, max_words=3):
        # one score per sample; None = "cannot score" (the sample is invalid, not 0)
        return [None if c == "skip" else float(len(c.split()) <= max_words) for c in completions]

    def per_sample(completion, target):
        return 1.0 if completion == target else 0.0

    def boom(prompts, completions, **kwargs):
        for p in prompts:
            if "bad" in p:
                raise KeyError("no rule for " + p)
        return [1.0] * len(prompts)

    def wrong_length(prompts, completions):
        return [1.0]

    def nan_and_inf(prompts, completions):
        return [float("nan"), float("inf"), 0.5][:len(prompts)]

    def mean_brightness(prompts, images):
        return images.mean(dim=(1, 2, 3)).tolist()
''')


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    pkg = tmp_path / "myrewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg / "mod.py"


def test_python_reward_by_dotted_path(user_module):
    from uniloop.rewards import reward_types

    cls = reward_types()["python"]
    r = cls(function="myrewards.mod:brevity", kwargs={"max_words": 2})
    out = r.score(text_batch(["red", "a red one", "skip"]), CTX)
    assert out.scores[:2].tolist() == [1.0, 0.0] and out.valid.tolist() == [True, True, False]
    # the dotted form without a colon, a .py file path, and per-sample calls
    assert cls(function="myrewards.mod.per_sample", batched=False).score(
        text_batch(["red", "blue"], ["red", "red"]), CTX).scores.tolist() == [1.0, 0.0]
    assert cls(function=f"{user_module}:per_sample", batched=False).score(
        text_batch(["red"], ["red"]), CTX).scores.tolist() == [1.0]
    img = cls(function="myrewards.mod:mean_brightness", modalities=["image"])
    assert img.modalities == ("image",)
    assert torch.allclose(img.score(image_batch(["a", "b"], torch.ones(2, 4, 4, 3) * 0.25), CTX).scores,
                          torch.tensor([0.25, 0.25]))
    for spec, msg in [("myrewards.nope:f", "cannot import 'myrewards.nope'"),
                      ("myrewards.mod:nope", "has no attribute 'nope'"), ("brevity", "cannot split")]:
        with pytest.raises(ValueError, match=msg):
            cls(function=spec)
    with pytest.raises(TypeError, match="must return 2 scores, got 1"):
        cls(function="myrewards.mod:wrong_length").score(text_batch(["a", "b"]), CTX)


# ----------------------------------------------------------------------------- mixtures
def test_mixture_names_reward_and_sample_and_excludes_nan(user_module):
    from uniloop.rewards.rules import PythonReward

    boom = PythonReward(function="myrewards.mod:boom")
    mix = RewardMixture([RewardSpec("ok", 1.0, PythonReward(function="myrewards.mod:nan_and_inf")),
                         RewardSpec("rulebook", 1.0, boom)])
    batch = text_batch(["a", "b", "c"], prompts=["fine", "also fine", "a bad prompt"])
    with pytest.raises(RewardError) as e:
        mix(batch, CTX)
    msg = str(e.value)
    assert "'rulebook'" in msg and "sample 2 of 3" in msg and "'a bad prompt'" in msg and "KeyError" in msg

    mix = RewardMixture([RewardSpec("ok", 2.0, PythonReward(function="myrewards.mod:nan_and_inf"))])
    out = mix(text_batch(["a", "b", "c"]), CTX)
    # NaN and inf are excluded (invalid), never folded into the total as numbers
    assert out.valid.tolist() == [False, False, True]
    assert out.components["ok"].valid.tolist() == [False, False, True]
    assert out.total[2].item() == pytest.approx(1.0) and torch.isfinite(out.total).all()
    assert int((~out.components["ok"].valid).sum()) == 2  # what the trainer logs as reward/ok/invalid


# ----------------------------------------------------------------------------- CLIP
def test_clip_weights_file_and_clipscore(tmp_path):
    import open_clip

    from uniloop.rewards.clip import TINY_CLIP_CONFIG, ClipReward, register_clip_config

    register_clip_config("uniloop-test-clip", TINY_CLIP_CONFIG)
    torch.manual_seed(3)
    src = open_clip.create_model("uniloop-test-clip", pretrained=None)
    path = tmp_path / "tiny_clip.pt"
    torch.save(src.state_dict(), path)
    raw = ClipReward(model="uniloop-test-clip", pretrained=str(path), batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(raw.model.state_dict().values(), src.state_dict().values()))
    fresh = ClipReward(model="uniloop-test-clip", pretrained=None)  # different random weights
    images = torch.rand(3, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    batch = image_batch(["a red image", "a blue image", "a cat"], images)
    cos = raw.score(batch, CTX).scores
    assert not torch.allclose(cos, fresh.score(batch, CTX).scores)
    raw.clipscore = True
    score = raw.score(batch, CTX).scores
    assert torch.allclose(score, 2.5 * cos.clamp(min=0), atol=1e-6)
    # the text tower alone: identical texts have cosine 1
    t = raw.text_cosine(["a red image", "a cat"], ["a red image", "a dog on a sofa"])
    assert t[0].item() == pytest.approx(1.0, abs=1e-5) and t[1].item() < 1 - 1e-4


# ----------------------------------------------------------------------------- self-understanding
@pytest.fixture(scope="module")
def fast_policy(tmp_path_factory):
    """A tiny real Janus without the palette-VQ fitting (these tests never decode image tokens)."""
    from uniloop.policies.janus import JanusPolicy
    from uniloop.policies.tiny import build_tiny_janus

    return JanusPolicy.from_pretrained(build_tiny_janus(tmp_path_factory.mktemp("su") / "janus", vq_fit_steps=0))


def test_extract_objects():
    from uniloop.rewards.self_understanding import extract_objects

    assert extract_objects("a photo of a red apple and a blue cup") == ["a red apple", "a blue cup"]
    assert extract_objects("A cat next to a green ball, with a hat.") == ["A cat", "a green ball", "a hat"]
    assert extract_objects("a red image") == ["a red image"]


def test_self_understanding_objects_and_reference(fast_policy, tmp_path):
    from uniloop.policies.tiny import solid_color_images
    from uniloop.rewards.self_understanding import SelfUnderstandingReward

    pol = fast_policy
    images = solid_color_images(["red", "blue"], pol.image_size)
    prompts = ["a red image and a blue image", "a blue image"]
    ctx = RewardContext(policy=pol)
    obj = SelfUnderstandingReward(questions="objects", judge="policy")
    out = obj.score(image_batch(prompts, images), ctx)
    q = "Does this image show {}? Answer yes or no."
    want0 = pol.yes_probability(images[[0, 0]], [q.format("a red image"), q.format("a blue image")]).mean()
    want1 = pol.yes_probability(images[[1]], [q.format("a blue image")])[0]
    assert torch.allclose(out.scores, torch.stack([want0, want1]).float(), atol=1e-5)
    assert out.details["questions"][0] == [q.format("a red image"), q.format("a blue image")]

    # questions_file overrides the extraction for the prompts it lists
    qf = tmp_path / "q.jsonl"
    qf.write_text('{"prompt": "a blue image", "questions": ["Is it blue?", "Is it dark?"]}\n')
    fixed = SelfUnderstandingReward(questions_file=str(qf), judge="policy").score(image_batch(prompts, images), ctx)
    assert torch.allclose(fixed.scores[1], pol.yes_probability(images[[1, 1]], ["Is it blue?", "Is it dark?"]).mean())
    qf.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="q.jsonl:1"):
        SelfUnderstandingReward(questions_file=str(qf))

    # judge=reference ignores the adapter, judge=policy follows it
    ref, cur = SelfUnderstandingReward(judge="reference"), SelfUnderstandingReward(judge="policy")
    before = ref.score(image_batch(prompts, images), ctx).scores
    pol.add_lora(r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pol.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    assert torch.allclose(ref.score(image_batch(prompts, images), ctx).scores, before, atol=1e-6)
    assert not torch.allclose(cur.score(image_batch(prompts, images), ctx).scores, before, atol=1e-4)


def test_cycle_consistency_clip(fast_policy):
    from uniloop.policies.tiny import solid_color_images
    from uniloop.rewards.clip import TINY_CLIP_CONFIG
    from uniloop.rewards.self_understanding import CycleConsistencyReward

    pol = fast_policy
    r = CycleConsistencyReward(scorer="clip", max_new_tokens=4,
                               clip={"model": "uniloop-cycle-clip", "pretrained": None, "model_config": TINY_CLIP_CONFIG})
    images = solid_color_images(["red", "green", "blue"], pol.image_size)
    prompts = ["a red image", "a green image", "a blue image"]
    out = r.score(image_batch(prompts, images), RewardContext(policy=pol, step=3))
    with pol.reference():  # captioner "reference" = adapter disabled (a no-op without an adapter)
        caps = pol.answer(images, [r.caption_question] * 3, seeds=[0, 1, 2], max_new_tokens=4,
                          temperature=0.0).answers
    assert out.details["caption"] == caps  # the policy's own (greedy) captions
    assert torch.allclose(out.scores, r.clip.text_cosine(caps, prompts), atol=1e-6)
    assert out.valid.all() and not math.isnan(out.scores.sum().item())
