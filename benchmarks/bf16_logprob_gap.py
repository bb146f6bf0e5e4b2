"""Sampled vs teacher-forced image log-probs in bf16 on a Janus-Pro-1B-wide model (CPU, one run).

What the learner's first importance ratio sees when the sampler's recorded log-probs are the "old"
ones (one-step-off, Ray workers): gap = teacher-forced - sampled log-prob per image token, on the
same weights. Rows, all on the same checkpoint, prompts and seeds, in one run:

  before       bf16, SDPA attention, generation head in bf16 then cast (the code before issue 18)
  head_fp32    bf16, SDPA, head + CFG + log-softmax in float32 (policies/sampling.generation_logits)
  eager        bf16, eager attention (the CPU default for half precision now) + float32 head
  fp32         the same weights in float32 (SDPA): the floor

The model: real hidden size, heads, MLP width, text vocabulary and 16384-code generation head of
Janus-Pro-1B, `--layers` layers, random weights (policies/tiny.build_janus_shaped), loaded with
from_pretrained. Run:

    PYTHONPATH=... python benchmarks/bf16_logprob_gap.py --tokens 576 --batch 4 --out result.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from janus_shapes import PROMPT_WORDS, ensure_uniloop_importable, environment  # noqa: E402


def gap_stats(tf: torch.Tensor, sampled: torch.Tensor) -> dict:
    d = (tf.float() - sampled.float()).flatten()
    a = d.abs()
    return {"max": a.max().item(), "mean": a.mean().item(), "p99": a.quantile(0.99).item(),
            "ratio_min": d.exp().min().item(), "ratio_max": d.exp().max().item()}


def measure(policy, prompts, seeds, cfg_scale) -> dict:
    t0 = time.perf_counter()
    r = policy.sample_images(prompts, seeds, cfg_scale=cfg_scale, decode=False, sampler="plain")
    t1 = time.perf_counter()
    out = {"sample_s": t1 - t0}
    with torch.no_grad():
        for mode in ("cfg", "conditional"):
            t = time.perf_counter()
            tf = policy.image_logprobs(r.prompt_ids, r.prompt_mask, r.image_tokens, mode=mode, cfg_scale=cfg_scale)
            out[f"teacher_forcing_{mode}_s"] = time.perf_counter() - t
            out[mode] = gap_stats(tf, r.logprobs(mode))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=576, help="image tokens (a square number)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=102400, help="text vocabulary (102400 = Janus-Pro's)")
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--rows", default="before,head_fp32,eager,fp32")
    ap.add_argument("--model-dir", default=None, help="where the checkpoint is built (default: a temp dir)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ensure_uniloop_importable()
    import uniloop.policies.janus as janus_mod
    from uniloop.policies.janus import JanusPolicy
    from uniloop.policies.tiny import build_janus_shaped

    d = Path(args.model_dir or tempfile.mkdtemp(prefix="janus1b_wide_"))
    t = time.perf_counter()
    path = build_janus_shaped(d / "model", num_layers=args.layers, image_tokens=args.tokens, vocab_size=args.vocab)
    print(f"built {path} in {time.perf_counter() - t:.0f} s", flush=True)
    prompts = [PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(args.batch)]
    seeds = list(range(args.batch))
    current = janus_mod.generation_logits
    old_head = lambda head, h: head(h).float()  # noqa: E731  the pre-issue-18 expression
    settings = {"before": ("bfloat16", "sdpa", old_head), "head_fp32": ("bfloat16", "sdpa", current),
                "eager": ("bfloat16", None, current), "fp32": ("float32", "sdpa", current)}
    rows = {}
    for name in args.rows.split(","):
        dtype, attn, head_fn = settings[name]
        janus_mod.generation_logits = head_fn
        try:
            policy = JanusPolicy.from_pretrained(path, dtype=dtype, attn_implementation=attn)
            rows[name] = {"dtype": dtype, "attention": policy.janus.model.language_model.config._attn_implementation,
                          **measure(policy, prompts, seeds, args.cfg_scale)}
        finally:
            janus_mod.generation_logits = current
        del policy
        r = rows[name]
        for mode in ("cfg", "conditional"):
            s = r[mode]
            print(f"{name:10s} {r['attention']:6s} {mode:11s} max {s['max']:.4f}  mean {s['mean']:.5f}  "
                  f"p99 {s['p99']:.4f}  ratio [{s['ratio_min']:.4f}, {s['ratio_max']:.4f}]  "
                  f"sample {r['sample_s']:.1f} s  teacher forcing {r[f'teacher_forcing_{mode}_s']:.1f} s", flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    result = {"args": vars(args), "environment": {**environment(), "cpu": cpu, "threads": torch.get_num_threads()},
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
