"""Learner ranks (rl/distributed.py): 2 gloo ranks on a real local Ray make the one-rank update.

Every comparison runs the same recipe twice, learner.num_workers 1 (the in-process learner) and 2
(Ray actors, DDP or FSDP2), on the tiny real Janus of conftest. Both sample the same batch (same
seed, same weights), so what differs is only where the update runs. Tolerances: float32 sums split
over two ranks reorder additions (~1e-7 relative); 1e-6 is the issue's bound on the weights, held on
the elements whose AdamW steps are well conditioned (`AdamConditioning` derives why the others can
differ by more). Runs with the same rank count (resume vs uninterrupted) are compared outright.
"""
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import perturb_adapter  # noqa: E402
from test_ray import QUICKSTART, ray_local, train_overrides  # noqa: E402,F401  (ray_local: a fixture)
from uniloop.rl.config import load_config  # noqa: E402
from uniloop.rl.distributed import trainable_state  # noqa: E402
from uniloop.rl.grpo import GRPOTrainer  # noqa: E402
from uniloop.rl.loop import train  # noqa: E402
from uniloop.rl.runlog import read_metrics  # noqa: E402

RANKS = ["learner.num_cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def perturbed_adapter(tiny_janus_dir, tmp_path_factory):
    """A LoRA adapter with non-zero A and B (a fresh one has B = 0, so A would get no gradient)."""
    from uniloop.policies.janus import JanusPolicy
    policy = JanusPolicy.from_pretrained(tiny_janus_dir)
    policy.add_lora(r=4, alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|up_proj)")
    perturb_adapter(policy, scale=0.05, seed=1)
    path = tmp_path_factory.mktemp("adapter") / "perturbed"
    policy.save_adapter(path)
    return path


class AdamConditioning:
    """Which elements of the in-process learner's trained tensors had every AdamW step well conditioned:
    sqrt(v_hat) >= 100 x eps at each step (an optimizer step post-hook records the minimum). AdamW moves
    an element by lr * m_hat / (sqrt(v_hat) + eps); at step 1 that is lr * g / (|g| + eps), whose slope
    in g is eps / (|g| + eps)^2: up to 1/eps = 1e8 where |g| ~ eps, at most 1e4 where |g| >= 100 eps. A
    rounding-level gradient difference (float32 sums split over ranks, ~1e-10 here) thus moves a
    well-conditioned weight by < lr * 1e4 * 1e-10 (~1e-9), an ill-conditioned one by up to AdamW's step
    bound: only the former are held to 1e-6 (`same_weights`)."""

    def __init__(self, trainer):
        self.names = {id(p): n for n, p in trainer.policy.model.named_parameters()}
        self.low: dict[str, torch.Tensor] = {}
        self.handle = trainer.optimizer.register_step_post_hook(self.record) if trainer.learners is None else None

    def record(self, opt, args, kwargs):
        (_, b2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
        for p, st in opt.state.items():
            ok = (st["exp_avg_sq"] / (1 - b2 ** float(st["step"]))).sqrt() >= 100 * eps
            name = self.names[id(p)]
            self.low[name] = ok & self.low[name] if name in self.low else ok

    def masks(self) -> dict[str, torch.Tensor] | None:
        if self.handle is None:
            return None
        self.handle.remove()
        return self.low


def same_weights(w1: dict, w2: dict, ok: dict | None) -> tuple[float, int]:
    """Max |w1 - w2| over the well-conditioned elements (`AdamConditioning`), and how many were left out."""
    diff, left = 0.0, 0
    for k in w1:
        m = ok[k] if ok is not None and k in ok else torch.ones_like(w1[k], dtype=torch.bool)
        if m.any():
            diff = max(diff, (w1[k] - w2[k])[m].abs().max().item())
        left += int((~m).sum())
    return diff, left


def one_step(cfg):
    trainer = GRPOTrainer(cfg)
    try:
        before, watch = trainable_state(trainer.policy), AdamConditioning(trainer)
        metrics, scored = trainer.train_step()
        metrics["_conditioned"] = watch.masks()
        return before, trainable_state(trainer.policy), metrics, [sb.batch for sb in scored]
    finally:
        trainer.close()


def assert_same_update(one, two, moved: float):
    (w0, w1, m1, b1), (v0, w2, m2, b2) = one, two
    for x, y in zip(b1, b2):  # the same batch was sampled: the comparison is about the update only
        assert torch.equal(x.answer_ids if x.kind == "text" else x.image_tokens,
                           y.answer_ids if y.kind == "text" else y.image_tokens)
    assert set(w1) == set(w2) and all(torch.equal(w0[k], v0[k]) for k in w0)
    change = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    diff, left = same_weights(w1, w2, m1["_conditioned"])
    total = sum(t.numel() for t in w1.values())
    print(f"1 vs 2 ranks: max abs diff {diff:.3g} on {total - left} of {total} elements (update {change:.3g})")
    assert change > moved, change  # the update did something measurable
    assert diff < 1e-6, (diff, change)
    assert left < 0.01 * total, left
    assert abs(m1["loss"] - m2["loss"]) < 1e-6 * max(1.0, abs(m1["loss"]))
    assert abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-5 * m1["grad_norm"]


def test_two_ddp_ranks_make_the_one_rank_adapter_update(ray_local, tiny_janus_dir, perturbed_adapter, tmp_path):
    # dapo + KL + gradient accumulation: normalisers over the whole optimizer step and the whole rollout
    # batch; per-device micro-batches of 3 rows with 1 rank are 6-row micro-batches split 3/3 on 2 ranks,
    # and the text batch (8 rows) ends in a 2-row micro-batch split 1/1.
    base = train_overrides(tiny_janus_dir, tmp_path / "run") + [
        f"lora.init_adapter={perturbed_adapter}", "grpo.beta=0.04", "grpo.loss_type=dapo",
        "grpo.gradient_accumulation_steps=2", "grpo.max_steps=1"]
    one = one_step(load_config(QUICKSTART, base + ["grpo.per_device_train_batch_size=6",
                                                   f"output_dir={tmp_path / 'one'}"]))
    two = one_step(load_config(QUICKSTART, base + RANKS + ["learner.num_workers=2", "grpo.per_device_train_batch_size=3",
                                                           f"output_dir={tmp_path / 'two'}"]))
    assert_same_update(one, two, moved=1e-4)
    assert two[2]["learner/weights_bytes"] > 0


def test_two_fsdp_ranks_make_the_one_rank_full_finetuning_update(ray_local, tiny_janus_dir, tmp_path):
    base = train_overrides(tiny_janus_dir, tmp_path / "run") + [
        "learner.full_finetune=true", "grpo.loss_type=bnpo", "grpo.learning_rate=1e-4", "grpo.max_steps=1"]
    one = one_step(load_config(QUICKSTART, base + ["grpo.per_device_train_batch_size=8",
                                                   f"output_dir={tmp_path / 'one'}"]))
    two = one_step(load_config(QUICKSTART, base + RANKS + [
        "learner.num_workers=2", "learner.strategy=fsdp", "grpo.per_device_train_batch_size=4",
        f"output_dir={tmp_path / 'two'}"]))
    assert_same_update(one, two, moved=5e-5)
    assert any("mlp" in k for k in one[1]) and not any("lora" in k for k in one[1])  # every decoder weight trains


def rewards(run_dir) -> dict[int, float]:
    return {r["step"]: r["reward/mean"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "reward/mean" in r}


def kill_rank_after(run_dir: Path, step: int, rank: int = 1):
    """A thread that SIGKILLs one learner rank's process once `step` is in the metrics."""
    def reached() -> bool:
        try:
            return max(rewards(run_dir), default=0) >= step
        except (OSError, ValueError):  # not written yet, or a line being written
            return False

    def watch():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if reached():
                info = json.loads((run_dir / "learner.json").read_text())
                os.kill(info["ranks"][rank]["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


STEPS = 20


def long_run(tiny_janus_dir, root: Path) -> list[str]:
    # lr 1e-3 with the KL keeps every image group's rewards varied for all 20 steps (lr 3e-3 without
    # it collapses every group onto one image by step 7, after which the steps compare nothing)
    return train_overrides(tiny_janus_dir, root / "run") + [
        f"grpo.max_steps={STEPS}", "grpo.learning_rate=1e-3", "grpo.beta=0.04", "logging.save_every=5",
        "logging.keep_checkpoints=4"]


def two_ranks(base: list[str]) -> list[str]:
    return base + RANKS + ["learner.num_workers=2", "grpo.per_device_train_batch_size=32"]


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "checkpoints" / f"step_{STEPS:06d}" / "adapter" / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tiny_janus_dir, tmp_path_factory):
    """The 20-step recipe, uninterrupted, on 1 rank (in-process) and on 2 ranks: their run dirs."""
    root = tmp_path_factory.mktemp("long")
    base = long_run(tiny_janus_dir, root)
    dirs = {"one": root / "one", "two": root / "two"}
    train(load_config(QUICKSTART, base + [f"output_dir={dirs['one']}"]), GRPOTrainer)
    train(load_config(QUICKSTART, two_ranks(base) + [f"output_dir={dirs['two']}"]), GRPOTrainer)
    return dirs


def test_two_ranks_log_the_one_rank_rewards_for_20_steps(uninterrupted):
    """The same rollouts every step: a reward that differs at step k means the ranks' update made a
    different policy. (The adapters themselves are compared between runs with the same rank count:
    1 rank sums a micro-batch's gradient in one pass, 2 ranks in two halves and an all-reduce, so the
    gradients differ by float32 rounding; AdamW divides each element by sqrt(v) + 1e-8, which turns a
    rounding-level difference on an element whose gradient is ~1e-8 into up to lr/4 x its relative
    difference: measured 6e-5 on a handful of the 35k adapter elements, set at steps 1-2.)"""
    one, two = (read_metrics(uninterrupted[k] / "metrics.jsonl") for k in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert a["reward/mean"] == b["reward/mean"], a["step"]
        assert a["reward/image/mean"] == b["reward/image/mean"], a["step"]
        assert a["health/flat_group_fraction"] < 1.0, a["step"]  # some group still carries a signal
    assert len({r["reward/mean"] for r in one}) > STEPS // 2  # the rewards move
    assert all(r["learner/weights_bytes"] > 0 for r in two) and not any("learner/weights_bytes" in r for r in one)


def test_colocated_ranks_sample_the_split_mode_rollouts(ray_local, tiny_janus_dir, tmp_path, uninterrupted):
    """learner.mode colocated: the ranks shard and sample every step with the weights they train, no
    tensors go to a sampler, and the run is the split-mode run (the driver sampled with rank 0's
    tensors): the same rewards step by step, the same adapter at step 5. Not bitwise: each colocated rank
    samples its own shard (other batch shapes than the driver's whole batch), so the matmuls round per
    CPU (AMD vs Intel differ, measured 3e-8 on a step-2 reward); a flipped token or pixel moves a reward
    mean by >= 1e-3, and AdamW turns rounding into at most ~lr/4 per element, so the bounds are
    1e-5 on rewards and lr/2 = 5e-4 (max) and 1% (relative to the update) on the adapter."""
    out = tmp_path / "colocated"
    base = long_run(tiny_janus_dir, tmp_path)
    train(load_config(QUICKSTART, two_ranks(base) + [f"output_dir={out}", "grpo.max_steps=5",
                                                     "learner.mode=colocated"]), GRPOTrainer)
    rows, split = read_metrics(out / "metrics.jsonl"), read_metrics(uninterrupted["two"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for a, b in zip(rows, split):
        assert abs(a["reward/mean"] - b["reward/mean"]) < 1e-5, a["step"]
        assert abs(a["reward/text/mean"] - b["reward/text/mean"]) < 1e-5, a["step"]
        assert a["rollout/workers"] == 2.0 and a["sync/bytes"] == 0.0 and "rollout/workers" not in b
    from safetensors.torch import load_file
    ckpt = "checkpoints/step_000005/adapter/adapter_model.safetensors"
    colocated, split5 = load_file(str(out / ckpt)), load_file(str(uninterrupted["two"] / ckpt))
    assert max_diff(colocated, split5) < 5e-4
    # PEFT starts every lora_B at zero, so its norm at step 5 is the size of five updates
    b_keys = [k for k in split5 if "lora_B" in k]
    update = sum((split5[k].double() ** 2).sum() for k in b_keys) ** 0.5
    gap = sum(((colocated[k] - split5[k]).double() ** 2).sum() for k in b_keys) ** 0.5
    assert update > 0
    assert gap < 1e-2 * update


def test_a_killed_rank_stops_the_run_and_resume_continues_exactly(ray_local, tiny_janus_dir, tmp_path, uninterrupted):
    """A rank SIGKILLed after step 8 stops the run with a message naming --resume; --resume on 2 ranks
    (the ranks' DCP files: weights, AdamW moments and step counts) ends on the uninterrupted 2-rank
    run's adapter (bitwise on CPU: measured 0.0) with its per-step rewards; --resume on 1 rank (another
    rank count: DCP reshards) starts from the state rank 0 had and logs the same rewards."""
    base = long_run(tiny_janus_dir, tmp_path)
    ref = rewards(uninterrupted["one"])
    run_dir = tmp_path / "two"
    watcher = kill_rank_after(run_dir, 8)
    with pytest.raises(RuntimeError, match="learner rank died.*--resume"):
        train(load_config(QUICKSTART, two_ranks(base) + [f"output_dir={run_dir}"]), GRPOTrainer)
    watcher.join(timeout=5)
    done = rewards(run_dir)
    assert 8 <= max(done) < STEPS and all(done[s] == ref[s] for s in done)
    one_dir = tmp_path / "two_then_one"
    shutil.copytree(run_dir, one_dir)

    train(load_config(QUICKSTART, two_ranks(base) + [f"output_dir={run_dir}"]), GRPOTrainer, resume=True)
    assert rewards(run_dir) == ref
    assert (run_dir / "checkpoints" / f"step_{STEPS:06d}" / "learner").exists()
    assert max_diff(final_adapter(run_dir), final_adapter(uninterrupted["two"])) < 1e-6

    # 1 rank from the ranks' DCP files: the in-process optimizer gets rank 0's AdamW state exactly. The
    # driver's state.pt holds a copy pulled from rank 0; it is zeroed here, so only DCP can supply it.
    from uniloop.rl.checkpoint import latest_checkpoint
    state_file = latest_checkpoint(one_dir) / "state.pt"
    state = torch.load(state_file, weights_only=False)
    want = state["optimizer"]["state"]
    state["optimizer"] = {**state["optimizer"], "state": {i: {k: torch.zeros_like(torch.as_tensor(v)) for k, v in s.items()}
                                                          for i, s in want.items()}}
    torch.save(state, state_file)
    trainer = GRPOTrainer(load_config(QUICKSTART, base + [f"output_dir={one_dir}"]))
    try:
        assert trainer.resume()
        got = trainer.optimizer.state_dict()["state"]
        assert set(got) == set(want) and len(got) > 0
        for i in want:
            assert float(want[i]["step"]) == max(done) // 5 * 5 * 2  # 2 optimizer steps (image, text) a step
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(torch.as_tensor(got[i][key]), torch.as_tensor(want[i][key])), (i, key)
    finally:
        trainer.close()
    train(load_config(QUICKSTART, base + [f"output_dir={one_dir}"]), GRPOTrainer, resume=True,
          allow_config_change=True)
    assert rewards(one_dir) == ref
    assert not (one_dir / "checkpoints" / f"step_{STEPS:06d}" / "learner").exists()


def test_two_ranks_on_a_two_node_cluster_put_one_rank_on_each_node(tiny_janus_dir, tmp_path, two_node_cluster):
    """`uniloop train --set learner.num_workers=2` against two Ray nodes (1 CPU each): STRICT_SPREAD
    places rank 0 and rank 1 on different nodes, and the step trains."""
    import subprocess
    import sys

    cluster, worker = two_node_cluster
    out = tmp_path / "run"
    args = train_overrides(tiny_janus_dir, out) + [
        "grpo.max_steps=1", "learner.num_workers=2", "learner.num_cpus_per_worker=1",
        "learner.placement_strategy=STRICT_SPREAD", f"ray.address={cluster.address}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    sets = [x for a in args for x in ("--set", a)]
    proc = subprocess.run([sys.executable, "-m", "uniloop.rl.cli", "train", QUICKSTART, *sets], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = json.loads((out / "learner.json").read_text())["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["node_id"] for r in ranks} == {cluster.head_node.node_id, worker.node_id}
    assert rewards(out).keys() == {1}


@pytest.mark.parametrize("sets, key", [
    (["learner.mixed_precision=bf16"], "learner.mixed_precision"),
    (["learner.cpu_offload=true"], "learner.cpu_offload"),
    (["learner.num_workers=0"], "learner.num_workers"),
    (["learner.strategy=zero3"], "learner.strategy"),
    (["learner.num_workers=2", "algorithm=diffusion_dpo", "learner.mode=colocated"], "learner.mode"),
    (["learner.num_workers=2", "algorithm=flow_grpo", "learner.strategy=fsdp"], "learner.strategy"),
    (["learner.full_finetune=true", "algorithm=diffusion_dpo"], "learner.full_finetune"),
    (["learner.full_finetune=true", "rollout.weight_bucket_mb=0"], "rollout.weight_bucket_mb"),
    (["learner.num_workers=2", "learner.mode=colocated", "learner.strategy=fsdp"], "learner.mode"),
    (["learner.num_workers=2", "learner.mode=colocated", "rollout.num_workers=1"], "rollout.num_workers"),
    (["learner.num_workers=2", "learner.mode=colocated", "algorithm=dpo"], "learner.mode"),
])
def test_bad_learner_settings_exit_2_naming_the_key_before_any_model_loads(sets, key, tmp_path, capsys):
    from uniloop.rl.cli import main
    args = ["train", QUICKSTART, "--set", f"output_dir={tmp_path / 'run'}", "--set", "model.name_or_path=tiny",
            "--set", f"model.tiny_dir={tmp_path / 'never_built'}"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{key}" in err[0], err
    assert not (tmp_path / "never_built").exists()


def test_full_finetuning_kl_is_taken_against_the_frozen_starting_weights(ray_local, tiny_janus_dir, tmp_path):
    """With no adapter to disable, the reference is a frozen copy of the starting weights (on FSDP2
    ranks: each rank's shards). Step 1's KL is 0 (the policy is the reference); step 2's is > 0: the
    policy moved away from it. Were the reference the moving policy, every on-policy KL would be
    exactly 0. 2 FSDP ranks log the 1-rank KL and end on the 1-rank weights."""
    base = train_overrides(tiny_janus_dir, tmp_path / "run") + [
        "learner.full_finetune=true", "grpo.beta=0.04", "grpo.learning_rate=1e-4", "grpo.max_steps=2",
        "grpo.gradient_accumulation_steps=4"]  # one optimizer step a step: a moving reference gives KL 0

    def two_steps(cfg):
        trainer = GRPOTrainer(cfg)
        try:
            start, watch = trainable_state(trainer.policy), AdamConditioning(trainer)
            kls = [trainer.train_step().metrics["kl"] for _ in range(2)]
            end = trainable_state(trainer.policy)
            two_steps.conditioned = watch.masks()
            with trainer.policy.reference():  # the reference pass sees the starting weights...
                assert all(torch.equal(p.detach(), start[n]) for n, p in trainer.policy.model.named_parameters()
                           if n in start)
            now = trainable_state(trainer.policy)  # ...and the trained ones come back after it
            assert all(torch.equal(now[k], end[k]) for k in end)
            return kls, start, end
        finally:
            trainer.close()

    (k1, s1, e1) = two_steps(load_config(QUICKSTART, base + ["grpo.per_device_train_batch_size=8",
                                                             f"output_dir={tmp_path / 'one'}"]))
    conditioned = two_steps.conditioned  # the 1-rank run's well-conditioned elements (AdamConditioning)
    print("full-FT KL per step, 1 rank:", k1)
    assert k1[0] < 1e-9 and k1[1] > 1e-7, k1
    assert max((e1[k] - s1[k]).abs().max().item() for k in e1) > 5e-5
    (k2, _, e2) = two_steps(load_config(QUICKSTART, base + RANKS + [
        "learner.num_workers=2", "learner.strategy=fsdp", "grpo.per_device_train_batch_size=4",
        f"output_dir={tmp_path / 'two'}"]))
    diff, left = same_weights(e1, e2, conditioned)
    total = sum(t.numel() for t in e1.values())
    print("full-FT KL per step, 2 fsdp ranks:", k2, f"weights diff {diff:.3g} on {total - left} of {total} elements")
    # (the kl metric is each rank's mean over its rows, averaged: close to, not bitwise, the 1-rank mean)
    assert k2[0] < 1e-9 and abs(k2[1] - k1[1]) < 1e-3 * k1[1], (k1, k2)
    # 1e-6 over the elements whose every AdamW step was well conditioned (the rest turn float32 summation
    # order into up to lr-sized steps: measured 1.4e-6 on one of them), and those are < 1% of all
    assert diff < 1e-6 and left < 0.01 * total, (diff, left, total)


def test_full_finetuning_dpo_moves_away_from_the_frozen_reference(tiny_janus_dir, tmp_path):
    """DPO with every decoder weight trained: the reference (a frozen copy) stays put while the policy
    moves, so after one step the implicit rewards beta * (log pi - log ref) are no longer 0."""
    from uniloop.rl.dpo import DPOTrainer
    cfg = load_config(Path(__file__).parent.parent / "configs" / "dpo_quickstart.yaml", [
        f"output_dir={tmp_path / 'run'}", f"model.tiny_dir={tiny_janus_dir}", "learner.full_finetune=true",
        "dpo.learning_rate=1e-4", "dpo.rpo_alpha=null", "dpo.max_steps=2", "dpo.eval_steps=0",
        "preference_data.synthetic.kinds=[generation]",
        "preference_data.synthetic.colors=[red, green, blue]", "image_task=null", "text_task=null", "rewards=[]",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.save_every=0"])
    trainer = DPOTrainer(cfg)
    try:
        m1, m2 = trainer.train_step().metrics, trainer.train_step().metrics
    finally:
        trainer.close()
    assert m1["dpo/chosen_reward"] == 0.0 and m1["dpo/rejected_reward"] == 0.0  # policy == reference
    assert abs(m1["dpo/loss"] - 0.6931471805599453) < 1e-6  # log 2
    assert m2["dpo/margin"] != 0.0 and m2["dpo/chosen_reward"] != 0.0
