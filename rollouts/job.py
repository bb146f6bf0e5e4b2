"""Rollout jobs (`uniloop rollout CONFIG`, rl/jobs.py): sample and score a prompt file into resumable shards.

A rollout job reads prompts (JSONL, text, or a `datasets` directory), draws `job.samples_per_prompt`
samples per prompt from the base model or a checkpoint's adapter, scores them with the configured
rewards and writes them incrementally:

    <output_dir>/job.json                        what the job samples (checked on resume)
    <output_dir>/shards/shard_00003.jsonl        one record per sample (written atomically)
    <output_dir>/images/shard_00003/*.png        the sampled images of that shard
    <output_dir>/summary.json, gallery.html      per-reward summary, best and worst samples

Re-running the same command skips the prompts whose shard is complete, so an interrupted job resumes
without duplicates. Each sample's seed derives from (seed, prompt index, sample index): a resumed or
re-sharded job draws exactly the samples an uninterrupted one would. With `rollout.num_workers > 0`
the sampling runs on Ray actors (`rollouts/ray_pool.py`), which may span several nodes.
"""
from __future__ import annotations

import html
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..policies.registry import PolicySpec, build_policy, resolve_checkpoint
from ..rewards.base import RewardContext, RewardMixture
from .worker import RolloutRequest, RolloutWorker, Sampling, sample_seed

JOB_STEP = 0  # the `step` of every job sample's seed; training steps start at 1


@dataclass
class JobItem:
    """One prompt of the job: an image prompt, or an (image, question) pair to answer."""

    index: int
    kind: str  # "image" | "text"
    prompt: str  # the generation prompt or the question
    target: str = ""
    image_ref: str = ""  # where the question's image came from (path or dataset row)
    image: object = None  # PIL image or path, loaded at the model's input size when needed


# ----------------------------------------------------------------------------- reading prompts
def load_items(job, base_dir: Path | None = None) -> list[JobItem]:
    """Read `job.prompts`: JSONL / text / a `datasets` directory; errors name the file and line."""
    src = Path(job.prompts)
    if not src.exists():
        raise FileNotFoundError(f"job.prompts: not found: {src}")
    if src.is_dir():
        items = _items_from_dataset(src, job)
    elif src.suffix == ".jsonl":
        items = _items_from_jsonl(src, job)
    else:
        items = [JobItem(i, "image", line.strip())
                 for i, line in enumerate(ln for ln in src.read_text().splitlines() if ln.strip())]
    if job.limit is not None:
        items = items[:job.limit]
    if not items:
        raise ValueError(f"job.prompts: {src} holds no prompts")
    return items


def _item_from_record(rec: dict, index: int, job, where: str, base: Path | None) -> JobItem:
    target = rec.get(job.target_field) or ""
    if not isinstance(target, str):
        target = str(target)
    if rec.get(job.question_field) is not None or rec.get(job.image_field) is not None:
        q, im = rec.get(job.question_field), rec.get(job.image_field)
        if not isinstance(q, str) or im is None:
            raise ValueError(f"{where}: an answer record needs both '{job.question_field}' (a string) and "
                             f"'{job.image_field}'")
        if isinstance(im, str):
            path = Path(im) if Path(im).is_absolute() or base is None else base / im
            if not path.exists():
                raise FileNotFoundError(f"{where}: field '{job.image_field}': image not found: {path}")
            return JobItem(index, "text", q, target, str(path), path)
        return JobItem(index, "text", q, target, where, im)  # a datasets Image (PIL)
    p = rec.get(job.prompt_field)
    if not isinstance(p, str) or not p.strip():
        raise ValueError(f"{where}: field '{job.prompt_field}' (a non-empty string) is missing; answer records "
                         f"use '{job.image_field}' + '{job.question_field}'")
    return JobItem(index, "image", p, target)


def _items_from_jsonl(path: Path, job) -> list[JobItem]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        items.append(_item_from_record(rec, len(items), job, f"{path}:{n}", path.parent))
    return items


def _items_from_dataset(path: Path, job) -> list[JobItem]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if job.split not in ds:
            raise ValueError(f"job.prompts: {path} has splits {list(ds)}, not job.split={job.split!r}")
        ds = ds[job.split]
    return [_item_from_record(rec, i, job, f"{path}[{i}]", path) for i, rec in enumerate(ds)]


def _load_question_image(item: JobItem, size: int) -> torch.Tensor:
    from PIL import Image
    im = item.image
    if isinstance(im, (str, Path)):
        try:
            with Image.open(im) as f:
                im = f.convert("RGB")
        except OSError as e:
            raise ValueError(f"{item.image_ref}: corrupt or unreadable image: {e}") from None
    im = im.convert("RGB").resize((size, size), Image.BICUBIC)
    import numpy as np
    return torch.from_numpy(np.asarray(im).copy()).float() / 255


# ----------------------------------------------------------------------------- manifest
def _check_manifest(out: Path, manifest: dict):
    path = out / "job.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in manifest if old.get(k) != manifest[k]]
        if diff:
            raise ValueError(f"{path}: this output_dir holds a job with different settings ({', '.join(diff)}: "
                             f"{[old.get(k) for k in diff]} -> {[manifest[k] for k in diff]}); resuming would mix "
                             f"samples. Use a new output_dir, or delete it to start over.")
    else:
        path.write_text(json.dumps(manifest, indent=2))


def read_records(out: Path) -> list[dict]:
    """Every record of the completed shards (an in-flight shard is a hidden .tmp file: not read)."""
    recs = []
    for f in sorted((out / "shards").glob("shard_*.jsonl")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{n}: corrupt record ({e}); delete this shard to re-sample it") from None
    return recs


def _clean_partial(out: Path, done_shards: set[str]):
    """Images of shards whose JSONL never landed (the job died mid-write) are left-overs: remove them."""
    for d in (out / "images").glob("shard_*"):
        if d.name not in done_shards:
            shutil.rmtree(d, ignore_errors=True)
    for f in (out / "shards").glob(".shard_*.tmp"):
        f.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- sampling backends
class _InProcess:
    def __init__(self, policy, sampling: Sampling, seed: int):
        self.policy = policy
        self.worker = RolloutWorker(policy, sampling, seed)

    def image_size(self) -> int:
        return self.policy.image_size

    def submit(self, requests):
        return requests

    def collect(self, requests):
        batches = [self.worker.generate(r) for r in requests]
        info = {"node_id": "driver", "pid": os.getpid(), "actor": -1}
        return batches, [[info] * len(b) for b in batches]

    def metrics(self) -> dict:
        return {}

    def close(self):
        pass


class _OnRay:
    def __init__(self, spec: PolicySpec, sampling: Sampling, settings, seed: int, ray_cfg):
        import ray

        from .ray_pool import RayWorkerPool  # Ray is imported only by jobs that use it
        self.pool = RayWorkerPool(spec, sampling, settings, seed, ray_cfg)
        self._ray = ray

    def image_size(self) -> int:
        return self._ray.get(self.pool.slots[0].handle.image_size.remote())

    def submit(self, requests):
        return self.pool.submit(requests)

    def collect(self, pending):
        batches = self.pool.collect(pending)
        return batches, pending.provenance

    def metrics(self) -> dict:
        return self.pool.metrics()

    def close(self):
        self.pool.close()


class _LazyPolicy:
    """The policy for rewards that judge with it (self_understanding), built on first use only: a job
    sampling on Ray with model-free rewards never loads a model in the driver."""

    def __init__(self, build):
        self._build, self._obj = build, None

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if self._obj is None:
            self._obj = self._build()
        return getattr(self._obj, name)


# ----------------------------------------------------------------------------- the job
def run_job(job, items: list[JobItem], spec: PolicySpec, sampling: Sampling, settings, rewards: RewardMixture,
            out: Path, seed: int, manifest: dict, ray_cfg=None, progress: bool = True, on_shard=None) -> dict:
    """Run (or resume) a rollout job; returns the summary also written to summary.json.

    `job`: the job settings (samples_per_prompt, prompts_per_shard, gallery_size); `items`: its prompts
    (`load_items`); `spec`: the policy to sample (with the job's adapter as `lora.init_adapter`, if
    any); `settings`: the Ray pool settings (`rollout` section; num_workers 0 = in-process);
    `manifest`: everything that changes a record, checked against the one an earlier run of this
    output directory wrote. `on_shard(k, backend)`, if given, is called after shard k of this run is
    on disk (monitoring, and the fault-injection tests; `backend.pool` is the RayWorkerPool on Ray)."""
    n = job.samples_per_prompt
    adapter = spec.lora.init_adapter if spec.lora is not None else None
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    spec = resolve_checkpoint(spec)  # a tiny model is built once, here, for the driver and the actors
    _check_manifest(out, manifest)

    records = read_records(out)
    done = {r["prompt_index"] for r in records}
    done_shards = {Path(r["shard"]).stem for r in records}
    _clean_partial(out, done_shards)
    next_shard = 1 + max((int(s.split("_")[1]) for s in done_shards), default=-1)
    todo = [it for it in items if it.index not in done]
    chunks = [todo[i:i + job.prompts_per_shard] for i in range(0, len(todo), job.prompts_per_shard)]

    if settings.num_workers > 0:
        backend = _OnRay(spec, sampling, settings, seed, ray_cfg)
        policy = _LazyPolicy(lambda: build_policy(spec))
    else:
        policy = build_policy(spec)
        backend = _InProcess(policy, sampling, seed)
    context = RewardContext(policy=policy, step=JOB_STEP)
    size = backend.image_size() if any(it.kind == "text" for it in todo) else 0

    def requests_for(chunk):
        reqs = []
        for kind in ("image", "text"):
            its = [it for it in chunk if it.kind == kind]
            if its:
                reqs.append(RolloutRequest(
                    kind, [it.prompt for it in its], n, JOB_STEP, prompt_indices=[it.index for it in its],
                    targets=[it.target for it in its],
                    images=torch.stack([_load_question_image(it, size) for it in its]) if kind == "text" else None))
        return reqs

    from tqdm.auto import tqdm
    bar = tqdm(total=len(items) * n, initial=len(done) * n, unit="sample", desc="rollout", dynamic_ncols=True,
               disable=not progress, smoothing=0.3)
    t0, sampled = time.perf_counter(), 0
    by_index = {it.index: it for it in items}
    try:
        # Two pipelines: the actors sample shard k+1 while the driver works on shard k, and async rewards
        # (judges, reward actors) score shard k while shard k+1 is sampled; a shard is written once
        # its scores are in, in order.
        def finish(k, batches, provenance, scoring):
            nonlocal sampled
            shard = f"shard_{next_shard + k:05d}"
            recs = []
            for batch, prov, job_scores in zip(batches, provenance, scoring):
                mix = rewards.mix(batch, job_scores.result())
                recs.extend(_records(batch, prov, mix, shard, out, by_index, seed, adapter))
            _write_shard(out, shard, recs)
            sampled += len(recs)
            bar.update(len(recs))
            bar.set_postfix({"samples/s": f"{sampled / (time.perf_counter() - t0):.2f}"})
            if on_shard is not None:
                on_shard(k, backend)

        pending = backend.submit(requests_for(chunks[0])) if chunks else None
        previous = None
        for k, chunk in enumerate(chunks):
            batches, provenance = backend.collect(pending)
            pending = backend.submit(requests_for(chunks[k + 1])) if k + 1 < len(chunks) else None
            scoring = [rewards.submit(batch, context) for batch in batches]
            if previous is not None:
                finish(*previous)
            previous = (k, batches, provenance, scoring)
        if previous is not None:
            finish(*previous)
    finally:
        bar.close()
        rollout_metrics = backend.metrics()
        backend.close()
        rewards.close()
    elapsed = time.perf_counter() - t0
    summary = summarize_job(out, rewards_names=[s.name for s in rewards.specs])
    summary["this_run"] = {"samples": sampled, "seconds": elapsed,
                           "samples_per_second": sampled / elapsed if elapsed > 0 else 0.0,
                           **{k: v for k, v in rollout_metrics.items() if k.startswith(("rollout/", "sync/"))}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_gallery(out, job.gallery_size)
    return summary


def _records(batch, prov, mix, shard, out: Path, by_index, seed: int, adapter) -> list[dict]:
    from PIL import Image
    recs, seen = [], {}
    img_dir = out / "images" / shard
    for i in range(len(batch)):
        pi = int(batch.group_ids[i])
        s = seen[pi] = seen.get(pi, -1) + 1  # rows of a prompt come in sample order
        item = by_index[pi]
        rid = f"p{pi:06d}_s{s:03d}"
        rec = {"id": rid, "prompt_index": pi, "sample_index": s, "kind": batch.kind, "prompt": item.prompt,
               "target": item.target, "seed": sample_seed(seed, JOB_STEP, batch.kind, pi, s),
               "reward": float(mix.total[i]) if bool(mix.valid[i]) else None, "valid": bool(mix.valid[i]),
               "rewards": {name: (float(o.scores[i]) if bool(o.valid[i]) else None)
                           for name, o in mix.components.items()},
               "adapter": adapter, "version": int(batch.version), "node_id": prov[i]["node_id"],
               "worker_pid": prov[i]["pid"], "shard": f"shards/{shard}.jsonl"}
        if batch.kind == "image":
            img_dir.mkdir(parents=True, exist_ok=True)
            px = (batch.images[i].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(px).save(img_dir / f"{rid}.png")
            rec["image"] = f"images/{shard}/{rid}.png"
        else:
            rec["answer"] = batch.answers[i]
            rec["question_image"] = item.image_ref
        recs.append(rec)
    return recs


def _write_shard(out: Path, shard: str, recs: list[dict]):
    tmp = out / "shards" / f".{shard}.tmp"
    with open(tmp, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / "shards" / f"{shard}.jsonl")  # the shard exists completely or not at all


# ----------------------------------------------------------------------------- summary and gallery
def summarize_job(out: Path, rewards_names: list[str] | None = None) -> dict:
    recs = read_records(out)
    ids = [r["id"] for r in recs]
    summary = {"records": len(recs), "prompts": len({r["prompt_index"] for r in recs}),
               "duplicates": len(ids) - len(set(ids)), "nodes": sorted({r.get("node_id", "") for r in recs}),
               "rewards": {}}
    names = rewards_names or sorted({k for r in recs for k in r["rewards"]})
    for name in ["total", *names]:
        vals = [r["reward"] if name == "total" else r["rewards"].get(name) for r in recs]
        present = [v for v in vals if v is not None]
        applicable = [r for r in recs if name == "total" or name in r["rewards"]]
        t = torch.tensor(present, dtype=torch.float64) if present else None
        summary["rewards"][name] = {
            "mean": float(t.mean()) if t is not None else None,
            "std": float(t.std()) if t is not None and len(present) > 1 else 0.0,
            "min": float(t.min()) if t is not None else None, "max": float(t.max()) if t is not None else None,
            "valid": len(present), "invalid": len(applicable) - len(present)}
    return summary


def write_gallery(out: Path, k: int) -> Path:
    """gallery.html: per kind, the k best and k worst samples by total reward."""
    recs = [r for r in read_records(out) if r["reward"] is not None]
    esc = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>uniloop rollout gallery</title>",
             "<style>body{font-family:sans-serif} .row{display:flex;flex-wrap:wrap;gap:8px} "
             ".card{width:180px;font-size:12px;border:1px solid #ccc;padding:4px} "
             "img{width:170px;image-rendering:pixelated}</style>",
             f"<h1>{esc(str(out))}</h1><p>{len(recs)} scored samples</p>"]
    for kind in ("image", "text"):
        ks = sorted((r for r in recs if r["kind"] == kind), key=lambda r: r["reward"], reverse=True)
        if not ks:
            continue
        for title, sel in (("best", ks[:k]), ("worst", ks[::-1][:k])):
            parts.append(f"<h2>{kind}: {title} {len(sel)}</h2><div class='row'>")
            for r in sel:
                comps = ", ".join(f"{esc(n)}={'-' if v is None else f'{v:.3f}'}" for n, v in r["rewards"].items())
                body = (f"<img src='{esc(r['image'])}'>" if kind == "image" else
                        _question_image_tag(out, r) + f"<p><b>answer:</b> {esc(r['answer'])}</p>")
                parts.append(f"<div class='card'>{body}<p>{esc(r['prompt'])}</p>"
                             f"<p><b>reward {r['reward']:.3f}</b><br>{comps}</p><p>{esc(r['id'])}</p></div>")
            parts.append("</div>")
    path = out / "gallery.html"
    path.write_text("\n".join(parts))
    return path


def _question_image_tag(out: Path, r: dict) -> str:
    src = r.get("question_image") or ""
    if src and Path(src).exists():
        return f"<img src='{html.escape(os.path.relpath(src, out))}'>"
    return ""
