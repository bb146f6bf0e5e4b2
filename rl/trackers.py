"""Experiment trackers behind `logging.report_to` (TRL's option name): tensorboard, wandb, trackio, mlflow.

metrics.jsonl in the run directory is always written (rl/runlog.py); a tracker is an extra sink for
the same scalars and for the sample grids. Each tracker's package is imported only when a run asks
for it, so none of them is a dependency of uniloop (`pip install uniloop[tracking]` adds them).
Where the data lands, offline by default:

| report_to     | where                                                   | upload                             |
| ------------- | ------------------------------------------------------- | ---------------------------------- |
| `tensorboard` | <output_dir>/tensorboard                                | -                                  |
| `wandb`       | <output_dir>/wandb/{offline-,}run-*  (WANDB_MODE)        | online mode, or `wandb sync` later |
| `trackio`     | $TRACKIO_DIR/<project>.db (default <output_dir>/trackio) | only with TRACKIO_SPACE_ID         |
| `mlflow`      | MLFLOW_TRACKING_URI (default sqlite:///<output_dir>/mlflow.db) | a server URI                |

A tracker registers with `@register_tracker("name")`: a class built as `cls(run_dir, project, run_name,
config)` with `log(step, scalars)`, `log_image(step, key, path, caption)` and `close()`.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..policies.registry import Registry

TRACKERS = Registry("tracker")
register_tracker = TRACKERS.register


# The package each built-in tracker imports (checked before any model loads: rl/validate.py).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def missing_package(name: str) -> str | None:
    """The package a tracker needs that is not installed, or None."""
    import importlib.util
    pkg = PACKAGES.get(name)
    return pkg if pkg and importlib.util.find_spec(pkg) is None else None


def tracker_names() -> list[str]:
    return sorted(TRACKERS)


def normalize_report_to(value) -> list[str]:
    """TRL's forms: a name, a list of names, "all" (every registered tracker) or "none"."""
    names = [value] if isinstance(value, str) else list(value or [])
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return tracker_names()
    return list(dict.fromkeys(names))


def open_trackers(names: list[str], run_dir: Path, project: str, run_name: str, config: dict | None) -> list:
    """Start every named tracker; a missing package is an error naming the extra that installs it."""
    out = []
    for name in names:
        cls = TRACKERS.lookup(name, "logging.report_to entry")
        try:
            out.append(cls(Path(run_dir), project, run_name, config or {}))
        except ImportError as e:
            for t in out:
                t.close()
            raise ImportError(f"logging.report_to: {name!r} needs its package ({e.name or e}); "
                              f"pip install 'uniloop[tracking]'") from e
    return out


def scalars_only(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


@register_tracker("tensorboard")
class TensorBoardTracker:
    def __init__(self, run_dir: Path, project: str, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, scalars: dict):
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_image(self, step: int, key: str, path: Path, caption: str = ""):
        import numpy as np
        from PIL import Image
        self.writer.add_image(key, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


@register_tracker("wandb")
class WandbTracker:
    """wandb.init(dir=<output_dir>); the mode comes from WANDB_MODE (offline: `wandb sync` uploads later)."""

    def __init__(self, run_dir: Path, project: str, run_name: str, config: dict):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=run_name, dir=str(run_dir),
                              config=config, reinit="create_new")

    def log(self, step: int, scalars: dict):
        self.run.log(scalars, step=step)

    def log_image(self, step: int, key: str, path: Path, caption: str = ""):
        self.run.log({key: self.wandb.Image(str(path), caption=caption or None)}, step=step)

    def close(self):
        self.run.finish()


@register_tracker("trackio")
class TrackioTracker:
    """A local SQLite database per project; nothing is uploaded unless TRACKIO_SPACE_ID names a Space."""

    def __init__(self, run_dir: Path, project: str, run_name: str, config: dict):
        os.environ.setdefault("TRACKIO_DIR", str(run_dir / "trackio"))  # read by trackio at import
        import trackio
        self.trackio = trackio
        self.run = trackio.init(project=project, name=run_name, config=config,
                                space_id=os.environ.get("TRACKIO_SPACE_ID") or None)

    def log(self, step: int, scalars: dict):
        self.trackio.log(scalars, step=step)

    def log_image(self, step: int, key: str, path: Path, caption: str = ""):
        self.trackio.log({key: self.trackio.Image(str(path), caption=caption or None)}, step=step)

    def close(self):
        self.trackio.finish()


@register_tracker("mlflow")
class MlflowTracker:
    """MLflow >= 3 refuses a bare `file:` store, so the default is a SQLite file in the run directory."""

    def __init__(self, run_dir: Path, project: str, run_name: str, config: dict):
        import mlflow
        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri or f"sqlite:///{run_dir.absolute()}/mlflow.db")
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", project)
        if not uri and mlflow.get_experiment_by_name(name) is None:
            # a SQLite store keeps artifacts (the grids) in ./mlruns of the working directory: keep them in the run
            mlflow.create_experiment(name, artifact_location=(run_dir / "mlruns").absolute().as_uri())
        mlflow.set_experiment(name)
        self.run = mlflow.start_run(run_name=run_name)
        flat = {k: v for k, v in _flatten(config).items() if v is not None}
        if flat:  # MLflow caps a param value at 6000 characters
            mlflow.log_params({k: str(v)[:6000] for k, v in list(flat.items())})

    def log(self, step: int, scalars: dict):
        self.mlflow.log_metrics({k: float(v) for k, v in scalars.items()}, step=step)

    def log_image(self, step: int, key: str, path: Path, caption: str = ""):
        from PIL import Image
        self.mlflow.log_image(Image.open(path).convert("RGB"), key=key.replace("/", "_"), step=step)

    def close(self):
        self.mlflow.end_run()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out
