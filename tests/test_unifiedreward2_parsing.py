"""UnifiedReward-2.0 multi-dimension verdicts: official-format strings parse to their numbers; every
malformed variant is unparseable (the caller marks the sample invalid), never a 0."""
import pytest

from uniloop.rewards.parsing import parse_dimension_scores, parse_pairwise_dimension_scores

# The example outputs printed by the official scripts (point_score_ACS_image_generation.py,
# pair_score_image_generation.py, point_score_APS_video_generation.py), verbatim in layout.
POINTWISE = ("Alignment Score (1-5): 2.694700002670288\n"
             "Coherence Score (1-5): 2.371500015258789\n"
             "Style Score (1-5): 2.802500009536743\n")
PAIRWISE = ("Alignment Score:\n Image 1: 0.435699999332428\n Image 2: 0.564300000667572\n\n"
            "Coherence Score:\n Image 1: 0.4180000126361847\n Image 2: 0.5820000171661377\n\n"
            "Style Score:\n Image 1: 0.40790000557899475\n Image 2: 0.5921000242233276\n")
VIDEO = "Alignment Score (1-5): 2.4036\nPhysics Score (1-5): 3.0987\nStyle Score (1-5): 3.3889\n"


def test_pointwise_official_example():
    v = parse_dimension_scores(POINTWISE)
    assert v.ok and v.final is None
    assert v.scores == {"alignment": 2.694700002670288, "coherence": 2.371500015258789, "style": 2.802500009536743}
    assert v.value() == pytest.approx((2.694700002670288 + 2.371500015258789 + 2.802500009536743) / 3)
    assert v.value("Style") == 2.802500009536743
    assert v.value("final") is None


def test_pointwise_variants_that_parse():
    # a final score line, markdown bold, a trailing period, CRLF line ends, a reasoning paragraph first
    text = ("The cat is there but the sofa is missing.\r\n**Alignment Score (1-5):** 2\r\n"
            "Coherence Score (1-5): 4.5.\r\nStyle Score (1-5): 5\r\nFinal Score: 3.8\r\n")
    v = parse_dimension_scores(text)
    assert v.ok and v.scores == {"alignment": 2.0, "coherence": 4.5, "style": 5.0} and v.final == 3.8
    assert v.value("final") == 3.8
    # the range may be left out; the video checkpoints grade Physics instead of Coherence
    assert parse_dimension_scores("Alignment Score: 1\nCoherence Score: 2\nStyle Score: 3").ok
    vid = parse_dimension_scores(VIDEO, dimensions=("alignment", "physics", "style"))
    assert vid.scores["physics"] == 3.0987
    assert parse_dimension_scores(VIDEO, dimensions=None).ok  # whatever dimensions appear
    assert parse_dimension_scores("<think>hm</think><answer>\n" + POINTWISE + "</answer>", cot=True).ok


@pytest.mark.parametrize("text,kw,reason", [
    ("", {}, "empty"),
    (POINTWISE, {"finished": False}, "truncated"),
    ("Alignment Score (1-5): 2.69\nCoherence Score (1-5): 2.37\n", {}, "missing dimension(s): style"),
    (VIDEO, {}, "missing dimension(s): coherence"),
    (POINTWISE + "Style Score (1-5): 2.802500009536743\n", {}, "several 'style"),  # even when equal
    (POINTWISE.replace("2.802500009536743", "6"), {}, "out of range"),
    (POINTWISE.replace("2.802500009536743", "0"), {}, "out of range"),
    (POINTWISE.replace("(1-5)", "(1-10)"), {}, "range"),  # a different scale is not rescaled
    (POINTWISE.replace("2.802500009536743", "2 or 3"), {}, "not a single number"),
    (POINTWISE.replace("2.802500009536743", "3/5"), {}, "not a single number"),
    (POINTWISE.replace("2.802500009536743", "2.8.1"), {}, "not a single number"),
    (POINTWISE.replace("2.802500009536743", "three"), {}, "not a single number"),
    (POINTWISE.replace("2.802500009536743", ""), {}, "not a single number"),  # cut after the colon
    (POINTWISE + "Final Score: 9\n", {}, "out of range"),
    (POINTWISE + "Final Score: 3\nFinal Score: 4\n", {}, "several 'Final Score'"),
    ("The image is nice.", {}, "missing"),
    (POINTWISE, {"cot": True}, "no <answer>"),
])
def test_pointwise_malformed_is_unparseable(text, kw, reason):
    v = parse_dimension_scores(text, **kw)
    assert not v.ok and v.scores is None and v.value() is None
    assert reason in v.error


def test_pairwise_official_example():
    v = parse_pairwise_dimension_scores(PAIRWISE)
    assert v.ok
    assert v.scores["alignment"] == (0.435699999332428, 0.564300000667572)
    assert v.scores["style"] == (0.40790000557899475, 0.5921000242233276)
    shares = [0.435699999332428 / (0.435699999332428 + 0.564300000667572),
              0.4180000126361847 / (0.4180000126361847 + 0.5820000171661377),
              0.40790000557899475 / (0.40790000557899475 + 0.5921000242233276)]
    assert v.value() == pytest.approx(sum(shares) / 3)  # image 1's mean share: image 2 wins here
    assert v.value() < 0.5 and v.value("coherence") == pytest.approx(shares[1])


def test_pairwise_layout_variants():
    inline = ("Alignment Score: Image 1: 0.7, Image 2: 0.3\nCoherence Score: Image 1: 0.5 / Image 2: 0.5\n"
              "**Style Score:**\n- Image 1: 0.25\n- Image 2: 0.75.\n")
    v = parse_pairwise_dimension_scores(inline)
    assert v.ok and v.scores == {"alignment": (0.7, 0.3), "coherence": (0.5, 0.5), "style": (0.25, 0.75)}
    answers = PAIRWISE.replace("Image", "Answer")
    assert parse_pairwise_dimension_scores(answers, subject="Answer").ok
    assert not parse_pairwise_dimension_scores(answers).ok  # the subject must be the configured one


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    (PAIRWISE.replace(" Image 2: 0.5921000242233276\n", ""), "style: needs one 'Image 1' and one 'Image 2'"),
    (PAIRWISE.replace("0.5921000242233276", "0.9"), "do not sum to 1"),
    (PAIRWISE.replace("0.435699999332428", "1.4357").replace("0.564300000667572", "-0.4357"), "outside [0, 1]"),
    (PAIRWISE.replace("0.5921000242233276", "0.59 or 0.6"), "is not a number"),
    (PAIRWISE.replace("0.5921000242233276", "high"), "is not a number"),
    (PAIRWISE.replace("Style Score:\n Image 1: 0.40790000557899475", "Style Score:\n Image 3: 0.40790000557899475"),
     "unknown label"),
    (PAIRWISE.replace(" Image 2: 0.564300000667572\n", " Image 1: 0.564300000667572\n"), "several 'Image 1'"),
    (PAIRWISE.split("Style Score")[0], "missing dimension(s): style"),
    (PAIRWISE + "Style Score:\n Image 1: 0.5\n Image 2: 0.5\n", "several 'style"),
    ("Image 1 is better.", "no '<dimension> Score:'"),  # the classic verdict is not this format
])
def test_pairwise_malformed_is_unparseable(text, reason):
    v = parse_pairwise_dimension_scores(text, dimensions=None if "Score" not in text else ("alignment", "coherence", "style"))
    assert not v.ok and v.value() is None
    assert reason in v.error


@pytest.fixture()
def ur2_server():
    """A real HTTP endpoint that answers every chat completion with the next UnifiedReward-2.0 verdict."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    replies = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps({"choices": [{"message": {"content": replies.pop(0)}, "finish_reason": "stop"}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", replies
    server.shutdown()


def test_judge_reward_reads_unifiedreward2_verdicts_over_http(ur2_server):
    import torch

    from uniloop.policies.batches import ImageRollout
    from uniloop.rewards.base import RewardContext
    from uniloop.rewards.judges import VLMJudge

    url, replies = ur2_server
    B = 3
    batch = ImageRollout(prompts=["a red cat"] * B, prompt_ids=torch.zeros(B, 2, dtype=torch.long),
                         prompt_mask=torch.ones(B, 2, dtype=torch.long), image_tokens=torch.zeros(B, 4, dtype=torch.long),
                         logprobs_cfg=torch.zeros(B, 4), logprobs_cond=torch.zeros(B, 4), images=torch.rand(B, 8, 8, 3),
                         group_ids=torch.zeros(B, dtype=torch.long))
    judge = VLMJudge(mode="generation_pointwise", backend="remote", base_url=url, model="UnifiedReward",
                     verdict="unifiedreward2", dimension="alignment", concurrency=1)
    replies += [POINTWISE, "Alignment Score (1-5): 6\nCoherence Score (1-5): 2\nStyle Score (1-5): 3\n", VIDEO]
    out = judge.score(batch, RewardContext())
    # (2.6947 - 1) / 4 for the official example; an out-of-range score is invalid, not clipped or 0
    assert out.scores[0].item() == pytest.approx((2.694700002670288 - 1) / 4, rel=1e-6)
    assert out.valid.tolist() == [True, False, True]
    assert out.scores[2].item() == pytest.approx((2.4036 - 1) / 4, rel=1e-6)
    pair = VLMJudge(mode="generation_pairwise", backend="remote", base_url=url, model="UnifiedReward",
                    verdict="unifiedreward2", concurrency=1)
    replies += [PAIRWISE] * 3  # 3 comparisons in a group of 3; image 1's mean share is the win
    share = (0.435699999332428 + 0.4180000126361847 + 0.40790000557899475 / (0.40790000557899475 + 0.5921000242233276)) / 3
    out = pair.score(batch, RewardContext())
    # sample 0 is image 1 twice, sample 2 is image 2 twice, sample 1 once each
    assert out.scores.tolist() == pytest.approx([share, 0.5, 1 - share], rel=1e-6)
