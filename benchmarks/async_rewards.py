"""Async reward scoring on CPU: a GRPO step whose rewards come from a VLM judge behind HTTP.

    python benchmarks/async_rewards.py --out benchmarks/results/async_rewards_cpu.json

The judge is a real `uniloop serve-judge` process (the tiny Qwen2.5-VL judge, 1 torch thread) and
the policy a tiny real Janus made wider than the test one (`--hidden`, `--layers`) so that sampling
a step and judging it take comparable time, as with a 7B judge on its own GPU next to a 1B policy.
The same steps (same seed: same samples, same verdicts) run twice in this process:

  sync:  rollout.scoring_chunks=1, the judge's async_scoring false: sample everything, then judge;
  async: rollout.scoring_chunks=0 (auto: one chunk per forward batch of rollout.batch_size), the
         judge scoring each chunk in the background while the next chunk samples.

Reported per mode: seconds of sampling, of judging (the judge's busy time), the time the step waits
for rewards after sampling ends, and the sample+score wall time; the ratio sync/async is the gain.
The update is excluded (identical in both modes). Rewards of both modes must be equal (checked).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def start_judge_server(judge_dir: str, log_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "uniloop.rl.cli", "serve-judge", judge_dir, "--port", "0",
           "--served-model-name", "tiny-judge", "--max-batch-size", "16", "--batch-wait-ms", "20"]
    err = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    while True:
        m = re.search(r"(http://\S+/v1)", lines.get(timeout=300))
        if m:
            return proc, m.group(1)


def run_mode(args, model_dir: str, url: str, out: str, mode: str) -> dict:
    from uniloop.rl.config import load_config
    from uniloop.rl.grpo import GRPOTrainer

    colors = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"]
    plist = ", ".join(f"a {colors[i % len(colors)]} image" for i in range(args.prompts))
    judge = ("{name: judge, type: judge, weight: 1.0, async_scoring: %s, args: {mode: generation_pointwise, "
             "backend: remote, base_url: '%s', model: tiny-judge, score_range: [1, 5], max_new_tokens: 16, "
             "concurrency: 16, timeout: 300}}") % ("false" if mode == "sync" else "true", url)
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name_or_path={model_dir}", f"output_dir={out}/{mode}", "seed=0", "text_task=null",
        f"rollout.num_generations={args.samples}", f"rollout.batch_size={args.batch_size}",
        f"rollout.scoring_chunks={1 if mode == 'sync' else 0}",
        f"image_task.prompts=[{plist}]", f"image_task.prompts_per_step={args.prompts}",
        f"grpo.per_device_train_batch_size={args.prompts * args.samples}",
        f"rewards=[{{name: color, weight: 1.0}}, {judge}]",
        "logging.progress_bar=false", "logging.tensorboard=false"])
    trainer = GRPOTrainer(cfg)
    rows, rewards = [], []
    try:
        for step in range(args.steps + 1):
            m, scored = trainer.train_step()
            rewards.append(scored[0].rewards.tolist())
            if step == 0:
                continue  # warm-up (first HTTP connections, allocator)
            rows.append({"rollout": m["time/rollout"], "judge_busy": m["time/reward/judge"],
                         "reward_total": m["time/reward"], "wait_after_sampling": m["time/reward_wait"],
                         "sample_and_score": m["time/rollout"] + m["time/reward"],
                         "chunks": m["rollout/scoring_chunks"], "judge_invalid": m["reward/judge/invalid"]})
    finally:
        trainer.rewards.close()
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    print(f"{mode:5s}: chunks {mean['chunks']:.0f}, sampling {mean['rollout']:.2f} s, judge busy "
          f"{mean['judge_busy']:.2f} s, waiting after sampling {mean['wait_after_sampling']:.2f} s, "
          f"sample+score {mean['sample_and_score']:.2f} s per step", flush=True)
    return {"mean": mean, "steps": rows, "rewards": rewards}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="num_generations")
    p.add_argument("--batch-size", type=int, default=16, help="rollout.batch_size (auto chunks = samples / this)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--image-size", type=int, default=16, help="image side in pixels (tokens = (side/2)^2)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)  # one core samples, the judge server has the other

    from uniloop.policies.tiny import build_tiny_janus
    from uniloop.rewards.tiny_judge import build_tiny_vlm_judge

    tmp = tempfile.mkdtemp(prefix="ul_async_")
    model_dir = str(build_tiny_janus(f"{tmp}/model", hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                                     intermediate_size=2 * args.hidden, image_size=args.image_size,
                                     vq_fit_steps=20))
    judge_dir = str(build_tiny_vlm_judge(f"{tmp}/judge"))
    proc, url = start_judge_server(judge_dir, Path(tmp) / "server.log")
    try:
        res = {m: run_mode(args, model_dir, url, tmp, m) for m in ("sync", "async")}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    same = res["sync"]["rewards"] == res["async"]["rewards"]
    ratio = res["sync"]["mean"]["sample_and_score"] / res["async"]["mean"]["sample_and_score"]
    print(f"sample+score sync/async: {ratio:.2f}x; rewards identical in both modes: {same}", flush=True)
    result = {"command": " ".join(sys.argv), "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load_avg_at_start": os.getloadavg()},
              "sync": res["sync"]["mean"], "async": res["async"]["mean"], "speedup_sample_and_score": ratio,
              "rewards_identical": same}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if not same:
        raise SystemExit("rewards differ between sync and async scoring")


if __name__ == "__main__":
    main()
