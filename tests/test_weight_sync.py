"""Full weights (learner.full_finetune) to Ray rollout actors and from learner ranks, bucket by bucket
(rollouts/weight_sync.py): every tensor arrives, no bucket exceeds the limit, and the actors sample
exactly what the driver samples with the same weights."""
import pytest
import torch

ray = pytest.importorskip("ray")

from test_ray import QUICKSTART, ray_local, train_overrides  # noqa: E402,F401  (ray_local: a fixture)
from uniloop.rl.config import load_config  # noqa: E402
from uniloop.rl.grpo import GRPOTrainer  # noqa: E402
from uniloop.rl.loop import train  # noqa: E402
from uniloop.rl.runlog import read_metrics  # noqa: E402
from uniloop.rollouts.weight_sync import tensor_buckets  # noqa: E402


def test_buckets_keep_order_and_every_tensor_and_stay_under_the_limit():
    sizes = [10, 300, 50, 50, 1000, 20, 20, 20]  # float32 elements; 1000 x 4 bytes is over the limit alone
    named = [(f"t{i}", torch.full((n,), float(i))) for i, n in enumerate(sizes)]
    buckets = list(tensor_buckets(iter(named), 1600))
    flat = [(k, v) for b in buckets for k, v in b.items()]
    assert [k for k, _ in flat] == [k for k, _ in named] and all(torch.equal(a, b) for (_, a), (_, b) in zip(flat, named))
    for b in buckets:
        size = sum(t.numel() * 4 for t in b.values())
        assert size <= 1600 or len(b) == 1  # only a tensor over the limit travels alone
    assert [list(b) for b in buckets] == [["t0", "t1", "t2"], ["t3"], ["t4"], ["t5", "t6", "t7"]]


BUCKET_MB = 0.05  # ~52 KB: the tiny model's decoder weights (~0.3 MB) travel in several buckets


def run(tiny_janus_dir, out, sets):
    base = train_overrides(tiny_janus_dir, out) + [
        "learner.full_finetune=true", "grpo.beta=0.04", "grpo.learning_rate=1e-3", "grpo.max_steps=3",
        "learner.num_workers=2", "learner.strategy=fsdp", "learner.num_cpus_per_worker=0.5",
        "grpo.per_device_train_batch_size=8", f"rollout.weight_bucket_mb={BUCKET_MB}"]
    train(load_config(QUICKSTART, base + sets), GRPOTrainer)
    return read_metrics(out / "metrics.jsonl")


def test_fully_fine_tuned_weights_reach_rollout_actors_bucket_by_bucket(ray_local, tiny_janus_dir, tmp_path):
    """2 FSDP ranks stream the trained weights to the driver, the driver sends them to a Ray rollout
    actor; the actor then samples the rollouts the driver samples itself (rollout.num_workers 0) with
    the same weights: the same rewards every step."""
    actors = run(tiny_janus_dir, tmp_path / "actors", ["rollout.num_workers=1"])
    driver = run(tiny_janus_dir, tmp_path / "driver", ["rollout.num_workers=0"])
    limit = BUCKET_MB * 2 ** 20
    assert [r["step"] for r in actors] == [r["step"] for r in driver] == [1, 2, 3]
    for a, d in zip(actors, driver):
        assert a["reward/mean"] == d["reward/mean"] and a["reward/image/mean"] == d["reward/image/mean"], a["step"]
        # every trained byte went to the actor, in several buckets under the limit, and from the ranks too
        assert a["sync/bytes"] == a["learner/weights_bytes"] == d["learner/weights_bytes"] > 4 * limit
        assert a["sync/buckets"] >= 4 and a["sync/max_bucket_bytes"] <= limit
        assert a["learner/weight_buckets"] == a["sync/buckets"] and a["learner/max_bucket_bytes"] <= limit
        assert "sync/buckets" not in d
    assert len({r["reward/mean"] for r in actors}) > 1  # the weights moved between steps


def test_a_restarted_actor_gets_the_full_weights_again(ray_local, tiny_janus_dir, tmp_path):
    """Killed between two steps, the rollout actor comes back with the base weights; the pool sends it
    the current full weights before its shard is re-run, so the step samples with the learner's weights
    (the sampler's recorded log-probs == the learner's teacher-forced ones)."""
    from uniloop.rollouts.ray_pool import kill_actor_process
    cfg = load_config(QUICKSTART, train_overrides(tiny_janus_dir, tmp_path / "run") + [
        "learner.full_finetune=true", "grpo.beta=0.04", "grpo.learning_rate=1e-3", "grpo.max_steps=4",
        "rollout.num_workers=1", f"rollout.weight_bucket_mb={BUCKET_MB}"])
    trainer = GRPOTrainer(cfg)
    try:
        pool = trainer.workers
        for step in (1, 2, 3):
            if step == 3:
                killed = kill_actor_process(pool, 0)
            m = trainer.train_step().metrics
            assert m["logprob/sampler_vs_learner_max_abs_diff"] < 1e-4, step
        assert m["rollout/restarts"] == 1 and pool.slots[0].pid != killed
        batch = trainer.train_step().samples[0].batch  # a 4th step: the restarted actor keeps up
        with torch.no_grad():
            learner = trainer.policy.rollout_logprobs(batch, "cfg").cpu()
            with trainer.policy.reference():
                base = trainer.policy.rollout_logprobs(batch, "cfg").cpu()
        assert (learner - base).abs().max() > 1e-2  # the trained weights are far from the base ones
        actor = ray.get(pool.actor_handles()[0].teacher_forced_logprobs.remote(batch, "cfg"))
        assert (actor - learner).abs().max() < 1e-4
    finally:
        trainer.close()
