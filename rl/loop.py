"""The one training loop: any registered algorithm's trainer, stepped to max_steps.

    train(cfg, TrainerClass)          own the run directory (rl/rundir.py), record the config, build the trainer
      run(trainer, resume)            resume -> [evaluate step 0] -> step, evaluate, log, grid, checkpoint
                                      -> summary.json (first vs last 10% of steps, first vs last evaluation)

Stopping is clean whatever stops it: SIGINT/SIGTERM finish the step, save a checkpoint, write the
summary and raise RunInterrupted (a second signal abandons the step at once); a run that aborts
itself (invalid rewards) logs the step first; a full disk says which checkpoint is intact.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .checkpoint import latest_checkpoint
from .rundir import (RunAborted, RunDirError, RunInterrupted, RunLock, check_resume, check_writable, prepare_run_dir,
                     record_config)
from .runlog import RunLogger, read_metrics
from .trackers import normalize_report_to, open_trackers
from .trainer import Trainer


def train(cfg, trainer_cls: type[Trainer], resume: bool = False, allow_config_change: bool = False) -> dict:
    """Run one training job of `trainer_cls` as `cfg` describes; returns the summary."""
    run_dir = Path(cfg.output_dir)
    with RunLock(run_dir):
        if resume:
            check_resume(run_dir)
        prepare_run_dir(run_dir, resume)  # a fresh run never mixes its files with an earlier one's
        trainer_cls.prepare_config(cfg)
        check_writable(run_dir)
        record_config(cfg, run_dir, resume, allow_config_change)
        return run(trainer_cls(cfg), resume)


def run(trainer: Trainer, resume: bool = False) -> dict:
    cfg, log_cfg = trainer.cfg, trainer.cfg.logging
    run_dir = Path(cfg.output_dir)
    logger = RunLogger(run_dir, open_run_trackers(cfg))
    if resume and trainer.resume():
        logger.truncate_after(trainer.step)
        print(f"resumed from step {trainer.step} ({latest_checkpoint(run_dir)})")
    total = trainer.max_steps
    progress = Progress(total, trainer.step, getattr(trainer, "algorithm_name", type(trainer).__name__),
                        enabled=log_cfg.progress_bar)
    stop = StopRequest()
    try:
        with stop.installed(), disk_full_message(run_dir):
            if trainer.step == 0:
                start = dict(trainer.start_metrics())
                if trainer.eval_due(0):
                    start.update(trainer.evaluate())  # the baseline later evaluations compare against
                if start:
                    logger.log(0, start)
                    logger.log_image_file(0, "eval_samples", run_dir / "eval_samples" / "step_000000.png")
            while trainer.step < total:
                try:
                    result = trainer.train_step()
                except RunAborted as e:  # the step that triggered it is logged before the run stops
                    logger.log(trainer.step, e.metrics)
                    raise
                step, metrics = trainer.step, result.metrics
                last = step == total
                evaluated = trainer.eval_due(step)
                if evaluated:
                    metrics.update(trainer.evaluate())
                    logger.log_image_file(step, "eval_samples", run_dir / "eval_samples" / f"step_{step:06d}.png")
                if step % log_cfg.log_every == 0 or last or evaluated or stop.requested:
                    logger.log(step, metrics)
                if log_cfg.image_grid_every and (step % log_cfg.image_grid_every == 0 or step == 1):
                    sample_grid(logger, step, result.samples)
                if (log_cfg.save_every and step % log_cfg.save_every == 0) or last or stop.requested:
                    trainer.save()
                progress.update(step, metrics)
                if stop.requested and not last:
                    raise RunInterrupted(step, stop.requested)
    finally:
        progress.close()
        logger.close()
        trainer.close()
        summary = write_summary(run_dir)  # also when the run stops early
    return summary


def open_run_trackers(cfg) -> list:
    """The trackers of logging.report_to, each given the run's config (`tensorboard: false` drops that one)."""
    from .config import to_dict
    log_cfg = cfg.logging
    names = [n for n in normalize_report_to(log_cfg.report_to) if n != "tensorboard" or log_cfg.tensorboard]
    return open_trackers(names, Path(cfg.output_dir), log_cfg.project, log_cfg.run_name or Path(cfg.output_dir).name,
                         json.loads(json.dumps(to_dict(cfg), default=str)))


def write_summary(run_dir: Path) -> dict:
    summary = summarize(read_metrics(run_dir / "metrics.jsonl"))
    summary.update(per_prompt_summary(run_dir / "eval_samples"))
    try:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    except OSError as e:  # a full disk: the metrics and checkpoints are what matters, say so and go on
        print(f"warning: could not write {run_dir / 'summary.json'}: {e}", file=sys.stderr)
    return summary


class StopRequest:
    """SIGINT / SIGTERM: the first asks the loop to stop after the current step (it checkpoints and writes
    the summary), a second one abandons the step at once (KeyboardInterrupt)."""

    def __init__(self):
        self.requested: str | None = None

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            raise KeyboardInterrupt(f"second {name}: the step was abandoned")
        self.requested = name
        print(f"\n{name}: finishing the current step, then saving a checkpoint (send it again to stop at once)",
              file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


@contextlib.contextmanager
def disk_full_message(run_dir: Path):
    """A full disk while writing metrics or a checkpoint: say so, and which checkpoint is intact
    (checkpoints are written to a temporary directory and renamed: a failed save leaves the last one)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        ckpt = latest_checkpoint(run_dir)
        raise RunDirError(f"the disk is full ({e.filename or run_dir}): the run stopped. The last complete "
                          f"checkpoint is {ckpt or 'none'}; free some space and continue with --resume") from None


# ----------------------------------------------------------------------------- summary
TRAIN_KEYS = ("dpo/loss", "dpo/accuracy")


def summarize(rows: list[dict]) -> dict:
    """The 'did it learn' numbers: first vs last 10% of the training steps for every reward mean (and
    the DPO loss and accuracy), first vs last evaluation (same prompts and seeds) for every eval metric."""
    if not rows:
        return {}
    out = {"steps": rows[-1]["step"]}
    train_rows = [r for r in rows if r["step"] > 0]  # step 0 holds the baseline evaluation only
    k = max(1, len(train_rows) // 10)
    keys = sorted({key for r in train_rows for key in r
                   if (key.startswith("reward/") and key.endswith("/mean")) or key in TRAIN_KEYS})
    for key in keys:
        first = [r[key] for r in train_rows[:k] if r.get(key) is not None]
        last = [r[key] for r in train_rows[-k:] if r.get(key) is not None]
        if first and last:
            out[key] = {"first_10pct": float(np.mean(first)), "last_10pct": float(np.mean(last))}
    for key in sorted({key for r in rows for key in r if key.startswith("eval/") and not key.endswith("/pairs")}):
        vals = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if vals:
            out[key] = {"initial": vals[0][1], "final": vals[-1][1], "initial_step": vals[0][0],
                        "final_step": vals[-1][0]}
    return out


PROMPT_TABLE_FIELDS = ("kind", "prompt", "target", "samples", "key")


def per_prompt_summary(eval_dir: Path) -> dict:
    """Every prompt's rewards at the first and the last evaluation (rl/evaluate.py writes a table per
    evaluation): a policy that collapses onto one output for every prompt shows here, not in a mean."""
    tables = sorted(Path(eval_dir).glob("step_*.json"))
    if not tables:
        return {}
    first, last = (json.loads(p.read_text()) for p in (tables[0], tables[-1]))
    return {"per_prompt": prompt_changes(first, last)}


def prompt_changes(first: dict, last: dict) -> dict:
    """Two prompt tables ({"step", "prompts": rl.evaluate.prompt_table rows}) joined by prompt: every
    reward's `initial` (first) and `final` (last) value; also `uniloop eval --compare A B`."""
    before = {r["key"]: r for r in first["prompts"]}
    prompts = {r["key"]: {k: {"initial": before.get(r["key"], {}).get(k), "final": v}
                          for k, v in r.items() if k not in PROMPT_TABLE_FIELDS}
               for r in last["prompts"]}
    return {"initial_step": first["step"], "final_step": last["step"], "prompts": prompts}


# ----------------------------------------------------------------------------- what users look at
def sample_grid(logger: RunLogger, step: int, scored: list, max_images: int = 16):
    """A PNG of a few samples of every prompt (one row per group), each captioned with its reward and
    the per-component breakdown ("r=0.71 color=.80 self_u=.42")."""
    for sb in scored:
        if sb.batch.kind != "image":
            continue
        groups = sb.batch.group_ids.unique().tolist()
        per = max(1, max_images // max(len(groups), 1))
        idx = [i for g in groups for i in (sb.batch.group_ids == g).nonzero().flatten().tolist()[:per]]
        caps = [f"{sb.batch.prompts[i]} r={sb.rewards[i]:.2f} "
                + " ".join(f"{n[:6]}={c.scores[i]:.2f}" for n, c in sb.components.items()) for i in idx]
        logger.save_grid(step, sb.batch.images[idx], caps, cols=per)


class Progress:
    """A tqdm bar on a terminal; in a log file (no TTY) one plain line every ~5% of the steps or 30 s,
    so a long run's log stays readable instead of one carriage-return line per step."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc, self.stream = total, desc, stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=self.stream)
        self.every = max(1, total // 20)
        self.t0 = self.last_print = time.monotonic()
        self.first = initial

    def update(self, step: int, metrics: dict):
        post = headline(metrics)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(post)
            return
        now = time.monotonic()
        if not self.enabled or not (step % self.every == 0 or step == self.total or now - self.last_print > 30):
            return
        self.last_print = now
        rate = (step - self.first) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        fields = "  ".join(f"{k} {v}" for k, v in post.items())
        print(f"{self.desc} step {step}/{self.total}  {fields}  ({rate:.2f} steps/s, eta {eta:.0f} s)",
              file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def headline(metrics: dict) -> dict:
    """The few numbers worth a glance: each reward's mean, and the DPO loss and accuracies."""
    out = {}
    for k, v in metrics.items():
        if not (isinstance(v, float) and math.isfinite(v)):
            continue
        if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2:
            out[k.split("/")[1]] = f"{v:.3f}"
        elif k in ("dpo/loss", "dpo/accuracy", "eval/dpo/accuracy"):
            out[k.replace("/", "_").removeprefix("dpo_")] = f"{v:.3f}"
    return out
