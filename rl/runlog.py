"""Run-directory logging: metrics.jsonl, PNG grids of samples, and the trackers of `logging.report_to`
(rl/trackers.py: TensorBoard, W&B, Trackio, MLflow) that receive the same scalars and grids."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .trackers import scalars_only


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (empty when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


class RunLogger:
    def __init__(self, output_dir: str | Path, trackers: list = ()):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.trackers = list(trackers)  # opened by the caller (rl/trackers.py open_trackers)

    def truncate_after(self, step: int):
        """On resume: drop metric lines written after the checkpoint, so the file reads as one run."""
        if not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, step: int, metrics: dict):
        clean = {"step": step}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = None  # JSON has no NaN; null says "not defined this step"
            clean[k] = v
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        scalars = scalars_only(clean)
        for t in self.trackers:
            t.log(step, scalars)

    def save_grid(self, step: int, images: torch.Tensor, captions: list[str], name: str = "samples",
                  cols: int | None = None, cell: int = 128) -> Path:
        path = self.dir / name / f"step_{step:06d}.png"
        save_image_grid(images, captions, path, cols=cols, cell=cell)
        self.log_image_file(step, name, path, caption=" | ".join(dict.fromkeys(c.split(" r=")[0] for c in captions)))
        return path

    def log_image_file(self, step: int, key: str, path: str | Path, caption: str = ""):
        """Send a PNG already in the run directory (a grid) to every tracker."""
        if Path(path).exists():
            for t in self.trackers:
                t.log_image(step, key, Path(path), caption)

    def close(self):
        for t in self.trackers:
            t.close()
        self.trackers = []


def save_image_grid(images: torch.Tensor, captions: list[str], path: str | Path, cols: int | None = None,
                    cell: int = 128):
    """A PNG grid: each image upscaled (nearest) to `cell` px with its caption underneath."""
    from PIL import Image, ImageDraw

    n = len(images)
    cols = cols or min(n, 8)
    rows = (n + cols - 1) // cols
    text_h = 40
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        arr = (images[i].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        im = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(im, (x, y))
        cap = captions[i] if i < len(captions) else ""
        for j, line in enumerate([cap[:22], cap[22:44], cap[44:66]]):
            draw.text((x + 2, y + cell + 1 + 12 * j), line, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
