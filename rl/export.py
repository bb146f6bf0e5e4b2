"""`uniloop export RUN_OR_CHECKPOINT --out DIR`: a trained run -> a model people load without uniloop.

    uniloop export runs/quickstart --out janus-color            # merged weights + processor
    uniloop export runs/quickstart/checkpoints/step_000300 --out a --adapter-only   # the PEFT adapter
    uniloop export runs/flow_grpo_quickstart --out sd3-color --push-to-hub me/sd3-color --dry-run

Merged: the run's base model is loaded as the run's config describes (<run>/config.yaml), the
checkpoint's adapter attached, merged into the weights (PEFT `merge_and_unload`; for the flow
generator each LoRA layer of the transformer) and written with `save_pretrained`: a Janus/Emu3
directory for `JanusForConditionalGeneration.from_pretrained` (transformers), an SD3 pipeline
directory for `StableDiffusion3Pipeline.from_pretrained` (diffusers). `--adapter-only` copies the
adapter (PEFT format; the flow adapter also in diffusers' `pytorch_lora_weights.safetensors`).
`--push-to-hub REPO` uploads the directory (huggingface_hub `upload_folder`); `--dry-run` only lists it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .config import ConfigError, load_config

USAGE_ERRORS = (ConfigError, FileNotFoundError, FileExistsError, ValueError)


def find_run_dir(path: Path) -> Path:
    """The run directory a run / checkpoint / checkpoint-adapter path belongs to (it holds config.yaml)."""
    for cand in (path, *path.parents[:3]):
        if (cand / "config.yaml").is_file() and (cand / "checkpoints").is_dir():
            return cand
    raise FileNotFoundError(f"{path}: not a run directory, a checkpoint or a checkpoint's adapter (no config.yaml "
                            f"with checkpoints/ next to it); give the run's recipe with --config")


def run_policy(path: str | Path, config: str | Path | None = None):
    """(policy with the checkpoint's adapter, run config, adapter dir) for a run or checkpoint path."""
    from ..policies.registry import build_policy
    from .jobs import adapter_spec, policy_section, resolve_adapter

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint")
    run_dir = None if config else find_run_dir(path)
    cfg = load_config(config or run_dir / "config.yaml")
    if run_dir is not None:
        cfg.output_dir = str(run_dir)  # the run may have moved: its tiny model lives next to it
    adapter = resolve_adapter(str(path), key="export")
    return build_policy(adapter_spec(cfg, adapter, policy_section(cfg))), cfg, Path(adapter)


def export(path, out, adapter_only: bool = False, config=None, overwrite: bool = False) -> Path:
    """Write the merged model (or the adapter alone) of a run or checkpoint to `out`; returns `out`."""
    from .jobs import resolve_adapter

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    if out.exists():
        shutil.rmtree(out)
    if adapter_only:
        shutil.copytree(resolve_adapter(str(path), key="export"), out)
        return out
    policy, cfg, adapter = run_policy(path, config)
    policy.model.eval()
    policy.save_merged(out)
    (out / "uniloop_export.json").write_text(json.dumps(
        {"adapter": str(adapter), "algorithm": cfg.algorithm, "merged": True}, indent=1))
    return out


def push_to_hub(folder: Path, repo: str, dry_run: bool, private: bool = False, stream=None) -> list[str]:
    """Upload `folder` to the hub model repo `repo`; with `dry_run`, print what would be uploaded (no network)."""
    stream = stream or sys.stdout
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    verb = "would upload" if dry_run else "uploading"
    print(f"{verb} {len(files)} files ({total / 1e6:.1f} MB) from {folder} to https://huggingface.co/{repo}"
          f"{' (private)' if private else ''}:", file=stream)
    for p in files:
        print(f"  {p.relative_to(folder)}  {p.stat().st_size} bytes", file=stream)
    if not dry_run:
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message="Upload model exported by uniloop")
    return [str(p.relative_to(folder)) for p in files]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="uniloop export", description=(
        "Turn a run or checkpoint into a model that loads without uniloop: the adapter merged into the base "
        "weights, with the processor (save_pretrained), or the adapter alone."))
    p.add_argument("path", help="run directory (its latest checkpoint), checkpoint directory or its adapter/")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--adapter-only", action="store_true", help="copy the PEFT adapter only (no merge)")
    p.add_argument("--config", help="the run's recipe (default: <run>/config.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the exported directory to this hub model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--dry-run", action="store_true", help="with --push-to-hub: list what would be uploaded, no network")
    args = p.parse_args(argv)
    if args.dry_run and not args.push_to_hub:
        print("uniloop export: --dry-run needs --push-to-hub REPO", file=sys.stderr)
        return 2
    try:
        out = export(args.path, args.out, args.adapter_only, args.config, args.overwrite)
    except USAGE_ERRORS as e:
        print(f"uniloop export: {e}", file=sys.stderr)
        return 2
    what = "adapter" if args.adapter_only else "merged model"
    print(f"uniloop export: {what} of {args.path} in {out}")
    if args.push_to_hub:
        push_to_hub(out, args.push_to_hub, args.dry_run, args.private)
    return 0
