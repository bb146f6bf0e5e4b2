"""Learner ranks: update time and peak memory per rank, 1 rank vs 2 ranks, in one run of this script.

    python benchmarks/learner_scaling.py --steps 6 --out learner_scaling.json

Each variant is `uniloop train configs/quickstart.yaml` in its own process (a fresh Ray per variant)
on the tiny Janus (--hidden / --layers widen it), for --steps GRPO steps, without the recipe's
sampling evaluations (grpo.eval_steps 0: they are not part of the update):
  lora  1 rank (in-process) | lora ddp 2 ranks | full fine-tuning 1 rank | full fine-tuning fsdp 2 ranks.
Reported per variant: the mean `time/update` of the steps after the first (the driver's wall time
for the update, weight transfer included), `learner/rank_seconds_max`, the bytes sent back per step
and the peak RSS of a rank process (`learner/peak_rss_mb_max`; for the in-process learner the whole
training process's peak, sampling included). Ratios are against the 1-rank variant of the same row
measured in the same run. CPU numbers on a shared machine measure overheads, not speed-ups: the
ranks and the driver share the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "lora, 1 rank": [],
    "lora, ddp 2 ranks": ["learner.num_workers=2"],
    "full, 1 rank": ["learner.full_finetune=true"],
    "full, fsdp 2 ranks": ["learner.full_finetune=true", "learner.num_workers=2", "learner.strategy=fsdp"],
}


def run_variant(name: str, extra: list[str], args, tmp: Path) -> dict:
    out = tmp / name.replace(", ", "_").replace(" ", "_")
    sets = [f"output_dir={out}", f"grpo.max_steps={args.steps}", "grpo.learning_rate=1e-4",
            "grpo.eval_steps=0", "logging.save_every=0", "logging.image_grid_every=0", "logging.tensorboard=false",
            "logging.progress_bar=false", "learner.num_cpus_per_worker=1",
            f"model.tiny={{hidden_size: {args.hidden}, num_layers: {args.layers}}}", *extra]
    cmd = [sys.executable, "-m", "uniloop.rl.cli", "train", str(REPO / "configs" / "quickstart.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) > 1]  # the first step pays lazy inits
    mean = lambda k: sum(r[k] for r in rows) / len(rows) if rows and k in rows[0] else None  # noqa: E731
    ranks = "learner.num_workers=2" in extra
    return {"variant": name, "update_s": mean("time/update"), "rank_update_s": mean("learner/rank_seconds_max"),
            "weights_mb_per_step": (mean("learner/weights_bytes") or 0) / 2**20,
            "peak_rss_mb_per_rank": mean("learner/peak_rss_mb_max") if ranks else
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
            "wall_s": time.perf_counter() - t0, "loss_last": rows[-1]["loss"] if rows else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ulls", dir="/tmp"))
    # the 1-rank variants run first: RUSAGE_CHILDREN's maximum is then theirs
    results = [run_variant(name, extra, args, tmp) for name, extra in VARIANTS.items()]
    base = {r["variant"].split(",")[0]: r for r in results if "1 rank" in r["variant"]}
    for r in results:
        b = base[r["variant"].split(",")[0]]
        r["update_vs_1_rank"] = r["update_s"] / b["update_s"]
        r["rss_vs_1_rank"] = r["peak_rss_mb_per_rank"] / b["peak_rss_mb_per_rank"]
        print(f"{r['variant']:22s} update {r['update_s']:.3f} s ({r['update_vs_1_rank']:.2f}x)  rank update "
              f"{r['rank_update_s'] or 0:.3f} s  sent {r['weights_mb_per_step']:.2f} MiB/step  peak RSS/rank "
              f"{r['peak_rss_mb_per_rank']:.0f} MB ({r['rss_vs_1_rank']:.2f}x)")
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
