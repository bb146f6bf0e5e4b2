"""OCR reward: flow_grpo's accuracy formula by hand, then the reward on a tiny real TrOCR-style model
whose weights make greedy decoding read "cat"."""
import pytest
import torch

from tiny_reward_models import CTX, image_batch, tiny_trocr_dir
from uniloop.rewards.ocr import levenshtein, ocr_accuracy, quoted_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only contend


def test_levenshtein_and_accuracy_by_hand():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2
    assert ocr_accuracy("Hello World", "hello world") == 1.0  # spaces and case do not count
    assert ocr_accuracy("the sign says HELLO!", "hello") == 1.0  # contained: distance 0
    assert ocr_accuracy("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_accuracy("zzzzzzzzzzzz", "ab") == 0.0  # the distance is capped at the target length
    assert ocr_accuracy("", "abc") == 0.0
    assert ocr_accuracy("abc", " ") is None  # no target left: no score (invalid), not a division by zero
    assert quoted_text('a sign that says "Open Now" in red') == "Open Now"
    assert quoted_text('"a" and "b"') == "a"  # the first pair, as prompt.split('"')[1]
    assert quoted_text("a poster saying \u201cHi\u201d") == "Hi"
    assert quoted_text('no quotes here') is None and quoted_text('one " quote') is None


@pytest.fixture(scope="module")
def ocr():
    from uniloop.rewards.ocr import OcrReward
    return OcrReward(model=str(tiny_trocr_dir("cat")), batch_size=3, max_new_tokens=10)


def test_ocr_reward_reads_and_scores(ocr):
    prompts = ['a sign that says "cat"', 'a neon sign "CAT"', 'a board with "cab" on it', 'a poster: "big cat"',
               'a shop called "a cat sat"', 'graffiti "dog"', 'a sign saying "at"', 'no quoted text',
               'an empty sign ""', "a poster saying \u201ccat\u201d"]
    images = torch.rand(len(prompts), 30, 40, 3, generator=torch.Generator().manual_seed(0))
    out = ocr.score(image_batch(prompts, images), CTX)
    assert out.details["ocr_text"][0] == "cat"
    expected = [1.0, 1.0, 1 - 1 / 3, 1 - 3 / 6, 1 - 4 / 7, 0.0, 1.0, None, None, 1.0]
    assert out.valid.tolist() == [e is not None for e in expected]
    for s, e in zip(out.scores.tolist(), expected):
        if e is not None:
            assert s == pytest.approx(e)
    assert out.details["ocr_text"][7] is None  # invalid samples are not even read
    # targets are ignored by default (training tasks put a color word there) ...
    batch = image_batch(['says "cat"', "a plain prompt", 'says "dog"'], images[:3], targets=["", "cats", "cat"])
    assert ocr.score(batch, CTX).valid.tolist() == [True, False, True]
    # ... and win over the prompt's quotes with use_targets; batch == one by one
    ocr.use_targets = True
    try:
        got = ocr.score(batch, CTX)
        assert got.scores.tolist() == pytest.approx([1.0, 1 - 1 / 4, 1.0])
        for i in range(3):
            assert ocr.score(batch.select([i]), CTX).scores[0].item() == pytest.approx(got.scores[i].item())
    finally:
        ocr.use_targets = False
    bad = images[:2].clone()
    bad[0] = float("nan")
    assert ocr.score(image_batch(['"cat"', '"cat"'], bad), CTX).valid.tolist() == [False, True]
