"""Atomic checkpoints: a run killed mid-save never leaves a checkpoint that looks complete.

Layout: <output_dir>/checkpoints/step_000050/{adapter/, state.pt, COMPLETE}. A checkpoint is written
into a temporary sibling directory and renamed into place; `COMPLETE` is written last, and
`latest_checkpoint` ignores directories without it.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(output_dir: str | Path, step: int, model=None, state: dict | None = None,
                    keep: int = 2, write_extra=None) -> Path:
    """Save the adapter (`model.save_adapter`, or `save_pretrained` of a PEFT model) and `state`
    (optimizer, RNG, step...) atomically; `write_extra(tmp_dir)` adds files (the learner ranks' DCP
    state) before the checkpoint is marked complete."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp_step_{step:06d}_"))
    if model is not None:
        (getattr(model, "save_adapter", None) or model.save_pretrained)(str(tmp / "adapter"))
    torch.save({"step": step, "rng": rng_state(), **(state or {})}, tmp / "state.pt")
    if write_extra is not None:
        write_extra(tmp)
    with open(tmp / "COMPLETE", "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    keep = max(1, keep)  # the checkpoint just written is never deleted
    for old in sorted(p for p in root.glob("step_*") if (p / "COMPLETE").exists())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):  # leftovers of a run killed mid-save
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def save_trainer(trainer, write_extra=None, **extra) -> Path:
    """Checkpoint a trainer (anything with run_dir, step, cfg.logging, optimizer and a policy with
    `save_adapter` / `load_adapter_weights`): the adapter, optimizer, adapter version, RNG, step, + extra."""
    state = {"optimizer": trainer.optimizer.state_dict(), "version": trainer.policy.version, **extra}
    return save_checkpoint(trainer.run_dir, trainer.step, trainer.policy, state,
                           keep=trainer.cfg.logging.keep_checkpoints, write_extra=write_extra)


def resume_trainer(trainer) -> dict | None:
    """Restore what `save_trainer` wrote from the latest complete checkpoint; its state dict, or None."""
    ckpt = latest_checkpoint(trainer.run_dir)
    if ckpt is None:
        return None
    state = load_checkpoint(ckpt)
    if "weights" in state:  # learner.full_finetune: the trained tensors, no adapter
        from .distributed import load_trainable_state
        load_trainable_state(trainer.policy, state["weights"])
        trainer.policy.version = state["version"]
    else:
        trainer.policy.load_adapter_weights(ckpt / "adapter", version=state["version"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    trainer.step = state["step"]
    return state


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = Path(output_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if (p / "COMPLETE").exists())
    return done[-1] if done else None


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
