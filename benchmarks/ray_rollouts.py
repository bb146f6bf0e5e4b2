"""Ray rollouts on CPU: throughput with 1 vs 2 actors, adapter sync cost, Ray start-up overhead.

    python benchmarks/ray_rollouts.py --out benchmarks/results/ray_rollouts_cpu.json
    python benchmarks/ray_rollouts.py --skip-quickstart          # without the two `uniloop train` runs

1. Throughput: the same step of image requests (P prompts x n samples) sampled in-process (1 and
   2 torch threads) and by `RayWorkerPool` with 1 and 2 actors (1 CPU and 1 thread each); samples/s
   over `--repeats` steps after one warm-up step. The model is a tiny real Janus made wider than the
   test one (`--hidden`, `--layers`, `--image-size`) so sampling, not Ray, dominates.
2. Sync: `pool.sync(policy)` of the LoRA adapter (bytes, seconds: state dict + one put + N actor
   gets + load + checksum ack), and the raw object-store cost of a Janus-Pro-1B-shaped adapter
   payload (r=16 on q/k/v/o of 24 layers, hidden 2048: 25.2 MB fp32): one put, N actor gets.
3. Start-up overhead of the quickstart: wall time of `uniloop train configs/quickstart.yaml` with
   and without `--set rollout.num_workers=2` (same number of steps), and the pool's own start-up
   (ray.init, actor creation) measured in-process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def environment() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": __import__("ray").__version__,
            "load_avg_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}


def make_cfg(model_dir: str, out: str, workers: int, prompts: int, samples: int):
    from uniloop.rl.config import load_config
    colors = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"]
    plist = ", ".join(f"a {colors[i % len(colors)]} image" for i in range(prompts))
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"output_dir={out}", "seed=0",
        f"rollout.num_generations={samples}", "rollout.cfg_scale=3.0", "rollout.batch_size=64",
        f"rollout.num_workers={workers}", "rollout.num_cpus_per_worker=1",
        f"image_task.prompts=[{plist}]", f"image_task.prompts_per_step={prompts}",
        "rewards=[{name: color}]", "lora.r=16"])


def throughput(args, model_dir: str, tmp: str) -> dict:
    import ray

    from uniloop.policies.registry import build_policy
    from uniloop.rewards.actors import init_ray
    from uniloop.rl.tasks import build_tasks
    from uniloop.rl.trainer import policy_spec, sampling_settings
    from uniloop.rollouts.ray_pool import RayWorkerPool
    from uniloop.rollouts.worker import RolloutWorker

    out = {}
    n_samples = args.prompts * args.samples
    cfg = make_cfg(model_dir, tmp, 0, args.prompts, args.samples)
    policy = build_policy(policy_spec(cfg))
    tasks = build_tasks(cfg, policy.image_size)
    reqs = lambda step: [t.request(step, args.samples) for t in tasks]  # noqa: E731
    for threads in (1, 2):
        torch.set_num_threads(threads)
        w = RolloutWorker(policy, sampling_settings(cfg), cfg.seed, shares_learner_policy=True)
        w.generate(reqs(0)[0])
        t0 = time.perf_counter()
        for s in range(1, args.repeats + 1):
            w.generate(reqs(s)[0])
        dt = (time.perf_counter() - t0) / args.repeats
        out[f"in_process_{threads}_threads"] = {"seconds_per_step": dt, "samples_per_second": n_samples / dt}
        print(f"in-process, {threads} thread(s): {n_samples / dt:.2f} samples/s ({dt:.2f} s/step)", flush=True)
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    init_ray(make_cfg(model_dir, tmp, 1, args.prompts, args.samples).ray)
    out["ray_init_seconds"] = time.perf_counter() - t0
    for workers in (1, 2):
        cfg = make_cfg(model_dir, tmp, workers, args.prompts, args.samples)
        t0 = time.perf_counter()
        pool = RayWorkerPool(policy_spec(cfg), sampling_settings(cfg), cfg.rollout, cfg.seed, cfg.ray)
        start = time.perf_counter() - t0
        pool.sync(policy, 0)
        pool.generate(reqs(0), 0)
        t0 = time.perf_counter()
        for s in range(1, args.repeats + 1):
            pool.generate(reqs(s), 0)
        dt = (time.perf_counter() - t0) / args.repeats
        syncs = []
        for v in range(1, 6):
            pool.sync(policy, v)
            syncs.append(pool.metrics())
        out[f"ray_{workers}_workers"] = {
            "seconds_per_step": dt, "samples_per_second": n_samples / dt, "pool_start_seconds": start,
            "sync_bytes": syncs[-1]["sync/bytes"], "sync_tensors": syncs[-1]["sync/tensors"],
            "sync_seconds_mean": sum(m["sync/seconds"] for m in syncs) / len(syncs),
            "sync_actor_load_seconds_mean": sum(m["sync/actor_load_seconds"] for m in syncs) / len(syncs)}
        print(f"ray, {workers} worker(s): {n_samples / dt:.2f} samples/s ({dt:.2f} s/step); pool start "
              f"{start:.1f} s; sync {syncs[-1]['sync/bytes'] / 1e6:.3f} MB in "
              f"{out[f'ray_{workers}_workers']['sync_seconds_mean'] * 1e3:.1f} ms", flush=True)
        pool.close()

    # object-store cost of a Janus-Pro-1B-shaped adapter (r=16 on q,k,v,o of 24 layers, hidden 2048)
    @ray.remote(num_cpus=1)
    class Fetcher:
        def fetch(self, box):
            t0 = time.perf_counter()
            state = ray.get(box[0])
            return time.perf_counter() - t0, sum(t.numel() * t.element_size() for t in state.values())

    fetchers = [Fetcher.remote() for _ in range(2)]
    ray.get([f.fetch.remote([ray.put({"warm-up": torch.zeros(4)})]) for f in fetchers])  # imports torch there
    g = torch.Generator().manual_seed(0)
    payload = {f"layers.{i}.{m}.lora_{ab}.weight": torch.randn(*(16, 2048) if ab == "A" else (2048, 16), generator=g)
               for i in range(24) for m in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in ("A", "B")}
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        ref = ray.put(payload)
        res = ray.get([f.fetch.remote([ref]) for f in fetchers])
        times.append(time.perf_counter() - t0)
        del ref
    out["janus_pro_1b_adapter_payload"] = {"bytes": res[0][1], "put_plus_2_gets_seconds_mean": sum(times) / len(times),
                                           "put_plus_2_gets_seconds_min": min(times),
                                           "actor_get_seconds_mean": sum(r[0] for r in res) / len(res)}
    print(f"1B-shaped adapter payload: {res[0][1] / 1e6:.1f} MB, put + 2 actor gets "
          f"{sum(times) / len(times) * 1e3:.1f} ms", flush=True)
    for f in fetchers:
        ray.kill(f)
    ray.shutdown()
    return out


def quickstart_overhead(args, tmp: str) -> dict:
    out = {}
    common = ["--set", f"grpo.max_steps={args.quickstart_steps}", "--set", "logging.progress_bar=false",
              "--set", "logging.tensorboard=false", "--set", "logging.image_grid_every=0",
              "--set", "logging.save_every=0"]
    env = {**os.environ}
    # build the quickstart's tiny model once, where both runs look for it, so neither pays the build
    from uniloop.policies.registry import resolve_checkpoint
    from uniloop.rl.config import load_config
    from uniloop.rl.trainer import policy_spec
    resolve_checkpoint(policy_spec(load_config(REPO / "configs" / "quickstart.yaml", [f"output_dir={tmp}/qs_in_process"])))
    for name, extra in (("in_process", []), ("ray_2_workers", ["--set", "rollout.num_workers=2",
                                                               "--set", f"ray.temp_dir={tmp}/ray_qs"])):
        run_dir = f"{tmp}/qs_{name}"
        cmd = [sys.executable, "-m", "uniloop.rl.cli", "train", str(REPO / "configs" / "quickstart.yaml"),
               "--set", f"output_dir={run_dir}", *common, *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(ln) for ln in Path(run_dir, "metrics.jsonl").read_text().splitlines() if ln.strip()]
        out[name] = {"wall_seconds": wall, "steps": len(rows),
                     "rollout_seconds_mean": sum(r["time/rollout"] for r in rows[1:]) / max(len(rows) - 1, 1),
                     "reward_mean_first": rows[0]["reward/mean"], "reward_mean_last": rows[-1]["reward/mean"],
                     "sync_bytes": rows[-1].get("sync/bytes"), "sync_seconds": rows[-1].get("sync/seconds")}
        print(f"quickstart {name}: {wall:.1f} s wall for {len(rows)} steps", flush=True)
    out["ray_overhead_seconds"] = out["ray_2_workers"]["wall_seconds"] - out["in_process"]["wall_seconds"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64, help="understanding/VQ input size; image tokens = (size/8)^2")
    p.add_argument("--quickstart-steps", type=int, default=5)
    p.add_argument("--skip-quickstart", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    from uniloop.policies.tiny import build_tiny_janus

    tmp = tempfile.mkdtemp(prefix="ulbench", dir="/tmp")
    model_dir = str(build_tiny_janus(
        f"{tmp}/model", hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
        intermediate_size=2 * args.hidden, image_size=args.image_size, vq_fit_steps=20))
    result = {"environment": environment(), "args": vars(args),
              "model": {"hidden": args.hidden, "layers": args.layers,
                        "image_tokens": (args.image_size // 8) ** 2}}
    result["throughput"] = throughput(args, model_dir, tmp)
    if not args.skip_quickstart:
        result["quickstart"] = quickstart_overhead(args, tmp)
    result["environment"]["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
