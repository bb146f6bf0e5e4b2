"""Owning a run directory: one live process per output_dir, resume only from a complete checkpoint with
the settings the run used, every config kept. Nothing a run wrote is deleted or mixed with another's.

    with RunLock(output_dir):              a second run into a live run's directory fails at once
        check_resume(output_dir)           --resume: a complete checkpoint must exist
        prepare_run_dir(output_dir, ...)   a fresh run moves an earlier one aside (<dir>.1, .2, ...)
        record_config(cfg, ...)            config.yaml + configs/config_step_N.yaml; changed settings
                                           on --resume are refused unless allowed
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import yaml

from .checkpoint import latest_checkpoint, load_checkpoint
from .config import save_config, to_dict


class RunDirError(ValueError):
    """A problem with the run directory the user can act on; the message says what to do (exit 2)."""


class RunAborted(RuntimeError):
    """The run stopped itself (e.g. invalid rewards); the step's metrics were logged and the summary written."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = metrics or {}


class RunInterrupted(Exception):
    """SIGINT/SIGTERM: the run finished its step, saved a checkpoint and wrote its summary."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} after step {step}")
        self.step, self.signal_name = step, signal_name


def lock_path(output_dir: str | Path) -> Path:
    d = Path(output_dir).absolute()
    return d.parent / f".{d.name}.lock"  # beside the directory: moving the directory aside keeps the lock


class RunLock:
    """Exclusive ownership of `output_dir` for one process (`flock`: the kernel releases it when the
    process dies, so a crash never leaves a stale lock). The lock file names the owner for the error."""

    def __init__(self, output_dir: str | Path, what: str = "run"):
        self.dir, self.what, self.file = Path(output_dir), what, None

    def __enter__(self):
        path = lock_path(self.dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a+")
        except OSError as e:
            raise RunDirError(f"output_dir {self.dir} cannot be created or written: {e.strerror} ({path.parent})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise RunDirError(f"output_dir {self.dir} is in use by a live {self.what} ({owner}): wait for it to "
                              f"finish, or choose another output_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
        return False


def check_writable(d: Path):
    """`d` exists (created if needed) and a file can be written in it; else one clear RunDirError."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        raise RunDirError(f"output_dir {d} is not writable: {reason}") from None


def check_resume(output_dir: str | Path) -> Path:
    """--resume needs a complete checkpoint: the newest one, or a RunDirError saying why there is none."""
    d = Path(output_dir)
    if not d.is_dir():
        raise RunDirError(f"--resume: output_dir {d} does not exist: there is no run to resume (leave out --resume "
                          f"to start one)")
    ckpt = latest_checkpoint(d)
    if ckpt is None:
        raise RunDirError(f"--resume: {d} holds no complete checkpoint (the run stopped before its first save, see "
                          f"logging.save_every): leave out --resume to start over; the earlier run is then moved "
                          f"aside to {d}.1, nothing is deleted")
    return ckpt


def prepare_run_dir(output_dir: str | Path, resume: bool) -> Path | None:
    """Before a fresh run (not --resume): if `output_dir` holds an earlier run (metrics.jsonl or
    checkpoints/), move it aside to `<output_dir>.1` (.2, ...) rather than appending to its metrics
    or leaving its checkpoints where a later --resume would pick them up. Returns where it went."""
    d = Path(output_dir)
    if resume or not ((d / "metrics.jsonl").exists() or (d / "checkpoints").exists()):
        return None
    k = 1
    while d.with_name(f"{d.name}.{k}").exists():
        k += 1
    dest = d.with_name(f"{d.name}.{k}")
    os.rename(d, dest)
    print(f"output_dir {d} holds an earlier run: moved it to {dest} (pass --resume to continue a run instead)",
          file=sys.stderr)
    return dest


# Settings a resumed run may change without --allow-config-change: they do not change what a step
# computes (how long to train, where and how to log, where rollouts run).
RESUMABLE = ("grpo.max_steps", "dpo.max_steps", "logging.", "ray.", "rollout.num_workers", "rollout.num_cpus_per_worker",
             "rollout.num_gpus_per_worker", "rollout.max_restarts", "eval.")


def config_changes(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new), key=str)
                for k in config_changes(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))]
    return [] if old == new else [prefix]


def record_config(cfg, run_dir: Path, resume: bool, allow_change: bool = False):
    """Write config.yaml and keep a copy per start (configs/config_step_N.yaml, N = the step it starts
    from). On resume, settings that change what a step computes are refused unless `allow_change`."""
    path = run_dir / "config.yaml"
    step = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        step = int(load_checkpoint(ckpt)["step"]) if ckpt is not None else 0
        if path.exists():
            old = yaml.safe_load(path.read_text()) or {}
            changed = [k for k in config_changes(old, json.loads(json.dumps(to_dict(cfg))))
                       if not k.startswith(RESUMABLE)]
            if changed and not allow_change:
                shown = ", ".join(f"{k} ({_get(old, k)!r} -> {_get(to_dict(cfg), k)!r})" for k in changed[:4])
                raise RunDirError(f"--resume: the config differs from the one this run used ({path}): {shown}"
                                  f"{' ...' if len(changed) > 4 else ''}. Resume with the same settings, or pass "
                                  f"--allow-config-change to continue with the new ones (every config a run used is "
                                  f"kept in {run_dir / 'configs'})")
    history = run_dir / "configs"
    history.mkdir(parents=True, exist_ok=True)
    save_config(cfg, history / f"config_step_{step:06d}.yaml")
    save_config(cfg, path)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d
