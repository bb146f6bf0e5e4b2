"""Flow-GRPO variants on the tiny color task: steps and wall time to a fixed reward target, as ratios
to plain Flow-GRPO measured in the same run, and a learning-curve plot per variant.

    python benchmarks/flow_variants.py --seeds 0,1,2 --max-steps 40 --target 0.8 \
        --out benchmarks/results/flow_variants_cpu.json --plot benchmarks/results/flow_variants_cpu.png

The task: prompt "a red image", 8 samples per step, reward `color` (how red), 6 denoising steps, LoRA r4
on both attention streams of the tiny SD3 pipeline (policies/flow_tiny.py, built offline). Each run's
reward is the step's mean training reward; "reached" = the first step whose 3-step moving mean is >=
target; wall time = the summed step times (sampling + scoring + update) up to it. Variants run
interleaved (seed by seed) so that a shared machine's load hits them alike. Medians over the seeds.

| variant         | what changes against `flow_grpo` (SDE on all 6 steps, all trained, CFG-free: cfg 1)      |
| --------------- | ---------------------------------------------------------------------------------------- |
| cfg_4.5         | sampling and training with CFG 4.5 (the official recipe's; one more transformer pass)    |
| fast_nocfg      | Flow-GRPO-Fast + CPS: a CPS window of 2 steps in [0, 3), ODE elsewhere (`*_fast_nocfg`)  |
| mixgrpo         | MixGRPO: a sliding SDE window of 2 steps over [0, 6), moved every 5 steps                |
| cps             | CPS steps everywhere                                                                     |
| diffusion_nft   | algorithm diffusion_nft: ODE sampling with the old adapter, forward-process loss         |
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def ensure_uniloop_importable():
    try:
        import uniloop  # noqa: F401
    except ImportError:  # a source checkout: the package is its parent folder's name
        sys.path.insert(0, str(ROOT.parent.parent))


VARIANTS = {
    "flow_grpo": ("flow_grpo", {}),
    "cfg_4.5": ("flow_grpo", {"cfg_scale": 4.5}),
    "fast_nocfg": ("flow_grpo", {"sde_type": "cps", "sde_window_size": 2, "sde_window_range": [0, 3]}),
    "mixgrpo": ("flow_grpo", {"sde_window_size": 2, "sde_window_schedule": "sliding", "sde_window_shift_every": 5}),
    "cps": ("flow_grpo", {"sde_type": "cps"}),
    "diffusion_nft": ("diffusion_nft", {"nft_timesteps": 2}),
}


def make_config(out_dir: Path, model_dir: Path, algorithm: str, flow: dict, seed: int, max_steps: int):
    from uniloop.rl.config import load_config

    cfg = load_config(text=f"""
seed: {seed}
output_dir: {out_dir}
algorithm: {algorithm}
flow: {{name_or_path: {model_dir}, max_sequence_length: 8, num_steps: 6, cfg_scale: 1.0, noise_level: 0.7,
        lora_target_modules: [to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out]}}
lora: {{r: 4, alpha: 8}}
rollout: {{num_generations: 8}}
grpo: {{learning_rate: 3.0e-3, beta: 0.0, epsilon: 0.2, per_device_train_batch_size: 64, max_steps: {max_steps}}}
image_task: {{prompts: [a red image], prompts_per_step: 1}}
rewards: [{{name: color}}]
logging: {{progress_bar: false, tensorboard: false, image_grid_every: 0, save_every: 0}}
""")
    for k, v in flow.items():
        setattr(cfg.flow, k, v)
    return cfg


def run_one(args, model_dir: Path, name: str, seed: int) -> dict:
    from uniloop.rl.algorithms import algorithms

    algorithm, flow = VARIANTS[name]
    cfg = make_config(Path(args.tmp) / f"{name}_{seed}", model_dir, algorithm, flow, seed, args.max_steps)
    trainer = algorithms()[algorithm](cfg)
    rewards, times = [], []
    reached = None
    for step in range(1, args.max_steps + 1):
        t0 = time.perf_counter()
        metrics = trainer.train_step()[0]
        times.append(time.perf_counter() - t0)
        rewards.append(metrics["reward/color/mean"])
        if reached is None and step >= 3 and sum(rewards[-3:]) / 3 >= args.target:
            reached = step
            if args.stop_at_target:
                break
    trainer.close()
    return {"variant": name, "seed": seed, "rewards": rewards, "step_seconds": times, "steps_to_target": reached,
            "seconds_to_target": sum(times[:reached]) if reached else None,
            "seconds_per_step": statistics.median(times)}


def summarise(runs: list[dict], baseline: str = "flow_grpo") -> list[dict]:
    rows = []
    for name in VARIANTS:
        mine = [r for r in runs if r["variant"] == name]
        done = [r for r in mine if r["steps_to_target"]]
        rows.append({"variant": name, "reached": f"{len(done)}/{len(mine)}",
                     "steps": statistics.median(r["steps_to_target"] for r in done) if done else None,
                     "seconds": statistics.median(r["seconds_to_target"] for r in done) if done else None,
                     "seconds_per_step": statistics.median(r["seconds_per_step"] for r in mine),
                     "first_reward": statistics.median(sum(r["rewards"][:3]) / 3 for r in mine),
                     "final_reward": statistics.median(sum(r["rewards"][-3:]) / 3 for r in mine)})
    base = next(r for r in rows if r["variant"] == baseline)
    for r in rows:
        r["time_ratio"] = r["seconds"] / base["seconds"] if r["seconds"] and base["seconds"] else None
        r["step_ratio"] = r["steps"] / base["steps"] if r["steps"] and base["steps"] else None
    return rows


def plot(runs: list[dict], target: float, path: Path):
    """Reward (3-step moving mean) against wall seconds, one panel per variant, one line per seed (PIL)."""
    from PIL import Image, ImageDraw

    W, H, cols = 360, 240, 3
    names = list(VARIANTS)
    img = Image.new("RGB", (W * cols, H * ((len(names) + cols - 1) // cols)), "white")
    d = ImageDraw.Draw(img)
    t_max = max(sum(r["step_seconds"]) for r in runs)
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    for i, name in enumerate(names):
        ox, oy = (i % cols) * W, (i // cols) * H
        x0, y0, x1, y1 = ox + 40, oy + 25, ox + W - 10, oy + H - 30
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, oy + 6), f"{name}  (reward vs seconds, 0-{t_max:.0f} s)", fill="black")
        for v in (0.5, 0.75, 1.0):
            y = y1 - (v - 0.4) / 0.6 * (y1 - y0)
            d.text((ox + 8, y - 5), f"{v:.2f}", fill="gray")
        yt = y1 - (target - 0.4) / 0.6 * (y1 - y0)
        d.line([x0, yt, x1, yt], fill=(150, 150, 150))
        for j, r in enumerate(rr for rr in runs if rr["variant"] == name):
            pts, t = [], 0.0
            for k, dt in enumerate(r["step_seconds"]):
                t += dt
                m = sum(r["rewards"][max(0, k - 2):k + 1]) / len(r["rewards"][max(0, k - 2):k + 1])
                pts.append((x0 + t / t_max * (x1 - x0), y1 - (min(max(m, 0.4), 1.0) - 0.4) / 0.6 * (y1 - y0)))
            if len(pts) > 1:
                d.line(pts, fill=colors[j % len(colors)], width=2)
        d.text((x0, y1 + 8), "seeds: blue, orange, green; gray line: target", fill="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--stop-at-target", action="store_true", help="stop each run when it reaches the target")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tmp", default="/tmp/uniloop_flow_variants")
    p.add_argument("--out", default="benchmarks/results/flow_variants_cpu.json")
    p.add_argument("--plot", default="benchmarks/results/flow_variants_cpu.png")
    args = p.parse_args()
    ensure_uniloop_importable()
    from uniloop.policies.flow_tiny import build_tiny_sd3

    torch.set_num_threads(args.threads)
    model_dir = build_tiny_sd3(Path(args.tmp) / "tiny_sd3", seed=0)
    names = [v for v in args.variants.split(",") if v]
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            r = run_one(args, model_dir, name, seed)
            runs.append(r)
            print(f"{name:14s} seed {seed}: steps to target {r['steps_to_target']}, "
                  f"{r['seconds_to_target'] or float('nan'):.1f} s, {r['seconds_per_step']:.2f} s/step, "
                  f"last-3 reward {sum(r['rewards'][-3:]) / 3:.3f}", flush=True)
    rows = summarise(runs) if "flow_grpo" in names else []
    env = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
           "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "args": vars(args), "summary": rows, "runs": runs}, indent=1))
    plot(runs, args.target, Path(args.plot))
    print("| variant | reached | steps (median) | seconds (median) | s/step | time ratio | step ratio | "
          "reward steps 1-3 | last 3 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        print(f"| {r['variant']} | {r['reached']} | {fmt(r['steps'], '{:g}')} | {fmt(r['seconds'], '{:.1f}')} | "
              f"{r['seconds_per_step']:.2f} | {fmt(r['time_ratio'])} | {fmt(r['step_ratio'])} | "
              f"{r['first_reward']:.3f} | {r['final_reward']:.3f} |")


if __name__ == "__main__":
    main()
