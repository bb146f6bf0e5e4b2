"""Async reward scoring: rollouts are sampled in chunks and async rewards score chunk i while chunk
i+1 samples, without changing a single reward, advantage or sampled token."""
import threading
import time
from pathlib import Path

import pytest
import torch

from uniloop.rewards.base import RewardContext, RewardMixture, RewardSpec, register_reward
from uniloop.rewards.builtin import ColorReward
from uniloop.rl.config import ConfigError, load_config
from uniloop.rl.grpo import GRPOTrainer
from uniloop.rollouts.worker import RolloutRequest

REPO = Path(__file__).resolve().parents[1]


@register_reward("test_slow_color")
class SlowColor(ColorReward):
    """The color reward, taking `delay` seconds per call (a remote judge's latency); it records when
    and in which thread every call ran."""

    run_async = True
    calls: list = []

    def __init__(self, delay: float = 0.3):
        super().__init__()
        self.delay = delay

    def score(self, batch, context):
        start = time.perf_counter()
        time.sleep(self.delay)
        out = super().score(batch, context)
        SlowColor.calls.append({"start": start, "end": time.perf_counter(), "groups": batch.group_ids.unique().tolist(),
                                "thread": threading.current_thread().name})
        return out


@register_reward("test_policy_reader")
class PolicyReader(ColorReward):
    uses_policy = True


def cfg_for(tmp_path, tiny_janus_dir, name, *extra):
    return load_config(REPO / "configs" / "quickstart.yaml", [
        f"output_dir={tmp_path / name}", f"model.name_or_path={tiny_janus_dir}",
        "rollout.num_generations=4", "image_task.prompts_per_step=4", "text_task.prompts_per_step=2",
        "logging.progress_bar=false", "logging.tensorboard=false", *extra])


def test_split_keeps_whole_prompts_in_order():
    req = RolloutRequest("image", [f"p{i}" for i in range(5)], 3, step=2, targets=list("abcde"))
    chunks = req.split(3)
    assert [c.prompt_indices for c in chunks] == [[0, 1], [2], [3, 4]]
    assert [t for c in chunks for t in c.targets] == list("abcde")
    assert len(req.split(9)) == 5  # never more chunks than prompts


def test_async_reward_scores_a_chunk_while_the_next_one_samples(tmp_path, tiny_janus_dir):
    SlowColor.calls.clear()
    cfg = cfg_for(tmp_path, tiny_janus_dir, "run", "text_task=null", "rollout.scoring_chunks=4",
                  "rewards=[{name: slow, type: test_slow_color, args: {delay: 0.3}}]")
    trainer = GRPOTrainer(cfg)
    windows = []  # (start, end) of every sampling call
    sample = trainer.workers.worker.generate

    def timed(request):
        t0 = time.perf_counter()
        out = sample(request)
        windows.append((t0, time.perf_counter()))
        return out

    trainer.workers.worker.generate = timed
    m, scored = trainer.train_step()
    trainer.rewards.close()
    assert m["rollout/scoring_chunks"] == 4 and len(windows) == 4 and len(SlowColor.calls) == 4
    calls = sorted(SlowColor.calls, key=lambda c: c["start"])
    assert [c["groups"] for c in calls] == [[0], [1], [2], [3]]  # chunk by chunk, in order
    assert all(c["thread"] != threading.main_thread().name for c in calls)
    # chunk 0 was being scored while later chunks were still sampling (it started once chunk 0 was
    # sampled and before the last chunk was)
    assert windows[0][1] <= calls[0]["start"] < windows[-1][1]
    # 4 x 0.3 s of scoring, mostly hidden: the wait after the last chunk is about one call
    assert m["time/reward/slow"] >= 1.2
    assert m["time/reward_wait"] < m["time/reward/slow"]
    assert len(scored[0].batch) == 16 and scored[0].valid.all()


def test_chunked_async_scoring_gives_the_rewards_of_scoring_in_one_piece(tmp_path, tiny_janus_dir):
    runs = {}
    for name, extra in {"one_piece": ["rollout.scoring_chunks=1", "rewards[0].async_scoring=false"],
                        "chunked": ["rollout.scoring_chunks=3", "rewards[0].async_scoring=true"]}.items():
        # group z-scoring of a component and the running normalisation both see the whole batch
        cfg = cfg_for(tmp_path, tiny_janus_dir, name, *extra, "grpo.max_steps=2", "rewards[0].normalize=group",
                      "rewards[2].normalize=running")
        trainer = GRPOTrainer(cfg)
        runs[name] = [trainer.train_step() for _ in range(2)]
        trainer.rewards.close()
    for (m1, s1), (m2, s2) in zip(runs["one_piece"], runs["chunked"]):
        assert m2["rollout/scoring_chunks"] == 3 and m1["rollout/scoring_chunks"] == 1
        for a, b in zip(s1, s2):
            assert a.batch.kind == b.batch.kind
            assert torch.equal(a.batch.group_ids, b.batch.group_ids)
            tokens = "image_tokens" if a.batch.kind == "image" else "answer_ids"
            assert torch.equal(getattr(a.batch, tokens), getattr(b.batch, tokens))
            assert torch.allclose(a.rewards, b.rewards, atol=1e-6)
            assert torch.allclose(a.advantages, b.advantages, atol=1e-5)
            assert torch.equal(a.valid, b.valid)
            assert set(a.components) == set(b.components)
        for key in ("reward/mean", "reward/color/mean", "reward/exact_match/mean", "loss"):
            assert m1[key] == pytest.approx(m2[key], abs=1e-5), key


def test_an_async_reward_that_raises_is_named_with_its_sample():
    class Broken(ColorReward):
        run_async = True

        def score(self, batch, context):
            if any("blue" in p for p in batch.prompts):
                raise ValueError("judge crashed")
            return super().score(batch, context)

    from uniloop.policies.batches import ImageRollout
    mix = RewardMixture([RewardSpec("broken", 1.0, Broken())])
    batch = ImageRollout.concat([_image_batch(p) for p in ["a red image", "a blue image"]])
    pending = mix.submit(batch, RewardContext())
    with pytest.raises(RuntimeError, match=r"reward 'broken' \(Broken\) failed on image sample 1 of 2 "
                                           r"\(prompt 'a blue image'\): ValueError: judge crashed"):
        pending.result()
    mix.close()


def _image_batch(prompt):
    from uniloop.policies.batches import ImageRollout
    return ImageRollout(prompts=[prompt], prompt_ids=torch.zeros(1, 2, dtype=torch.long),
                        prompt_mask=torch.ones(1, 2, dtype=torch.long),
                        image_tokens=torch.zeros(1, 4, dtype=torch.long), logprobs_cfg=torch.zeros(1, 4),
                        logprobs_cond=torch.zeros(1, 4), images=torch.full((1, 8, 8, 3), 0.5),
                        group_ids=torch.zeros(1, dtype=torch.long),
                        targets=[""])


def test_a_reward_that_reads_the_policy_cannot_run_async(tmp_path, tiny_janus_dir):
    with pytest.raises(ConfigError, match=r"rewards\[1\]\.async_scoring' cannot be true for reward type "
                                          r"'self_understanding'"):
        cfg_for(tmp_path, tiny_janus_dir, "run", "rewards[1].async_scoring=true")
    with pytest.raises(ValueError, match="cannot be scored in the background"):
        RewardSpec("reader", 1.0, PolicyReader(), run_async=True)
