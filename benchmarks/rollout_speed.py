"""Image-rollout speed: transformers' Janus `generate` vs uniloop's fast sampler, same process.

    python benchmarks/rollout_speed.py --shapes 1b,7b --batches 16,64,128 --out rollout.json

Janus-Pro-1B/7B-shaped models with random bf16 weights (no downloads), CFG 5, 576 image tokens.
For each batch: ms per decode step, images/s, peak GPU memory, the ratio to HF generate, and the
fraction of the bandwidth floor (bytes one decode step must read: the weights it uses plus the
filled part of the KV cache, over the measured device-to-device copy bandwidth).

GPU-only checks live here (CI has no GPU): the fast sampler (CUDA graphs) must give exactly the
plain sampler's tokens, greedy and seeded, with and without prompt padding and under a LoRA
adapter; its recorded log-probs are compared with teacher forcing. The script exits non-zero if
a token-equality check fails (after writing its results).

`--shapes tiny --device cpu` runs the whole script on a CPU in seconds (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from janus_shapes import (build_random_policy, ensure_uniloop_importable, environment,  # noqa: E402
                          measure_bandwidth_GBps, prompts_for)

ensure_uniloop_importable()
from uniloop.policies.fast_sampler import FastImageSampler, fast_sampler_for  # noqa: E402


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_GiB(device):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.device(device).type == "cuda" else None


def step_bytes(policy, rows: int, prompt_len: int):
    """Bytes one decode step must read: weights it touches + KV cache, averaged over the image."""
    janus = policy.janus
    lm = janus.model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    for mod in (janus.model.generation_head, janus.model.generation_aligner):
        weights += sum(p.numel() * p.element_size() for p in mod.parameters())
    cfg = lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    elem = next(lm.parameters()).element_size()
    kv_per_pos = rows * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * elem
    T = policy.num_image_tokens
    mean_len = prompt_len + T / 2  # decode steps see cache lengths P+1 .. P+T-1
    return weights, kv_per_pos * mean_len


# ----------------------------------------------------------------------------- correctness
def run_sampler(policy, kind, prompts, seeds, cfg_scale, temperature):
    """tokens, lp_cfg, lp_cond (CPU) from `kind`: plain | graphs (the fast sampler) | eager (same bucket)."""
    ids, mask = policy.encode_generation_prompts(prompts)
    t0 = time.perf_counter()
    if kind == "plain":
        out = policy._sample_tokens_plain(ids, mask, seeds, cfg_scale, temperature, 0)
    elif kind == "graphs":
        out = fast_sampler_for(policy).sample(ids, mask, seeds, cfg_scale, temperature, 0)
    elif kind == "eager":
        eager = FastImageSampler(policy, use_graphs=False, bucket=fast_sampler_for(policy).bucket)
        out = eager.sample(ids, mask, seeds, cfg_scale, temperature, 0)
        eager.release()
    else:
        raise ValueError(kind)
    out = [x.cpu() for x in out]
    return out, round(time.perf_counter() - t0, 2), (ids, mask)


def compare(policy, label, a, b, prompts, seeds, cfg_scale, temperature, must_equal, teacher_forcing=False,
            given=None):
    """Sampler `a` vs sampler `b` on the same prompts/seeds; `given`: a's result computed before."""
    ra, ta, enc = given if given is not None else run_sampler(policy, a, prompts, seeds, cfg_scale, temperature)
    rb, tb, _ = run_sampler(policy, b, prompts, seeds, cfg_scale, temperature)
    same = ra[0] == rb[0]
    diverge = [int((~row).nonzero()[0]) for row in same if not row.all()]
    first = min(diverge) if diverge else None
    upto = first if first is not None else same.shape[1]
    res = {"check": label, "a": a, "b": b, "batch": len(prompts), "temperature": temperature,
           "dtype": str(policy.dtype).replace("torch.", ""), "must_be_equal": must_equal,
           "tokens_equal": bool(same.all()), "logprobs_bitwise_equal": bool(torch.equal(ra[1], rb[1])),
           "rows_equal": int(same.all(1).sum()), "first_divergence": first,
           "mean_first_divergence": round(sum(diverge) / len(diverge), 1) if diverge else None,
           "lp_cfg_max_abs_diff_before_divergence": float((ra[1][:, :upto] - rb[1][:, :upto]).abs().max()),
           f"{a}_s": ta, f"{b}_s": tb}
    if teacher_forcing:  # recorded log-probs vs teacher forcing, for both samplers
        ids, mask = enc
        with torch.no_grad():
            for name, r in ((a, ra), (b, rb)):
                for mode, rec in (("cfg", r[1]), ("conditional", r[2])):
                    tf = policy.image_logprobs(ids, mask, r[0], mode=mode, cfg_scale=cfg_scale,
                                               temperature=temperature).float().cpu()
                    d = (tf - rec).abs()
                    res[f"{name}_vs_teacher_forcing_{mode}_max_abs"] = round(float(d.max()), 4)
                    res[f"{name}_vs_teacher_forcing_{mode}_mean_abs"] = round(float(d.mean()), 5)
    print(json.dumps(res), flush=True)
    return res, (ra, ta, enc)


# ----------------------------------------------------------------------------- speed
def time_fast(policy, batch, cfg_scale, bandwidth, device, label=""):
    sampler = fast_sampler_for(policy)
    sampler.release()
    sampler.stats = {"captures": 0, "replays": 0, "eager_steps": 0}
    sampler.profile_steps = True
    reset_peak(device)
    prompts = prompts_for(batch)
    prompt_len = policy.encode_generation_prompts(prompts)[0].shape[1]
    T = policy.num_image_tokens
    res = {"sampler": "uniloop-fast" + label, "batch": batch, "tokens": T, "prompt_len": prompt_len}
    try:
        t0 = time.perf_counter()
        policy.sample_images(prompts, list(range(batch)), cfg_scale=cfg_scale, temperature=1.0, decode=False,
                             sampler="fast")
        sync(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        policy.sample_images(prompts, list(range(batch, 2 * batch)), cfg_scale=cfg_scale, temperature=1.0,
                             decode=False, sampler="fast")
        sync(device)
        warm = time.perf_counter() - t0
    except torch.OutOfMemoryError as e:
        res["error"] = f"OOM: {str(e)[:120]}"
        sampler.release()
        print(json.dumps(res), flush=True)
        return res
    res.update(first_call_s=round(first, 2), call_s=round(warm, 3), ms_per_step=round(1e3 * warm / T, 3),
               images_per_s=round(batch / warm, 2), peak_GiB=peak_GiB(device),
               graphs=sampler.stats["captures"], graph_replays=sampler.stats["replays"],
               eager_steps=sampler.stats["eager_steps"], capture_failed=sampler.stats.get("capture_failed"))
    if torch.device(device).type == "cuda":
        decode_ms = sampler.last_decode_ms_per_step()
        ev = sampler.last_step_events + [sampler.last_decode_events[1]]
        per_step = sorted(a.elapsed_time(b) for a, b in zip(ev[:-1], ev[1:]))
        res.update(step_ms_median=round(per_step[len(per_step) // 2], 3), step_ms_max=round(per_step[-1], 3),
                   step_ms_p90=round(per_step[int(0.9 * len(per_step))], 3))
        weights, kv = step_bytes(policy, 2 * batch if cfg_scale > 1 else batch, prompt_len)
        floor_ms = (weights + kv) / (bandwidth * 1e9) * 1e3
        res.update(decode_ms_per_step=round(decode_ms, 3), step_GB=round((weights + kv) / 1e9, 2),
                   floor_ms_per_step=round(floor_ms, 3), decode_over_floor=round(decode_ms / floor_ms, 2),
                   floor_images_per_s=round(batch / (floor_ms * T / 1e3), 1),
                   workspace_GiB=round(sampler.ws.nbytes() / 2**30, 2))
    sampler.release()
    sampler.profile_steps = False
    print(json.dumps(res), flush=True)
    return res


def hf_cache(janus, max_len):
    try:
        from transformers import StaticCache
        return StaticCache(config=janus.config.get_text_config(), max_cache_len=max_len), "static"
    except Exception:  # pragma: no cover - other transformers versions
        from transformers import DynamicCache
        return DynamicCache(), "dynamic"


def time_hf(policy, batch, cfg_scale, device):
    janus = policy.janus
    prompts = prompts_for(batch)
    ids, mask = policy.encode_generation_prompts(prompts)
    T = policy.num_image_tokens
    tok = policy.tokenizer
    res = {"sampler": "hf-generate", "batch": batch, "tokens": T, "prompt_len": ids.shape[1]}
    reset_peak(device)
    try:
        # transformers 5.17 fails inside image generate unless a cache is passed in.
        cache, kind = hf_cache(janus, ids.shape[1] + T)
        res["cache"] = kind
        janus.generation_config.generation_kwargs = {"boi_token_id": tok.convert_tokens_to_ids(tok.boi_token)}
        t0 = time.perf_counter()
        with torch.no_grad():
            out = janus.generate(input_ids=ids, attention_mask=mask, generation_mode="image",
                                 guidance_scale=cfg_scale, do_sample=False, past_key_values=cache)
        sync(device)
        dt = time.perf_counter() - t0
    except torch.OutOfMemoryError as e:
        res["error"] = f"OOM: {str(e)[:120]}"
        print(json.dumps(res), flush=True)
        return res
    res.update(call_s=round(dt, 3), ms_per_step=round(1e3 * dt / T, 3), images_per_s=round(batch / dt, 3),
               peak_GiB=peak_GiB(device))
    del out, cache
    print(json.dumps(res), flush=True)
    return res


def time_text(policy, batch, device, new_tokens=16):
    """Understanding rollouts (answer()): prefill + short decode. Measured to decide on a fast path."""
    size = policy.image_size
    images = torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(0))
    questions = ["what color is this image?"] * batch
    seeds = list(range(batch))
    times = {}
    reset_peak(device)
    for n in (new_tokens, 1, new_tokens):  # warm-up, prefill only, full run
        t0 = time.perf_counter()
        out = policy.answer(images, questions, seeds, max_new_tokens=n, temperature=1.0)
        sync(device)
        times[n] = time.perf_counter() - t0
    steps = int(out.answer_mask.sum(1).max())
    res = {"rollout": "text-answer", "batch": batch, "max_new_tokens": new_tokens, "tokens_decoded": steps,
           "prefill_s": round(times[1], 3), "call_s": round(times[new_tokens], 3),
           "decode_ms_per_step": round(1e3 * (times[new_tokens] - times[1]) / max(1, steps - 1), 2),
           "answers_per_s": round(batch / times[new_tokens], 1), "peak_GiB": peak_GiB(device)}
    print(json.dumps(res), flush=True)
    return res


def add_random_lora(policy, r=16, seed=0):
    policy.add_lora(r=r, alpha=2 * r)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a "trained" adapter: B != 0, so it changes every projection it wraps
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_((0.02 * torch.randn(p.shape, generator=g)).to(p.dtype))
    policy.model.eval()


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="16,64,128")
    ap.add_argument("--hf-batches", default="16,64", help="batches for transformers' generate (baseline)")
    ap.add_argument("--batches-7b", default="16,64,128")
    ap.add_argument("--hf-batches-7b", default="16")
    ap.add_argument("--check-batch", type=int, default=16, help="batch of the token-equality checks (1B shape)")
    ap.add_argument("--check-batch-fp32", type=int, default=4)
    ap.add_argument("--fp32-checks", type=int, default=2, help="1: greedy only, 2: greedy and seeded")
    ap.add_argument("--plain-bf16", type=int, default=1, help="also compare plain vs fast in bf16 (slow)")
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--lora-batches", default="64", help="fast-sampler speed with a LoRA adapter (1B)")
    ap.add_argument("--text-batch", type=int, default=64)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: checks,hf,text,lora")
    ap.add_argument("--out", default="rollout_speed.json")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    dev = args.device
    env = environment()
    print(json.dumps(env), flush=True)
    results = {"env": env, "args": vars(args), "checks": [], "runs": [], "text": [], "lora_runs": []}
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(results, indent=1))

    if torch.device(dev).type == "cuda":
        results["bandwidth_GBps"] = round(measure_bandwidth_GBps(dev), 1)
        print(f"copy bandwidth {results['bandwidth_GBps']} GB/s", flush=True)
    bw = results.get("bandwidth_GBps")

    # Build every model before the first CUDA-graph capture: on torch 2.11 random init on the CUDA
    # generator after captures failed ("Offset increment outside graph capture").
    built = {}
    for shape in args.shapes.split(","):
        t0 = time.perf_counter()
        built[shape] = build_random_policy(shape, device=dev)
        if "checks" not in skip and shape != "7b" and args.fp32_checks > 0:
            built[shape + "-fp32"] = build_random_policy(shape, device=dev, dtype=torch.float32)
        print(f"built {shape} in {time.perf_counter() - t0:.1f}s", flush=True)
    for shape in args.shapes.split(","):
        is7 = shape == "7b"
        batches = [int(b) for b in (args.batches_7b if is7 else args.batches).split(",") if b]
        hf_batches = {int(b) for b in (args.hf_batches_7b if is7 else args.hf_batches).split(",") if b}
        policy = built.pop(shape)
        if "checks" not in skip and not is7:
            cb = args.check_batch
            seeds = list(range(100, 100 + cb))
            pr = prompts_for(cb)
            r, base_graphs = compare(policy, f"{shape} bf16: CUDA graphs vs eager static-cache step (same bucket)",
                                     "graphs", "eager", pr, seeds, args.cfg_scale, 1.0, must_equal=True)
            results["checks"].append(r)
            if args.plain_bf16:
                r, _ = compare(policy, f"{shape} bf16: plain (transformers) vs fast, seeded", "plain", "graphs", pr,
                               seeds, args.cfg_scale, 1.0, must_equal=False, teacher_forcing=True)
                results["checks"].append(r)
            save()
            # float32 twin (same shapes, TF32 off): here the kernels' rounding differences are ~1e-7
            fp32 = built.pop(shape + "-fp32", None)
            fb = args.check_batch_fp32
            for temp, label in ((0.0, "greedy"), (1.0, "seeded"))[: args.fp32_checks if fp32 is not None else 0]:
                r, _ = compare(fp32, f"{shape} fp32: plain vs fast, {label}, padded prompts", "plain", "graphs",
                               prompts_for(fb), list(range(fb)), args.cfg_scale, temp, must_equal=True)
                results["checks"].append(r)
                save()
            del fp32
            reset_peak(dev)
        for b in batches:
            r = time_fast(policy, b, args.cfg_scale, bw, dev)
            r["shape"] = shape
            results["runs"].append(r)
            save()
            if b in hf_batches and "hf" not in skip:
                h = time_hf(policy, b, args.cfg_scale, dev)
                h["shape"] = shape
                results["runs"].append(h)
                save()
        if shape != "7b" and "text" not in skip:
            results["text"].append(dict(time_text(policy, args.text_batch, dev), shape=shape))
            save()
        if shape != "7b" and "lora" not in skip:
            add_random_lora(policy)
            if "checks" not in skip:
                cb = args.check_batch
                seeds = list(range(100, 100 + cb))
                r, lora_graphs = compare(policy, f"{shape} bf16, LoRA r16 active: graphs vs eager", "graphs", "eager",
                                         prompts_for(cb), seeds, args.cfg_scale, 1.0, must_equal=True)
                results["checks"].append(r)
                with policy.reference():  # adapter disabled: graphs re-captured, must give the base model's rollout
                    r, _ = compare(policy, f"{shape} bf16, adapter disabled (reference()): base-model graphs vs "
                                   "adapter-disabled graphs", "graphs", "graphs", prompts_for(cb), seeds,
                                   args.cfg_scale, 1.0, must_equal=True, given=base_graphs)
                results["checks"].append(r)
                r["adapter_changed_tokens"] = not torch.equal(lora_graphs[0][0], base_graphs[0][0])
                save()
            for b in [int(x) for x in args.lora_batches.split(",") if x]:
                r = time_fast(policy, b, args.cfg_scale, bw, dev, label="+lora-r16")
                r["shape"] = shape
                results["lora_runs"].append(r)
                save()
        del policy
        gc.collect()
        if torch.device(dev).type == "cuda":
            torch.cuda.empty_cache()

    # ---- summary
    print("\nshape | sampler | batch | ms/step | decode ms/step | floor ms | x floor | img/s | peak GiB | first call s")
    for r in results["runs"] + results["lora_runs"]:
        print(" | ".join(str(r.get(k, "")) for k in ("shape", "sampler", "batch", "ms_per_step", "decode_ms_per_step",
                                                     "floor_ms_per_step", "decode_over_floor", "images_per_s",
                                                     "peak_GiB", "first_call_s")) + (f" | {r['error']}" if "error" in r else ""))
    for shape in args.shapes.split(","):
        hf = [r["images_per_s"] for r in results["runs"] if r.get("shape") == shape and r["sampler"] == "hf-generate"
              and "images_per_s" in r]
        ul = [r["images_per_s"] for r in results["runs"] if r.get("shape") == shape and
              r["sampler"] == "uniloop-fast" and "images_per_s" in r]
        if hf and ul:
            results.setdefault("best_ratio", {})[shape] = round(max(ul) / max(hf), 1)
            print(f"{shape}: best uniloop {max(ul)} img/s vs best HF {max(hf)} img/s -> {max(ul) / max(hf):.1f}x")
    ok = all(c["tokens_equal"] and c["logprobs_bitwise_equal"] for c in results["checks"]
             if c["must_be_equal"] and "fp32" not in c["check"])
    ok = ok and all(c["tokens_equal"] for c in results["checks"] if "fp32" in c["check"])
    results["all_token_checks_passed"] = ok
    save()
    print("token-equality checks:", "PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
