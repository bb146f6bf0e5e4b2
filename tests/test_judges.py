"""VLM judges on a tiny real Qwen2.5-VL: local backend, `uniloop serve-judge` in a separate process
with the remote backend (retries, timeouts, HTTP 500, API key), invalid verdicts, and the
reward-mixture recipe under `uniloop train`."""
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import torch

from uniloop.policies.batches import ImageRollout, TextRollout
from uniloop.policies.tiny import solid_color_images
from uniloop.rewards.base import RewardContext, RewardMixture, RewardSpec
from uniloop.rewards.builtin import ColorReward
from uniloop.rewards.judges import VLMJudge, fill_template, group_pairs
from uniloop.rewards.parsing import parse_final_score, parse_preference

CTX = RewardContext()
SECRET = "sk-uniloop-test-7f3a9c"  # must never show up in a log, a repr or a detail
KEY_ENV = "UNILOOP_TEST_JUDGE_KEY"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from uniloop.rewards.tiny_judge import build_tiny_vlm_judge
    return build_tiny_vlm_judge(tmp_path_factory.mktemp("judges") / "vlm_judge")


@pytest.fixture(scope="module")
def local_judges(judge_dir):
    """One loaded judge per mode (loading the tiny checkpoint takes ~0.3 s, fitting happened once)."""
    return {m: VLMJudge(mode=m, model=str(judge_dir), max_new_tokens=12)
            for m in ("generation_pointwise", "generation_pairwise", "understanding_pointwise",
                      "understanding_pairwise")}


@pytest.fixture(scope="module")
def judge_server(judge_dir, tmp_path_factory):
    """`uniloop serve-judge` as a separate process on 127.0.0.1 (port 0: it prints the URL)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, KEY_ENV: SECRET, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "uniloop.rl.cli", "serve-judge", str(judge_dir), "--port", "0",
           "--served-model-name", "tiny-judge", "--test-faults", "--batch-wait-ms", "200",
           "--api-key-env", KEY_ENV, "--log-requests"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=180)
            m = re.search(r"(http://\S+/v1)", line)
            url = m.group(1) if m else None
        assert requests.get(url.replace("/v1", "/health"), timeout=10).json() == {"status": "ok"}
        yield url, log
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0  # SIGTERM = clean shutdown


def stats(url):
    return requests.get(url.replace("/v1", "/stats"), timeout=10).json()


def image_batch(prompts, images, group_ids=None):
    B = len(prompts)
    z = torch.zeros(B, 1, dtype=torch.long)
    return ImageRollout(prompts=list(prompts), prompt_ids=z, prompt_mask=z, image_tokens=z,
                        logprobs_cfg=torch.zeros(B, 1), logprobs_cond=torch.zeros(B, 1), images=images,
                        group_ids=torch.as_tensor(group_ids if group_ids is not None else range(B)))


def text_batch(questions, answers, images, group_ids=None):
    B = len(answers)
    z = torch.zeros(B, 1, dtype=torch.long)
    return TextRollout(prompts=list(questions), images=images, prompt_ids=z, prompt_mask=z,
                       pixel_values=torch.zeros(B, 3, 4, 4), answer_ids=z, answer_mask=z,
                       logprobs_sampled=torch.zeros(B, 1), answers=list(answers),
                       group_ids=torch.as_tensor(group_ids if group_ids is not None else range(B)))


NAMES = ["red", "green", "blue", "yellow"]
PROMPTS = [f"a {c} image" for c in NAMES]
IMAGES = torch.cat([solid_color_images(NAMES[:2], 8),
                    torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(0))])


# ----------------------------------------------------------------------------- templates
def test_fill_template_places_images_and_keeps_other_braces():
    red, blue = torch.zeros(2, 2, 3), torch.ones(2, 2, 3)
    parts = fill_template('JSON {"k": 1} {prompt} between {image2} and {image1} {unknown} {low}-{high}', [red, blue],
                          prompt="a cat", low="1", high="5")
    assert parts[0] == 'JSON {"k": 1} a cat between ' and parts[1] is blue and parts[3] is red
    assert parts[4] == " {unknown} 1-5"
    lead = fill_template("Caption: {prompt}", [red], prompt="x")  # no slot: image first (UnifiedReward layout)
    assert lead[0] is red and lead[1] == "Caption: x"
    with pytest.raises(ValueError, match=r"must contain \{answer1\}, \{answer2\}"):
        VLMJudge(mode="understanding_pairwise", backend="remote", base_url="http://127.0.0.1:9/v1",
                 template="Question: {question}")


def test_group_pairs():
    g = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    assert group_pairs(g, "all") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (5, 6)]
    assert group_pairs(g, "ring") == [(0, 1), (0, 3), (1, 2), (2, 3), (5, 6)]


# ----------------------------------------------------------------------------- local backend
def test_local_pointwise_rewards_are_the_parsed_verdicts(local_judges):
    judge = local_judges["generation_pointwise"]
    out = judge.score(image_batch(PROMPTS, IMAGES), CTX)
    assert len(out.details["judge_text"]) == 4
    for text, score, valid in zip(out.details["judge_text"], out.scores, out.valid):
        v = parse_final_score(text, 1, 5)
        assert valid == v.ok
        if v.ok:  # normalize: unit -> (x - 1) / 4
            assert score.item() == pytest.approx((v.value - 1) / 4)
    assert out.valid.all()  # the fitted tiny judge writes well-formed verdicts

    # understanding pointwise: 0-100 after Final Score, normalised to 0-1
    und = local_judges["understanding_pointwise"]
    tb = text_batch(["What color is this image?"] * 4, ["red", "blue", "the the", "yellow"], IMAGES)
    out = und.score(tb, CTX)
    for text, score in zip(out.details["judge_text"], out.scores):
        assert score.item() == pytest.approx(parse_final_score(text, 0, 100).value / 100)
    with pytest.raises(ValueError, match="scores text rollouts, got image"):
        und.score(image_batch(PROMPTS, IMAGES), CTX)


def test_local_pairwise_win_rates(local_judges):
    judge = local_judges["generation_pairwise"]
    images = torch.cat([IMAGES, IMAGES[:3]])
    batch = image_batch(PROMPTS + PROMPTS[:3], images, group_ids=[0, 0, 0, 1, 1, 1, 2])
    out = judge.score(batch, CTX)
    # every comparison hands out exactly one win (or two halves): with all pairs judged, a group's
    # win rates average 1/2; the lone sample has nobody to compare with and is invalid.
    assert out.valid.tolist() == [True] * 6 + [False]
    assert "no other sample" in out.details["judge_error"][6]
    for g in (slice(0, 3), slice(3, 6)):
        assert out.scores[g].mean().item() == pytest.approx(0.5)
    assert set(out.scores[:6].tolist()) <= {0.0, 0.5, 1.0}
    for t in out.details["judge_text"][:6]:
        assert parse_preference(t).ok

    und = local_judges["understanding_pairwise"]
    tb = text_batch(["What color is this image?"] * 3, ["red", "green", "a the"], IMAGES[:3].clone(), [0, 0, 0])
    out = und.score(tb, CTX)
    assert out.valid.all() and out.scores.mean().item() == pytest.approx(0.5)


@pytest.fixture(scope="module")
def random_judge_dir(tmp_path_factory):
    from uniloop.rewards.tiny_judge import build_tiny_vlm_judge
    return build_tiny_vlm_judge(tmp_path_factory.mktemp("judges") / "random_judge", fit_steps=0)


def test_random_judge_is_invalid_never_zero(random_judge_dir):
    """An untrained VLM writes garbage: every verdict is unparseable, excluded, counted — never 0."""
    from uniloop.rl.losses import grpo_advantages

    judge = VLMJudge(model=str(random_judge_dir), max_new_tokens=8)
    batch = image_batch(PROMPTS, IMAGES, group_ids=[0, 0, 0, 0])
    out = judge.score(batch, CTX)
    assert not out.valid.any() and torch.isnan(out.scores).all()
    assert all(e for e in out.details["judge_error"])
    mix = RewardMixture([RewardSpec("color", 1.0, ColorReward()), RewardSpec("judge", 1.0, judge)])
    m = mix(batch, CTX)
    assert not m.valid.any() and int((~m.components["judge"].valid).sum()) == 4
    adv, _ = grpo_advantages(m.total, batch.group_ids, m.valid)
    assert (adv == 0).all()  # nothing learnt from samples whose judge failed


# ----------------------------------------------------------------------------- remote backend
def remote(url, **kw):
    return VLMJudge(backend="remote", base_url=url, model="tiny-judge", api_key_env=KEY_ENV, max_new_tokens=12,
                    concurrency=4, **kw)


def test_remote_judge_matches_local_and_batches(judge_server, local_judges, monkeypatch):
    url, _ = judge_server
    monkeypatch.setenv(KEY_ENV, SECRET)
    before = stats(url)
    local = local_judges["generation_pointwise"].score(image_batch(PROMPTS, IMAGES), CTX)
    out = remote(url).score(image_batch(PROMPTS, IMAGES), CTX)
    # same model, greedy: the server answers what the local backend answers
    assert out.details["judge_text"] == local.details["judge_text"]
    assert torch.equal(out.valid, local.valid) and torch.allclose(out.scores, local.scores)
    after = stats(url)
    assert after["requests"] - before["requests"] == 4
    assert after["max_batch"] > 1  # concurrent requests were merged into one generate call


def test_remote_retries_then_counts_invalid_and_never_logs_the_key(judge_server, monkeypatch, caplog):
    from uniloop.rl.losses import grpo_advantages

    url, server_log = judge_server
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = remote(url, timeout=120, max_retries=2, backoff=0.05)
    prompts = ["a red image", "a blue image [[fault:500x1]]", "a green image [[fault:500]]", "a cyan image"]
    batch = image_batch(prompts, IMAGES, group_ids=[0, 0, 0, 0])
    mix = RewardMixture([RewardSpec("color", 1.0, ColorReward()), RewardSpec("judge", 1.0, judge)])
    before = stats(url)
    with caplog.at_level(logging.WARNING, logger="uniloop.rewards.judges"):
        m = mix(batch, CTX)
    # a 500 that clears on the first retry is a normal verdict; a persistent 500 is retried
    # max_retries times, then that sample is invalid and the batch goes on
    out = m.components["judge"]
    assert out.valid.tolist() == [True, True, False, True] and m.valid.tolist() == [True, True, False, True]
    assert out.details["judge_error"][2].startswith("HTTP 500")
    assert stats(url)["requests"] - before["requests"] == 1 + 2 + 3 + 1
    assert "retry 1/2" in caplog.text and "gave up" in caplog.text
    # the failed sample is dropped from the advantages; the others are normalised among themselves
    adv, _ = grpo_advantages(m.total, batch.group_ids, m.valid)
    keep = m.valid
    want, _ = grpo_advantages(m.total[keep], batch.group_ids[keep])
    assert adv[2] == 0 and torch.allclose(adv[keep], want)

    # a judge that does not answer in time: retried, then invalid
    slow = remote(url, timeout=1.0, max_retries=1, backoff=0.05)
    n0 = stats(url)["requests"]
    with caplog.at_level(logging.WARNING, logger="uniloop.rewards.judges"):
        out = slow.score(image_batch(["a yellow image [[fault:sleep=20]]"], IMAGES[:1]), CTX)
    assert not out.valid.any() and "timed out" in out.details["judge_error"][0]
    assert stats(url)["requests"] - n0 == 2

    # a wrong key is an HTTP 401: not retried (it cannot succeed), invalid
    monkeypatch.setenv("UNILOOP_WRONG_KEY", "sk-wrong")
    bad = VLMJudge(backend="remote", base_url=url, model="tiny-judge", api_key_env="UNILOOP_WRONG_KEY",
                   max_retries=3, backoff=0.05)
    n0 = stats(url)["requests"]
    out = bad.score(image_batch(PROMPTS[:1], IMAGES[:1]), CTX)
    assert not out.valid.any() and out.details["judge_error"][0].startswith("HTTP 401")
    assert stats(url)["requests"] - n0 == 1
    with pytest.raises(ValueError, match="UNILOOP_UNSET_KEY"):
        VLMJudge(backend="remote", base_url=url, api_key_env="UNILOOP_UNSET_KEY")

    assert SECRET not in caplog.text and SECRET not in repr(judge.backend) and SECRET not in str(out.details)
    assert SECRET not in server_log.read_text()


# ----------------------------------------------------------------------------- recipe under `uniloop train`
@pytest.fixture(scope="module")
def fast_janus_dir(tmp_path_factory):
    from uniloop.policies.tiny import build_tiny_janus
    return build_tiny_janus(tmp_path_factory.mktemp("janus") / "janus", vq_fit_steps=0)


def train(tmp_path, fast_janus_dir, judge_dir, *extra):
    from uniloop.rl.cli import main

    out = tmp_path / "run"
    argv = ["train", str(REPO / "configs" / "reward_mix.yaml"), "--set", f"output_dir={out}",
            "--set", f"model.tiny_dir={fast_janus_dir}", "--set", "model.tiny={vq_fit_steps: 0}",
            "--set", "grpo.max_steps=2", "--set", "rollout.num_generations=2",
            "--set", f"rewards[2].args.cache_dir={judge_dir}", "--set", f"rewards[3].args.cache_dir={judge_dir}",
            "--set", "logging.image_grid_every=0", *[x for kv in extra for x in ("--set", kv)]]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


COMPONENTS = ["clip", "self_understanding", "judge", "answer_judge", "exact_match", "one_word"]


def test_recipe_runs_with_local_and_remote_judges(tmp_path, fast_janus_dir, judge_dir, judge_server, monkeypatch):
    """configs/reward_mix.yaml under `uniloop train`, its image judge moved to the served endpoint
    (the answer judge stays on the local backend): every component is logged, nothing invalid."""
    url, _ = judge_server
    monkeypatch.setenv(KEY_ENV, SECRET)
    n0 = stats(url)["requests"]
    rows = train(tmp_path, fast_janus_dir, judge_dir, "rewards[2].args.backend=remote",
                 f"rewards[2].args.base_url={url}", "rewards[2].args.model=tiny-judge",
                 f"rewards[2].args.api_key_env={KEY_ENV}")
    assert len(rows) == 2
    for name in COMPONENTS:
        assert all(f"reward/{name}/mean" in r and f"reward/{name}/invalid" in r for r in rows), name
    assert all(r["reward/judge/invalid"] == 0 and r["reward/answer_judge/invalid"] == 0 for r in rows)
    assert stats(url)["requests"] - n0 == 2 * 4 * 2  # steps x prompts x generations, one request each


def test_run_aborts_when_judge_stays_invalid(tmp_path, fast_janus_dir, random_judge_dir, capsys):
    # image task only, judged by the random (garbage-writing) judge: 100% invalid from step 1.
    # The CLI stops with exit 1 and one line naming the step, the reward, the cause and the metrics file.
    from uniloop.rl.cli import main

    out = tmp_path / "run"
    argv = ["train", str(REPO / "configs" / "reward_mix.yaml"), "--set", f"output_dir={out}",
            "--set", f"model.tiny_dir={fast_janus_dir}", "--set", "model.tiny={vq_fit_steps: 0}",
            "--set", "grpo.max_steps=2", "--set", "rollout.num_generations=2",
            "--set", f"rewards[2].args.cache_dir={random_judge_dir}",
            "--set", f"rewards[3].args.cache_dir={random_judge_dir}", "--set", "logging.image_grid_every=0"]
    for kv in ("rewards[2].args.tiny={fit_steps: 0}", "rewards[3].args.tiny={fit_steps: 0}", "text_task=null",
               "grpo.max_invalid_fraction=0.5", "grpo.invalid_patience=1"):
        argv += ["--set", kv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"step 1: 100% of samples had an invalid reward for 1 consecutive", err), err
    assert "judge: 8 invalid" in err and str(out / "metrics.jsonl") in err
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    assert all(r["reward/judge/invalid"] == 4 * 2 for r in rows)
