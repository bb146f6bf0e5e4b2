"""One validation pass over a loaded config, before any model loads: every error is one line naming
the file:line (or --set key) and what to do; `uniloop train` exits 2 on it.

`rl/config.py` checks values, types and ranges while loading; this pass checks what needs the
registries (algorithms, rewards, policy families: a user may have registered their own) or the
machine (checkpoint paths, the hub cache when offline, devices, environment variables, data files,
prompt lengths against the model's context).
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

from ..policies.registry import is_tiny, policy_families, resolve_checkpoint
from ..rewards.base import reward_types
from .algorithms import algorithms
from .config import Config, ConfigError, load_config
from .config_loader import source_of
from .tasks import build_tasks
from .trackers import missing_package, normalize_report_to, tracker_names
from .trainer import policy_spec


def load_run_config(path, overrides: list[str] | None = None) -> Config:
    """`load_config` + `validate`: what `uniloop train` runs on."""
    cfg = load_config(path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config):
    """Raise ConfigError naming the file:line (or --set) of the first key that cannot work."""
    src = source_of(cfg)
    algos = algorithms()
    if cfg.algorithm not in algos:
        raise ConfigError(f"{src.where('algorithm')}: key 'algorithm' must be a registered algorithm "
                          f"{sorted(algos)}, got {cfg.algorithm!r}")
    trainer = algos[cfg.algorithm]
    need = getattr(trainer, "min_generations", 1)
    if cfg.rollout.num_generations < need:
        raise ConfigError(f"{src.where('rollout.num_generations')}: key 'rollout.num_generations' must be >= {need} "
                          f"for {cfg.algorithm} (it compares the samples of one prompt: with 1 every advantage is 0 "
                          f"and nothing trains), got {cfg.rollout.num_generations}")
    if cfg.learner.num_workers > 1 and not getattr(trainer, "data_parallel", False):
        runs = sorted(n for n, t in algos.items() if getattr(t, "data_parallel", False))
        raise ConfigError(f"{src.where('learner.num_workers')}: key 'learner.num_workers' > 1 is not supported by "
                          f"{cfg.algorithm} yet (ranks run: {runs}); use learner.num_workers: 1")
    if cfg.learner.num_workers > 1:
        check_ranks(cfg, trainer, src)
    if cfg.learner.full_finetune:
        check_full_finetune(cfg, trainer, src)
    if cfg.learner.mode == "colocated":
        check_colocated(cfg, trainer, src)
    families = policy_families()
    if cfg.model.family != "auto" and cfg.model.family not in families:
        raise ConfigError(f"{src.where('model.family')}: key 'model.family' must be `auto` or a registered policy "
                          f"family {sorted(families)}, got {cfg.model.family!r}")
    check_rewards(cfg, src)
    check_report_to(cfg, src)
    check_unirl(cfg, src)
    check_segment_rewards(cfg, src)
    section = getattr(trainer, "policy_section", "model")
    model = cfg.flow if section == "flow" and cfg.flow is not None else cfg.model
    check_checkpoint(model.name_or_path, f"{section}.name_or_path", src)
    check_device(model.device, f"{section}.device", src)
    check_preference_files(cfg, src)
    if section == "model":
        check_prompt_lengths(cfg, src)


def check_unirl(cfg, src):
    """`unirl` asks questions about image_task's images (grpo only); its colors and similarities must fit."""
    u = getattr(cfg, "unirl", None)
    if u is None:
        return
    if cfg.algorithm != "grpo" or cfg.image_task is None:
        raise ConfigError(f"{src.where('unirl')}: key 'unirl' needs algorithm: grpo and an image_task (its images "
                          f"become the questions), got algorithm {cfg.algorithm!r}"
                          f"{' and no image_task' if cfg.image_task is None else ''}")
    from ..policies.tiny import COLORS
    unknown = [c for c in u.eval_colors if c not in COLORS]
    if unknown:
        raise ConfigError(f"{src.where('unirl.eval_colors')}: key 'unirl.eval_colors' has unknown color "
                          f"{unknown[0]!r}; known: {sorted(COLORS)}")
    n = len(cfg.image_task.prompts)
    if u.pair_similarity == "data" and (len(u.similarities) != n or cfg.image_task.prompts_file):
        raise ConfigError(f"{src.where('unirl.similarities')}: key 'unirl.similarities' needs one value per "
                          f"image_task.prompts entry ({n}, no prompts_file), got {len(u.similarities)}")


def check_segment_rewards(cfg, src):
    """reasoning.plan_rewards / image_rewards name configured rewards (grpo: the advantage estimator)."""
    r = getattr(cfg, "reasoning", None)
    if r is None:
        return
    names = [rc.name for rc in cfg.rewards]
    for key in ("plan_rewards", "image_rewards"):
        chosen = getattr(r, key)
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise ConfigError(f"{src.where(f'reasoning.{key}')}: key 'reasoning.{key}' names {unknown[0]!r}, which is "
                              f"not a configured reward; rewards: {names}")
        if chosen and cfg.algorithm != "grpo":
            raise ConfigError(f"{src.where(f'reasoning.{key}')}: key 'reasoning.{key}' needs algorithm: grpo "
                              f"(its advantages), got {cfg.algorithm!r}")


def check_ranks(cfg, trainer, src):
    """What N learner ranks cannot do yet with a flow-matching generator."""
    if getattr(trainer, "policy_section", "model") != "flow":
        return
    if cfg.learner.strategy == "fsdp":
        raise ConfigError(f"{src.where('learner.strategy')}: key 'learner.strategy' must be ddp for {cfg.algorithm} "
                          f"(fsdp shards a unified model's language-model decoder layers; a flow transformer's "
                          f"adapter and its EMA stay replicated)")


def check_colocated(cfg, trainer, src):
    """learner.mode colocated: the ranks are the samplers, so there must be sampling and no other sampler."""
    if not getattr(trainer, "samples_rollouts", False):
        raise ConfigError(f"{src.where('learner.mode')}: key 'learner.mode' colocated shards each step's rollouts "
                          f"over the ranks; {cfg.algorithm} samples none (its data is fixed)")
    if cfg.rollout.num_workers:
        raise ConfigError(f"{src.where('rollout.num_workers')}: key 'rollout.num_workers' must be 0 with "
                          f"learner.mode colocated (the learner ranks sample; rollout actors are split mode)")


def check_full_finetune(cfg, trainer, src):
    """Full fine-tuning trains a unified model's decoder weights (its KL / DPO reference: a frozen copy of
    them, `PeftPolicy.freeze_reference`); Ray rollout actors then get full weights in buckets."""
    if getattr(trainer, "policy_section", "model") != "model" or not getattr(trainer, "data_parallel", False):
        raise ConfigError(f"{src.where('learner.full_finetune')}: key 'learner.full_finetune' is supported by "
                          f"the unified-model algorithms that run on learner ranks, not {cfg.algorithm}")


def check_rewards(cfg, src):
    types = reward_types()
    for i, rc in enumerate(cfg.rewards):
        tname = rc.type or rc.name
        key = f"rewards[{i}].type" if rc.type else f"rewards[{i}].name"
        if tname not in types:
            raise ConfigError(f"{src.where(key)}: key '{key}' names no registered reward type: {tname!r}; "
                              f"registered: {sorted(types)}")
        try:  # the constructor's signature, without building the reward (no model loads here)
            inspect.signature(types[tname]).bind(**dict(rc.args))
        except TypeError as e:
            raise ConfigError(f"{src.where(f'rewards[{i}].args')}: key 'rewards[{i}].args' does not fit reward type "
                              f"{tname!r}: {e}") from None
        check = getattr(types[tname], "check_args", None)  # a reward's own cheap value checks (no model)
        if check is not None:
            try:
                check(**dict(rc.args))
            except ValueError as e:
                raise ConfigError(f"{src.where(f'rewards[{i}].args')}: key 'rewards[{i}].args' ({rc.name!r}): "
                                  f"{e}") from None
        env = rc.args.get("api_key_env")
        if env and os.environ.get(env) is None:
            raise ConfigError(f"{src.where(f'rewards[{i}].args')}: rewards[{i}] ({rc.name!r}) reads its API key from "
                              f"${env}, which is not set in this environment: export {env}=... first")


def check_report_to(cfg, src):
    names = normalize_report_to(cfg.logging.report_to)
    known = tracker_names()
    for name in names:
        if name not in known:
            raise ConfigError(f"{src.where('logging.report_to')}: key 'logging.report_to' must list trackers of "
                              f"{known} (or be `all` / `none`), got {name!r}")
        if name == "tensorboard" and not cfg.logging.tensorboard:
            continue
        pkg = missing_package(name)
        if pkg:
            raise ConfigError(f"{src.where('logging.report_to')}: key 'logging.report_to' names {name!r}, but the "
                              f"package {pkg!r} is not installed: pip install 'uniloop[tracking]' (or {pkg})")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_checkpoint(name: str, key: str, src):
    """A local directory that exists, or a hub id (`org/name`): when offline, one in the local cache."""
    if is_tiny(name):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{src.where(key)}: key '{key}': {name} is a file; give a checkpoint directory "
                              f"(written by save_pretrained) or a hub id")
        return
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise ConfigError(f"{src.where(key)}: key '{key}': no such checkpoint directory: {name} (nor a hub id of "
                          f"the form org/name)")
    if _offline():
        from huggingface_hub import try_to_load_from_cache
        if not any(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", "model_index.json")):
            raise ConfigError(f"{src.where(key)}: key '{key}': {name} is a hub id, but this machine is offline "
                              f"(HF_HUB_OFFLINE=1) and it is not in the local cache: download it where there is "
                              f"internet (hf download {name}) or point {key} at a local directory")


def check_device(device: str, key: str, src):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{src.where(key)}: key '{key}' is {device!r}, but no CUDA device is visible here "
                          f"(torch.cuda.is_available() is False): use cpu, or run on a GPU machine")
    if device.startswith("cuda:") and device[5:].isdigit() and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"{src.where(key)}: key '{key}' is {device!r}, but only {torch.cuda.device_count()} "
                          f"CUDA device(s) are visible")


def check_preference_files(cfg, src):
    """Local preference files are read and checked (records, fields, types) before any model loads."""
    pd = cfg.preference_data
    if pd is None or cfg.algorithm not in ("dpo", "diffusion_dpo"):
        return
    from .preference_data import PreferenceDataError, read_preference_records
    for name in ("train", "eval"):
        for i, source in enumerate(getattr(pd, name)):
            if not Path(source).expanduser().exists() and source.count("/") == 1 and not source.startswith((".", "/")):
                continue  # a hub dataset id: read when the run starts
            try:
                read_preference_records(source, split=pd.split if name == "train" else pd.eval_split,
                                        skip_invalid=pd.skip_invalid, check_images=False)
            except PreferenceDataError as e:
                raise ConfigError(f"{src.where(f'preference_data.{name}[{i}]')}: {e}") from None


def check_prompt_lengths(cfg, src):
    """Every task prompt fits the model's context with its image tokens (a 20k-word prompt would
    otherwise pass and fail in the first step allocating tens of GB)."""
    if cfg.image_task is None and cfg.text_task is None:
        return
    spec = policy_spec(cfg)
    cls = policy_families()[spec.family].cls
    if cfg.reasoning is not None and not hasattr(cls, "sample_reasoned_images"):
        raise ConfigError(f"{src.where('reasoning')}: key 'reasoning' needs a policy family that writes text before "
                          f"its image (janus); {spec.family} has no sample_reasoned_images")
    budget = getattr(cls, "prompt_budget", None)
    if budget is None:
        return
    spec = resolve_checkpoint(spec)  # a tiny model is built here (cheap); nothing is loaded
    tokenizer, room = budget(spec.name_or_path)
    if cfg.reasoning is not None:
        for i, stop in enumerate(cfg.reasoning.stop):
            ids = tokenizer.encode(stop, add_special_tokens=False)
            if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
                raise ConfigError(f"{src.where('reasoning.stop')}: key 'reasoning.stop[{i}]' ({stop!r}) must be one "
                                  f"token of the model's tokenizer (it is {ids})")
    margin = 32  # the chat template around the prompt
    for task in build_tasks(cfg, image_size=8):
        texts = task.prompts if task.kind == "image" else sorted({q for _, q, _ in task.items})
        section = "image_task" if task.kind == "image" else "text_task"
        for text in texts:
            n = len(tokenizer(text)["input_ids"])
            if n + margin > room:
                raise ConfigError(f"{src.where(section)}: a {section} prompt has {n} tokens ({text[:40]!r}...), but "
                                  f"{spec.family} {cfg.model.name_or_path} has room for {room - margin} prompt tokens "
                                  f"(its context minus the image tokens): shorten it")
