"""`uniloop rollout CONFIG [--set ...]`: a run config -> a rollout job (rollouts/job.py does the work).

This side reads the config, resolves the adapter to sample from (a PEFT directory, a checkpoint, or a
run directory's latest checkpoint), builds the reward mixture and the job's manifest (everything that
changes a record: checked when a job resumes into its output directory), and hands the rollouts layer
plain pieces: a PolicySpec, the sampling settings, the pool settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

from ..policies.registry import resolve_checkpoint
from ..rewards.base import build_mixture
from ..rollouts.job import load_items, run_job as run_rollout_job
from .checkpoint import latest_checkpoint
from .config import ConfigError, load_config
from .rundir import RunDirError, RunLock, check_writable
from .trainer import policy_spec, sampling_settings


def resolve_adapter(path: str | None, key: str = "job.adapter") -> str | None:
    """A PEFT adapter dir, a checkpoint dir (with adapter/), or a run dir (its latest checkpoint);
    `key` names the option in the error."""
    if not path:
        return None
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return str(p.absolute())
    if (p / "adapter" / "adapter_config.json").exists():
        return str((p / "adapter").absolute())
    ckpt = latest_checkpoint(p) if p.is_dir() else None
    if ckpt is not None and (ckpt / "adapter" / "adapter_config.json").exists():
        return str((ckpt / "adapter").absolute())
    raise FileNotFoundError(f"{key}: no PEFT adapter at {path} (expected adapter_config.json, a checkpoint "
                            f"with adapter/, or a run directory with checkpoints/)")


def policy_section(cfg) -> str:
    """`model` (a unified model) or `flow` (a flow generator): what the recipe's algorithm trains."""
    from .algorithms import algorithms
    return getattr(algorithms().get(cfg.algorithm), "policy_section", "model")


def adapter_spec(cfg, adapter: str | None, section: str = "model"):
    """The run's PolicySpec with `adapter` (a PEFT directory) as its LoRA, or no adapter at all."""
    spec = policy_spec(cfg, section)
    return dataclasses.replace(spec, lora=dataclasses.replace(spec.lora, init_adapter=adapter) if adapter else None)


def job_manifest(cfg, items, spec) -> dict:
    """What the job samples and how: a resumed job must match it, or it would mix records."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.index, it.kind, it.prompt, it.target, it.image_ref]).encode())
    r = cfg.rollout
    adapter = spec.lora.init_adapter if spec.lora is not None else None
    # every reward setting changes the records' totals: a resumed job with other rewards would mix them
    rewards = [{"name": rc.name, "type": rc.type or rc.name, "weight": rc.weight, "normalize": rc.normalize,
                "clip": rc.clip, "args": rc.args} for rc in cfg.rewards]
    return {"prompts": str(Path(cfg.job.prompts).absolute()), "num_prompts": len(items),
            "prompts_sha256": h.hexdigest(),
            "samples_per_prompt": cfg.job.samples_per_prompt, "seed": cfg.seed, "model": spec.name_or_path,
            "adapter": adapter, "cfg_scale": r.cfg_scale, "temperature": r.temperature, "top_k": r.top_k,
            "max_new_tokens": r.max_new_tokens, "rewards": json.loads(json.dumps(rewards)),
            "reward_combine": cfg.reward_combine}


def run_job(cfg, progress: bool = True, on_shard=None) -> dict:
    """Run (or resume) the rollout job `cfg.job`; returns the summary also written to summary.json."""
    if cfg.job is None:
        raise ValueError("the config has no `job:` section (see configs/rollout_job.yaml)")
    items = load_items(cfg.job)
    adapter = resolve_adapter(cfg.job.adapter)
    spec = resolve_checkpoint(adapter_spec(cfg, adapter))
    with RunLock(cfg.output_dir, what="rollout job"):
        check_writable(Path(cfg.output_dir))
        rewards = build_mixture(cfg.rewards, cfg.reward_combine)
        return run_rollout_job(cfg.job, items, spec, sampling_settings(cfg), cfg.rollout, rewards,
                               Path(cfg.output_dir), cfg.seed, job_manifest(cfg, items, spec), ray_cfg=cfg.ray,
                               progress=progress, on_shard=on_shard)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="uniloop rollout", description=(
        "Sample + score a prompt file into resumable shards (JSONL + PNG), a summary and a gallery. "
        "Re-run the same command to resume."))
    p.add_argument("config", help="YAML recipe with a `job:` section (see configs/rollout_job.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set job.samples_per_prompt=8 (repeatable)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.job is None:
            raise ConfigError(f"{args.config}: the config has no `job:` section (see configs/rollout_job.yaml)")
    except (ConfigError, ValueError) as e:
        print(f"uniloop rollout: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_job(cfg, progress=True)
    except (ValueError, FileNotFoundError, RunDirError) as e:
        print(f"uniloop rollout: {e}", file=sys.stderr)
        return 2
    print(f"uniloop rollout: {summary['records']} samples of {summary['prompts']} prompts in {cfg.output_dir} "
          f"({summary['this_run']['samples']} new, {summary['this_run']['samples_per_second']:.2f} samples/s)")
    for name, s in summary["rewards"].items():
        mean = "n/a" if s["mean"] is None else f"{s['mean']:.4f}"
        rng = "" if s["min"] is None or not math.isfinite(s["min"]) else f"  [{s['min']:.3f}, {s['max']:.3f}]"
        print(f"  {name:24s} mean {mean}  std {s['std']:.4f}{rng}  valid {s['valid']}  invalid {s['invalid']}")
    print(f"  gallery: {Path(cfg.output_dir) / 'gallery.html'}")
    return 0
