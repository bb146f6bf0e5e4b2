"""Learner step speed and memory: a GRPO step on 576-token Janus images with a LoRA adapter.

    python benchmarks/learner_step.py --shape 7b --group 8 --out learner.json

A Janus-Pro-7B-shaped model with random bf16 weights (no downloads), LoRA r16 on the language
model's attention projections, gradient checkpointing, one group of G samples of one prompt,
576 image tokens each. One step = teacher-forced log-probs with gradients (CFG mode: the doubled
batch) + the adapter-disabled reference pass (beta > 0) + the clipped GRPO loss + backward +
AdamW, micro-batched. Reported: step time, image tokens/s, peak GPU memory, and the micro-batch
`uniloop.policies.microbatch.auto_micro_batch_size` picks from free memory with its estimate.

Variants: bf16 base with and without gradient checkpointing, group 8 and 16, and a 4-bit NF4
base (bitsandbytes) loaded through `JanusPolicy.from_pretrained(..., quantization="4bit")` from a
checkpoint this script writes to --tmp (the QLoRA path a user runs).
`--shape tiny --device cpu` smoke-tests the script.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from janus_shapes import build_random_policy, ensure_uniloop_importable, environment, prompts_for  # noqa: E402

ensure_uniloop_importable()
from uniloop.policies.batches import ImageRollout  # noqa: E402
from uniloop.policies.microbatch import (activation_bytes_per_sample, auto_micro_batch_size,  # noqa: E402
                                         micro_batches)


def is_cuda(dev):
    return torch.device(dev).type == "cuda"


def synthetic_group(policy, group, cfg_scale, seed=0):
    """One prompt x `group` samples with random image tokens (the learner never looks at pixels)."""
    prompts = prompts_for(1)[:1] * group
    ids, mask = policy.encode_generation_prompts(prompts)
    V = policy.janus.model.generation_head.vision_head.out_features
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (group, policy.num_image_tokens), generator=g)
    zeros = torch.zeros(group, policy.num_image_tokens)
    return ImageRollout(prompts=prompts, prompt_ids=ids.cpu(), prompt_mask=mask.cpu(), image_tokens=tokens,
                        logprobs_cfg=zeros, logprobs_cond=zeros.clone(), images=torch.zeros(group, 0, 0, 3),
                        group_ids=torch.zeros(group, dtype=torch.long), cfg_scale=cfg_scale, temperature=1.0)


def grpo_step(policy, opt, batch, old_lp, adv, micro, mode, beta, eps=0.2):
    """Clipped GRPO surrogate (+ k3 KL to the adapter-disabled reference), per-sequence token mean."""
    n = len(batch)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for rows in micro_batches(n, micro):
        sub = batch.select(rows)
        lp = policy.rollout_logprobs(sub, mode=mode)
        old = old_lp[rows].to(lp.device)
        a = adv[rows].to(lp.device)[:, None]
        ratio = torch.exp(lp - old)
        per_tok = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        if beta > 0:
            with torch.no_grad(), policy.reference():
                ref = policy.rollout_logprobs(sub, mode=mode)
            d = ref - lp
            per_tok = per_tok + beta * (torch.exp(d) - d - 1)
        loss = per_tok.mean(1).sum() / n
        loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
    opt.step()
    return total


def run_variant(policy, label, group, micro, mode, beta, cfg_scale, steps, dev, checkpointing=True):
    policy.gradient_checkpointing(checkpointing)
    policy.model.train()
    batch = synthetic_group(policy, group, cfg_scale)
    prompt_len = batch.prompt_ids.shape[1]
    res = {"variant": label, "group": group, "tokens": policy.num_image_tokens, "mode": mode, "beta": beta,
           "gradient_checkpointing": checkpointing, "prompt_len": prompt_len}
    est = activation_bytes_per_sample(policy, prompt_len, mode, cfg_scale, checkpointing)
    res["estimated_activation_GiB_per_sample"] = round(est / 2**30, 2)
    auto = auto_micro_batch_size(policy, group, prompt_len, mode, cfg_scale, checkpointing=checkpointing)
    res["auto_micro_batch_would_pick"] = auto
    if micro == "auto":
        micro = auto
        res["micro_batch_auto"] = True
    res["micro_batch"] = micro
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5)
    try:
        with torch.no_grad():
            old_lp = torch.cat([policy.rollout_logprobs(batch.select(r), mode=mode).float().cpu()
                                for r in micro_batches(group, micro)])
        adv = torch.randn(group, generator=torch.Generator().manual_seed(1))
        if is_cuda(dev):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        grpo_step(policy, opt, batch, old_lp, adv, micro, mode, beta)  # warm-up (allocates Adam state)
        times = []
        for _ in range(steps):
            if is_cuda(dev):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            grpo_step(policy, opt, batch, old_lp, adv, micro, mode, beta)
            if is_cuda(dev):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]
        res.update(step_s=round(step_s, 3), image_tokens_per_s=round(group * policy.num_image_tokens / step_s, 1),
                   samples_per_s=round(group / step_s, 2))
        if is_cuda(dev):
            res.update(peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                       weights_and_state_GiB=round(base / 2**30, 2),
                       activation_peak_GiB_per_sample=round((torch.cuda.max_memory_allocated() - base)
                                                            / 2**30 / micro, 2))
    except torch.OutOfMemoryError as e:
        res["error"] = f"OOM: {str(e)[:160]}"
    finally:
        del opt
        for p in policy.trainable_parameters():
            p.grad = None
        gc.collect()
        if is_cuda(dev):
            torch.cuda.empty_cache()
    policy.model.eval()
    print(json.dumps(res), flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--mode", default="cfg", choices=["cfg", "conditional"])
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--variants", default="ckpt,group16,no-ckpt,4bit")
    ap.add_argument("--tmp", default="/tmp/uniloop_learner_ckpt", help="where the 4-bit variant's checkpoint goes")
    ap.add_argument("--out", default="learner_step.json")
    args = ap.parse_args(argv)
    dev = args.device
    variants = args.variants.split(",")
    results = {"env": environment(), "args": vars(args), "runs": []}
    out = Path(args.out)
    print(json.dumps(results["env"]), flush=True)

    t0 = time.perf_counter()
    policy = build_random_policy(args.shape, device=dev)
    results["build_s"] = round(time.perf_counter() - t0, 1)
    if "4bit" in variants:
        t0 = time.perf_counter()
        policy.janus.save_pretrained(args.tmp)
        policy.processor.save_pretrained(args.tmp)
        results["save_s"] = round(time.perf_counter() - t0, 1)
    policy.add_lora(r=args.lora_r, alpha=2 * args.lora_r)
    common = dict(mode=args.mode, beta=args.beta, cfg_scale=args.cfg_scale, steps=args.steps, dev=dev)
    G = args.group
    plan = {"ckpt": (f"bf16 base, LoRA r{args.lora_r}, grad ckpt", G, G, True),
            "auto": (f"bf16 base, LoRA r{args.lora_r}, grad ckpt, auto micro-batch", G, "auto", True),
            "group16": (f"bf16 base, LoRA r{args.lora_r}, grad ckpt", 2 * G, 2 * G, True),
            "no-ckpt": (f"bf16 base, LoRA r{args.lora_r}, no grad ckpt", G, G, False)}
    for v in variants:
        if v in plan:
            label, group, micro, ckpt = plan[v]
            results["runs"].append(run_variant(policy, label, group, micro, checkpointing=ckpt, **common))
            out.write_text(json.dumps(results, indent=1))
    del policy
    gc.collect()
    if is_cuda(dev):
        torch.cuda.empty_cache()

    if "4bit" in variants:
        from uniloop.policies.janus import JanusPolicy
        try:
            t0 = time.perf_counter()
            q = JanusPolicy.from_pretrained(args.tmp, dtype="bfloat16", device=dev, quantization="4bit")
            results["load_4bit_s"] = round(time.perf_counter() - t0, 1)
            q.add_lora(r=args.lora_r, alpha=2 * args.lora_r)
            results["runs"].append(run_variant(q, f"4-bit NF4 base (bitsandbytes), LoRA r{args.lora_r}, grad ckpt",
                                               G, G, checkpointing=True, **common))
            del q
        except Exception as e:  # report, do not lose the other variants
            results["runs"].append({"variant": "4-bit NF4 base", "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(results["runs"][-1], flush=True)
        shutil.rmtree(args.tmp, ignore_errors=True)
    out.write_text(json.dumps(results, indent=1))
    print("\nvariant | group | micro | step s | img tok/s | peak GiB | est act GiB/sample | measured act GiB/sample")
    for r in results["runs"]:
        print(" | ".join(str(r.get(k, "")) for k in ("variant", "group", "micro_batch", "step_s", "image_tokens_per_s",
                                                     "peak_GiB", "estimated_activation_GiB_per_sample",
                                                     "activation_peak_GiB_per_sample")) +
              (f" | {r['error']}" if "error" in r else ""))
    return 0 if all("error" not in r for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
