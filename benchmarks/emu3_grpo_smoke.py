"""Scratch smoke check (not a test): the unchanged GRPO trainer trains an Emu3Policy on the tiny Emu3.

The trainer builds its policy with `make_policy` (Janus only), so this script swaps in an Emu3
builder by monkeypatching the name the trainer module imported (`uniloop.rl.trainer.make_policy`;
patching `uniloop.rollouts.worker.make_policy` alone would not reach it). Everything else, the
quickstart recipe included (its Janus-style LoRA regex is read as Emu3's text model), runs as is.

    python benchmarks/emu3_grpo_smoke.py --steps 80 --seeds 0 1 2 [--text]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def emu3_make_policy(model_cfg, lora_cfg=None, tiny_dir=None):
    """`make_policy` for Emu3: `tiny` builds the tiny Emu3, anything else is a hub id / directory."""
    from uniloop.policies.emu3 import Emu3Policy
    from uniloop.policies.emu3_tiny import build_tiny_emu3

    path = model_cfg.name_or_path
    if path == "tiny":
        path = build_tiny_emu3(Path(str(tiny_dir or "runs/tiny_model")).with_name("emu3_tiny"), seed=0)
    policy = Emu3Policy.from_pretrained(path, dtype=model_cfg.dtype, device=model_cfg.device,
                                        quantization=model_cfg.quantization,
                                        attn_implementation=model_cfg.attn_implementation)
    if lora_cfg is not None:
        if lora_cfg.init_adapter:
            policy.load_adapter(lora_cfg.init_adapter, trainable=True)
        else:
            targets = lora_cfg.target_modules
            if "," in targets:
                targets = [t.strip() for t in targets.split(",")]
            policy.add_lora(r=lora_cfg.r, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout, target_modules=targets)
    if model_cfg.gradient_checkpointing:
        policy.gradient_checkpointing(True)
    return policy


def run(seed: int, steps: int, out: Path, text: bool, janus: bool = False) -> dict:
    import uniloop.rl.trainer as trainer_mod
    import uniloop.rollouts.worker as worker_mod
    from uniloop.rl.config import load_config

    if not janus:  # --janus: the same recipe on the tiny Janus, for comparison
        trainer_mod.make_policy = worker_mod.make_policy = emu3_make_policy
    extra = [] if text else ["text_task=null", "rewards=[{name: color, weight: 1.0}]"]
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"output_dir={out / f'seed{seed}'}", f"seed={seed}", f"grpo.max_steps={steps}", "grpo.eval_steps=20",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.image_grid_every=0",
        "logging.save_every=0", *extra])
    t = time.perf_counter()
    summary = trainer_mod.train_grpo(cfg)
    rows = [json.loads(ln) for ln in (out / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
    color = [r["reward/color/mean"] for r in rows if r["step"] > 0 and "reward/color/mean" in r]
    k = max(1, len(color) // 4)
    res = {"seed": seed, "steps": steps, "wall_s": round(time.perf_counter() - t, 1),
           "train_color_first_quarter": sum(color[:k]) / k, "train_color_last_quarter": sum(color[-k:]) / k,
           "eval_color": {r["step"]: round(r["eval/reward/color/mean"], 4) for r in rows
                          if "eval/reward/color/mean" in r},
           "max_sampler_vs_learner": max(r.get("logprob/sampler_vs_learner_max_abs_diff", 0.0) for r in rows),
           "first_step_ratio_dev": rows[1].get("ratio/first_step_max_abs_dev") if len(rows) > 1 else None}
    if text:
        em = [r["reward/exact_match/mean"] for r in rows if r["step"] > 0 and "reward/exact_match/mean" in r]
        res.update(train_exact_match_first_quarter=sum(em[:k]) / k, train_exact_match_last_quarter=sum(em[-k:]) / k)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/emu3_grpo_smoke")
    ap.add_argument("--text", action="store_true", help="also the understanding task (exact_match) and "
                    "self_understanding, i.e. the whole quickstart recipe")
    ap.add_argument("--janus", action="store_true", help="run the unpatched trainer (tiny Janus) instead")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for s in args.seeds:
        print(json.dumps(run(s, args.steps, Path(args.out), args.text, args.janus)), flush=True)


if __name__ == "__main__":
    main()
