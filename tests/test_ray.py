"""Distributed rollouts on a real Ray runtime: determinism, weight sync, faults, rollout jobs, two nodes.

One local Ray (num_cpus=2, own temp dir) is shared by the tests of this module; actors ask for half a
CPU each so two rollout actors and a reward actor fit. Models are the tiny real Janus of conftest.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import perturb_adapter  # noqa: E402
from uniloop.rl.config import ConfigError, load_config  # noqa: E402
from uniloop.rl.jobs import run_job  # noqa: E402
from uniloop.rollouts.job import read_records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
JOB_RECIPE = str(REPO / "configs" / "rollout_job.yaml")


def _short_tmp(prefix: str) -> str:
    # Ray puts unix sockets under its temp dir: keep the path short (the socket path limit is ~107 bytes)
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@pytest.fixture(scope="module")
def ray_local():
    tmp = _short_tmp("ulray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def train_overrides(model_dir, out) -> list[str]:
    """A small GRPO run on both tasks; every value the comparison depends on is set here, not in the
    quickstart recipe (which is tuned separately)."""
    return [f"model.name_or_path={model_dir}", f"output_dir={out}", "seed=0", "algorithm=grpo",
            "rollout.num_generations=4", "rollout.cfg_scale=3.0", "rollout.temperature=1.0", "rollout.top_k=0",
            "rollout.max_new_tokens=2", "rollout.logprob_mode=cfg", "rollout.batch_size=64",
            "rollout.num_workers=0", "rollout.one_step_off=false", "rollout.num_cpus_per_worker=0.5",
            "grpo.learning_rate=3e-3", "grpo.beta=0.0", "grpo.num_iterations=1", "grpo.eval_steps=0",
            "grpo.per_device_train_batch_size=64", "grpo.gradient_accumulation_steps=1", "grpo.max_steps=3",
            "image_task.prompts=[a red image, a green image, a blue image]", "image_task.prompts_file=null",
            "image_task.prompts_per_step=3", "text_task.synthetic_colors=[red, green]",
            "text_task.question=What color is this image?", "text_task.data_file=null",
            "text_task.prompts_per_step=2", "rewards=[{name: color}, {name: exact_match}]",
            "logging.tensorboard=false", "logging.progress_bar=false", "logging.image_grid_every=0",
            "logging.save_every=0", "logging.log_every=1"]


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- training
def test_train_with_two_ray_workers_gives_in_process_rewards(ray_local, tiny_janus_dir, tmp_path):
    from uniloop.rl.cli import main

    a, b = tmp_path / "inproc", tmp_path / "ray2"
    assert main(["train", QUICKSTART, *sets(train_overrides(tiny_janus_dir, a))]) == 0
    # the Ray run also streams: 3 chunks per task, each scored by a reward actor (async) as soon as it
    # is back, while the actors sample the next chunk
    assert main(["train", QUICKSTART, *sets(train_overrides(tiny_janus_dir, b) + [
        "rollout.num_workers=2", "rollout.scoring_chunks=3",
        "rewards=[{name: color, type: ray_actor, args: {reward: color, num_cpus: 0.5}}, {name: exact_match}]"])]) == 0
    ra, rb = metrics_rows(a), metrics_rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3]
    keys = ["reward/mean", "reward/color/mean", "reward/exact_match/mean", "reward/image/mean", "reward/text/mean"]
    for x, y in zip(ra, rb):
        for k in keys:
            assert x[k] == pytest.approx(y[k], abs=1e-6), (x["step"], k)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert y["rollout/workers"] == 2 and y["rollout/version_lag"] == 0
        assert y["sync/bytes"] > 0 and y["sync/seconds"] > 0
        assert y["logprob/sampler_vs_learner_max_abs_diff"] < 1e-4
        assert y["rollout/scoring_chunks"] == 3 and y["time/reward/color"] > 0 and y["reward/color/restarts"] == 0
    # the comparison is not vacuous: the updates changed what later steps sample
    assert ra[0]["reward/color/mean"] != ra[2]["reward/color/mean"]


def test_workers_sample_with_the_newest_adapter_even_after_a_restart(ray_local, tiny_janus_dir, tmp_path):
    from uniloop.rl.grpo import GRPOTrainer
    from uniloop.rollouts.ray_pool import kill_actor_process

    cfg = load_config(QUICKSTART, train_overrides(tiny_janus_dir, tmp_path / "run") +
                      ["rollout.num_workers=2", "grpo.max_steps=4"])
    trainer = GRPOTrainer(cfg)
    pool, policy = trainer.workers, trainer.policy
    try:
        killed = None
        for step in range(1, 5):
            if step == 3:  # between two steps, after the version-2 sync: the new process must catch up
                killed = kill_actor_process(pool, 0)
            m, scored = trainer.train_step()
            assert [sb.batch.version for sb in scored] == [step - 1] * len(scored)
            # learner's teacher-forced log-probs == the log-probs the actors recorded while sampling
            assert m["logprob/sampler_vs_learner_max_abs_diff"] < 1e-4, step
            assert m["adapter/version"] == step and m["rollout/version_lag"] == 0
        assert m["rollout/restarts"] == 1 and pool.slots[0].pid != killed
        assert m["sync/bytes"] == sum(t.numel() * t.element_size() for t in policy.adapter_state_dict().values())

        batch = scored[0].batch
        with torch.no_grad():
            learner = policy.rollout_logprobs(batch, "cfg").cpu()
            with policy.reference():
                base = policy.rollout_logprobs(batch, "cfg").cpu()
        # the check above is sensitive: the trained adapter moved the log-probs far beyond its tolerance
        assert (learner - base).abs().max() > 1e-2
        # after the last sync every actor (the restarted one included) holds the learner's adapter
        for h in pool.actor_handles():
            assert (ray.get(h.teacher_forced_logprobs.remote(batch, "cfg")) - learner).abs().max() < 1e-4
        # a pool that missed a sync refuses to sample instead of silently using old weights
        requests = [t.request(9, 2) for t in trainer.tasks]
        with pytest.raises(RuntimeError, match="sync"):
            pool.generate(requests, version=policy.version + 1)
    finally:
        trainer.workers.close()


def test_one_step_off_uses_the_samplers_logprobs_as_old(ray_local, tiny_janus_dir, tmp_path):
    from uniloop.rl.grpo import GRPOTrainer

    with pytest.raises(ConfigError, match="max_staleness"):
        load_config(QUICKSTART, train_overrides(tiny_janus_dir, tmp_path / "x") +
                    ["rollout.num_workers=2", "rollout.one_step_off=true", "rollout.max_staleness=0"])
    cfg = load_config(QUICKSTART, train_overrides(tiny_janus_dir, tmp_path / "run") +
                      ["rollout.num_workers=2", "rollout.one_step_off=true", "rollout.max_staleness=1",
                       "rollout.scoring_chunks=2",  # the prefetch is chunked like the step it stands for
                       # the uncorrected ratio (with the correction, the default, the learner's log-probs are the
                       # old ones and the lag goes into the weight: tests/test_sampler_mismatch.py)
                       "grpo.vllm_importance_sampling_correction=false"])
    trainer = GRPOTrainer(cfg)
    policy = trainer.policy
    try:
        m1, s1 = trainer.train_step()
        v1_state = policy.adapter_state_dict()  # the adapter step 3's samples were drawn with
        assert [sb.batch.version for sb in s1] == [0, 0] and m1["ratio/first_step_max_abs_dev"] == 0.0
        m2, s2 = trainer.train_step()
        m3, s3 = trainer.train_step()
        for m, scored, v in ((m2, s2, 0), (m3, s3, 1)):
            assert m["rollout/prefetched"] == 1.0 and m["rollout/version_lag"] == 1
            assert [sb.batch.version for sb in scored] == [v, v]
            for sb in scored:  # the ratio's denominator is what the sampler used, not a learner recompute
                assert torch.equal(sb.old_logprobs, sb.batch.logprobs("cfg"))
            assert m["ratio/first_step_max_abs_dev"] > 1e-3  # off-policy by one update: rho != 1
        # ...and those recorded log-probs are right for the adapter version each batch reports
        final_state, final_version = policy.adapter_state_dict(), policy.version
        with torch.no_grad():
            with policy.reference():  # version 0 = the fresh adapter (B = 0) = the base model
                lp = policy.rollout_logprobs(s2[0].batch, "cfg").cpu()
            assert (lp - s2[0].batch.logprobs("cfg")).abs().max() < 1e-4
            policy.set_adapter_state_dict(v1_state)
            lp = policy.rollout_logprobs(s3[0].batch, "cfg").cpu()
            assert (lp - s3[0].batch.logprobs("cfg")).abs().max() < 1e-4
        policy.set_adapter_state_dict(final_state, final_version)
    finally:
        trainer.workers.close()


def test_staleness_and_resource_errors_are_clear(ray_local, tiny_janus_dir, tmp_path):
    from types import SimpleNamespace

    from uniloop.rl.trainer import policy_spec, sampling_settings
    from uniloop.rollouts.ray_pool import RayWorkerPool, check_staleness
    stale = [SimpleNamespace(kind="image", version=3)]
    assert check_staleness(stale, 4, 1) == 1
    with pytest.raises(RuntimeError, match=r"staleness 2 > rollout.max_staleness=1"):
        check_staleness(stale, 5, 1)
    cfg = load_config(QUICKSTART, train_overrides(tiny_janus_dir, tmp_path / "run") +
                      ["rollout.num_workers=2", "rollout.num_gpus_per_worker=0.5"])
    with pytest.raises(ValueError, match="need 1 GPUs, but the Ray cluster has 0"):
        RayWorkerPool(policy_spec(cfg), sampling_settings(cfg), cfg.rollout, cfg.seed, cfg.ray)


def flow_run(tiny_sd3_dir, out, num_workers: int, one_step_off: bool = False, steps: int = 2,
             algorithm: str = "flow_grpo", flow: str = "") -> list[dict]:
    """`steps` steps of `algorithm` (same seed, same config) sampled in-process or by `num_workers` Ray actors."""
    from uniloop.rl.algorithms import get_algorithm

    cfg = load_config(text=f"""
output_dir: {out}
algorithm: {algorithm}
seed: 0
flow: {{name_or_path: {tiny_sd3_dir}, max_sequence_length: 8, num_steps: 4, cfg_scale: 2.0, noise_level: 0.7{flow}}}
lora: {{r: 4, alpha: 8}}
rollout: {{num_generations: 4, num_workers: {num_workers}, num_cpus_per_worker: 0.5, one_step_off: {str(one_step_off).lower()},
           max_staleness: {int(one_step_off)}}}
grpo: {{learning_rate: 3.0e-2, beta: 0.0, epsilon: 0.2, per_device_train_batch_size: 64, max_steps: {steps}}}
image_task: {{prompts: [a red image, a blue image, a green image], prompts_per_step: 3}}
rewards: [{{name: color}}]
logging: {{progress_bar: false, tensorboard: false, image_grid_every: 0, save_every: 0, log_every: 1}}
""")
    get_algorithm(algorithm)(cfg, resume=False)
    return metrics_rows(Path(out))


def test_flow_grpo_with_two_ray_workers_gives_in_process_rewards(ray_local, tiny_sd3_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy-sized tensors (and the actors run beside the learner on 2 cores)
    try:
        ra = flow_run(tiny_sd3_dir, tmp_path / "inproc", 0)
        rb = flow_run(tiny_sd3_dir, tmp_path / "ray2", 2)
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb):
        # each actor samples a shard (a smaller batch than in-process): per-sample seeds make the noise
        # identical, but batched float32 matmuls of other shapes may differ in the last bits
        assert x["reward/color/mean"] == pytest.approx(y["reward/color/mean"], abs=1e-5), x["step"]
        assert y["rollout/workers"] == 2 and y["rollout/version_lag"] == 0 and y["sync/bytes"] > 0
        # the actors' recorded log-probs are the learner's: ratio 1 on the first on-policy pass
        assert y["ratio/first_step_max_abs_dev"] < 1e-4
    # step 2 was sampled with the synced (trained) adapter, so it tests the sync, not just the base model
    assert ra[1]["adapter/version"] == rb[1]["adapter/version"] == 2


def test_diffusion_nft_on_two_ray_workers_gives_in_process_rewards(ray_local, tiny_sd3_dir, tmp_path):
    """The actors sample with the old (EMA) adapter they are sent after each update. (One ~50 s test: the
    SDE-window variants go through the same request.step -> sample_images path, tested in-process.)"""
    algorithm, flow = "diffusion_nft", ""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ra = flow_run(tiny_sd3_dir, tmp_path / "inproc", 0, algorithm=algorithm, flow=flow)
        rb = flow_run(tiny_sd3_dir, tmp_path / "ray2", 2, algorithm=algorithm, flow=flow)
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb):
        assert x["reward/color/mean"] == pytest.approx(y["reward/color/mean"], abs=1e-5), x["step"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3, abs=1e-6) and y["rollout/workers"] == 2


def test_flow_grpo_one_step_off_trains_on_the_prefetched_step(ray_local, tiny_sd3_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = flow_run(tiny_sd3_dir, tmp_path / "off", 2, one_step_off=True, steps=3)
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["rollout/prefetched"] == 0.0 and rows[0]["ratio/first_step_max_abs_dev"] < 1e-4
    for r in rows[1:]:
        # sampled by the actors while the previous step trained: one adapter version behind, and the
        # ratio is taken against the log-probs recorded by the sampler (so it is no longer 1)
        assert r["rollout/prefetched"] == 1.0 and r["rollout/version_lag"] == 1
        assert r["ratio/first_step_max_abs_dev"] > 1e-4
        assert r["reward/color/mean"] == r["reward/color/mean"]  # finite, not NaN


def test_reward_actor_scores_like_in_process_and_survives_a_kill(ray_local, tiny_policy, tmp_path):
    from uniloop.rewards.base import RewardContext
    from uniloop.rewards.builtin import ColorReward
    from uniloop.rewards.ray_actor import RayActorReward
    from uniloop.rewards.base import build_mixture

    cfg = load_config(None, ["rewards=[{name: color, type: ray_actor, args: {reward: color, num_cpus: 0.5}}]"])
    mixture = build_mixture(cfg.rewards)
    remote = mixture.specs[0].reward
    assert isinstance(remote, RayActorReward) and remote.modalities == ("image",)
    batch = tiny_policy.sample_images(["a red image", "a blue image"] * 2, seeds=[1, 2, 3, 4], cfg_scale=1.0)
    ctx = RewardContext(step=1)
    local = ColorReward().score(batch, ctx)
    try:
        assert torch.equal(remote.score(batch, ctx).scores, local.scores)
        os.kill(remote.pid, signal.SIGKILL)
        again = remote.score(batch, ctx)  # restarted by Ray, the batch scored again
        assert torch.equal(again.scores, local.scores) and remote.restarts == 1
        assert mixture(batch, ctx).total.allclose(local.scores)
        assert mixture.metrics() == {"reward/color/restarts": 1.0}  # logged every step as reward/<name>/restarts
    finally:
        mixture.close()


# ----------------------------------------------------------------------------- rollout jobs
@pytest.fixture(scope="module")
def job_inputs(tiny_janus_dir, tmp_path_factory):
    """A prompt file with image prompts and answer records, and a trained-looking adapter."""
    from PIL import Image

    from uniloop.policies.janus import JanusPolicy
    from uniloop.policies.tiny import COLORS

    root = tmp_path_factory.mktemp("job_inputs")
    lines = [{"prompt": f"a {c} image", "target": c} for c in ["red", "green", "blue", "yellow", "cyan", "white"]]
    for c in ["red", "blue"]:
        Image.new("RGB", (32, 32), tuple(int(255 * v) for v in COLORS[c])).save(root / f"{c}.png")
        lines.append({"image": f"{c}.png", "question": "What color is this image?", "target": c})
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    policy = JanusPolicy.from_pretrained(tiny_janus_dir)
    policy.add_lora(r=4, alpha=8)
    perturb_adapter(policy, scale=0.3, seed=1)
    policy.save_adapter(root / "adapter")
    return {"prompts": root / "prompts.jsonl", "adapter": root / "adapter", "num_prompts": len(lines)}


SAMPLES = 3


def job_overrides(model_dir, inputs, out) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"output_dir={out}", "seed=0",
            f"job.prompts={inputs['prompts']}", f"job.adapter={inputs['adapter']}",
            f"job.samples_per_prompt={SAMPLES}", "job.prompts_per_shard=2", "job.limit=null",
            "rollout.cfg_scale=3.0", "rollout.temperature=1.0", "rollout.top_k=0", "rollout.max_new_tokens=2",
            "rollout.num_workers=0", "rollout.num_cpus_per_worker=0.5",
            "rewards=[{name: color}, {name: exact_match}]"]


@pytest.fixture(scope="module")
def reference_job(tiny_janus_dir, job_inputs, tmp_path_factory):
    """The uninterrupted in-process job every other job run must reproduce, record for record."""
    out = tmp_path_factory.mktemp("reference_job")
    run_job(load_config(JOB_RECIPE, job_overrides(tiny_janus_dir, job_inputs, out)), progress=False)
    return {r["id"]: r for r in read_records(out)}


def assert_complete_and_equal(records, reference, num_prompts):
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == num_prompts * SAMPLES  # none lost, none duplicated
    assert {(r["prompt_index"], r["sample_index"]) for r in records} == \
        {(p, s) for p in range(num_prompts) for s in range(SAMPLES)}
    for r in records:
        ref = reference[r["id"]]
        assert r["seed"] == ref["seed"] and r.get("answer") == ref.get("answer")
        assert r["reward"] == pytest.approx(ref["reward"], abs=1e-6)


def test_killing_a_rollout_actor_mid_job_loses_and_duplicates_nothing(ray_local, tiny_janus_dir, job_inputs,
                                                                       reference_job, tmp_path):
    from uniloop.rollouts.ray_pool import kill_actor_process

    out = tmp_path / "job"
    cfg = load_config(JOB_RECIPE, job_overrides(tiny_janus_dir, job_inputs, out) + ["rollout.num_workers=2"])
    killed = []

    def kill_after_first_shard(k, backend):
        if k == 0:  # shard 1 is already in flight on the actors
            killed.append(kill_actor_process(backend.pool, 0))

    summary = run_job(cfg, progress=False, on_shard=kill_after_first_shard)
    records = read_records(out)
    assert_complete_and_equal(records, reference_job, job_inputs["num_prompts"])
    assert summary["this_run"]["rollout/restarts"] == 1 and summary["duplicates"] == 0
    pids = {r["worker_pid"] for r in records}
    assert killed[0] in pids and len(pids) == 3  # two actors + the restarted one all produced records
    assert all(r["adapter"] == str(job_inputs["adapter"].absolute()) for r in records)


def test_rollout_job_with_async_rewards_writes_the_reference_records(tiny_janus_dir, job_inputs, reference_job,
                                                                    tmp_path):
    """Async rewards score shard k while shard k+1 samples; the records are those of the sync job."""
    out = tmp_path / "job"
    args = job_overrides(tiny_janus_dir, job_inputs, out)
    args[-1] = "rewards=[{name: color, async_scoring: true}, {name: exact_match, async_scoring: true}]"
    written = []
    run_job(load_config(JOB_RECIPE, args), progress=False, on_shard=lambda k, backend: written.append(k))
    records = read_records(out)
    assert written == sorted(written) and len(written) == -(-job_inputs["num_prompts"] // 2)  # in order
    assert_complete_and_equal(records, reference_job, job_inputs["num_prompts"])
    for r in records:
        assert r["rewards"] == reference_job[r["id"]]["rewards"] and r["reward"] == reference_job[r["id"]]["reward"]


def test_interrupted_rollout_job_resumes_without_duplicates(tiny_janus_dir, job_inputs, reference_job, tmp_path):
    from uniloop.rl.cli import main

    out = tmp_path / "job"
    args = job_overrides(tiny_janus_dir, job_inputs, out)

    def interrupt(k, backend):
        if k == 1:
            raise KeyboardInterrupt  # Ctrl-C after two shards are on disk
    with pytest.raises(KeyboardInterrupt):
        run_job(load_config(JOB_RECIPE, args), progress=False, on_shard=interrupt)
    first = {r["id"]: r for r in read_records(out)}
    assert len(first) == 4 * SAMPLES
    # what a kill in the middle of writing a shard leaves behind
    (out / "shards" / ".shard_00002.tmp").write_text('{"id": "partial"')
    (out / "images" / "shard_00002").mkdir()

    assert main(["rollout", JOB_RECIPE, *sets(args)]) == 0
    records = read_records(out)
    assert_complete_and_equal(records, reference_job, job_inputs["num_prompts"])
    assert all(first[i] == r for r in records for i in [r["id"]] if i in first)  # earlier records untouched
    assert not (out / "shards" / ".shard_00002.tmp").exists()
    # a finished job re-run samples nothing; a changed setting is refused instead of mixed in
    assert main(["rollout", JOB_RECIPE, *sets(args)]) == 0
    assert len(read_records(out)) == len(records)
    assert main(["rollout", JOB_RECIPE, *sets(args + ["job.samples_per_prompt=5"])]) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == len(records) and set(summary["rewards"]) == {"total", "color", "exact_match"}
    assert summary["rewards"]["exact_match"]["valid"] == 2 * SAMPLES
    gallery = (out / "gallery.html").read_text()
    best = max((r for r in records if r["kind"] == "image"), key=lambda r: r["reward"])
    worst = min((r for r in records if r["kind"] == "image"), key=lambda r: r["reward"])
    assert best["image"] in gallery and worst["image"] in gallery and "answer:" in gallery
    assert all((out / r["image"]).exists() for r in records if r["kind"] == "image")


def test_rollout_job_runs_across_two_nodes(tiny_janus_dir, job_inputs, reference_job, tmp_path, two_node_cluster):
    """Two Ray nodes on loopback (ray.cluster_utils.Cluster); `uniloop rollout` joins with ray.address."""
    cluster, worker = two_node_cluster
    out = tmp_path / "job"
    args = job_overrides(tiny_janus_dir, job_inputs, out) + [
        "rollout.num_workers=2", "rollout.num_cpus_per_worker=1", f"ray.address={cluster.address}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "uniloop.rl.cli", "rollout", JOB_RECIPE, *sets(args)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_records(out)
    assert_complete_and_equal(records, reference_job, job_inputs["num_prompts"])
    # one actor per node (1 CPU each): both nodes produced records
    assert {r["node_id"] for r in records} == {cluster.head_node.node_id, worker.node_id}
