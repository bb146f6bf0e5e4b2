"""Tasks: where each step's prompts come from (prompt -> image, and image + question -> answer)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..policies.tiny import COLORS, solid_color_images
from ..rewards.builtin import named_color
from ..rollouts.worker import RolloutRequest


def _step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    # Prompt choice depends on (seed, step) only, so a resumed run draws what the original would have.
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2 ** 63))


def step_indices(n: int, per_step: int, seed: int, step: int, salt: int) -> list[int]:
    """The items of `step`: consecutive `per_step` items of a stream of shuffled passes over all n.

    Like a shuffling DataLoader (each pass a fresh permutation, seeded by (seed, pass)): within a pass
    no item repeats, so `per_step == n` shows every item every step, and over the run every item is
    drawn equally often. Drawing with replacement (the earlier randint) showed on average 2.7 of 4
    prompts per step, and one color could go unseen for several steps while the others' updates moved
    it. Depends on (seed, step) only, so a resumed run draws what the original would have.
    """
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(pos, n)
        out.append(_pass_order(n, seed, epoch, salt)[k])
    return out


@functools.lru_cache(maxsize=8)
def _pass_order(n: int, seed: int, epoch: int, salt: int) -> tuple:
    return tuple(torch.randperm(n, generator=_step_generator(seed, epoch, salt)).tolist())


def read_prompts(path: str) -> list[str]:
    return [p for p, _ in read_prompt_records(path)]


def read_prompt_records(path: str) -> list[tuple[str, str]]:
    """(prompt, target) per line of a text file (no targets) or a JSONL file (`prompt`, optional `target`)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"prompts file not found: {path}")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if p.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON: {e}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{path}:{i}: field 'prompt' (a string) is missing")
            if not isinstance(rec.get("target", ""), str):
                raise ValueError(f"{path}:{i}: field 'target' must be a string")
            out.append((rec["prompt"], rec.get("target", "")))
        else:
            out.append((line, ""))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


class ImageTask:
    """prompt -> image: each step takes the next `prompts_per_step` prompts of shuffled passes (step_indices)."""

    kind = "image"

    def __init__(self, prompts: list[str], prompts_per_step: int, seed: int, targets: list[str] | None = None,
                 order: str = "shuffle"):
        if not prompts:
            raise ValueError("image_task needs `prompts` or `prompts_file`")
        self.prompts, self.per_step, self.seed, self.order = list(prompts), prompts_per_step, seed, order
        # a prompt's ground truth: given, else the color it names (the synthetic task), else none
        given = list(targets or [""] * len(prompts))
        self.targets = [t or named_color(p) or "" for p, t in zip(self.prompts, given)]

    @classmethod
    def from_config(cls, cfg, seed: int) -> "ImageTask":
        """From an `image_task` section: its prompts (and targets), then those of its prompts_file."""
        records = read_prompt_records(cfg.prompts_file) if cfg.prompts_file else []
        targets = list(cfg.targets or [""] * len(cfg.prompts)) + [t for _, t in records]
        return cls(list(cfg.prompts) + [p for p, _ in records], cfg.prompts_per_step, seed, targets,
                   getattr(cfg, "order", "shuffle"))

    def request(self, step: int, num_generations: int) -> RolloutRequest:
        n = len(self.prompts)
        if self.order == "cycle":  # step 1 starts at the first prompt; a resumed run continues the cycle
            idx = [((step - 1) * self.per_step + j) % n for j in range(self.per_step)]
        else:
            idx = step_indices(n, self.per_step, self.seed, step, salt=1)
        return RolloutRequest("image", [self.prompts[i] for i in idx], num_generations, step,
                              targets=[self.targets[i] for i in idx])


class TextTask:
    kind = "text"

    def __init__(self, cfg, seed: int, image_size: int):
        self.items: list[tuple[torch.Tensor, str, str]] = []
        for c in cfg.synthetic_colors:
            if c not in COLORS:
                raise ValueError(f"text_task.synthetic_colors: unknown color {c!r}; known: {sorted(COLORS)}")
            self.items.append((solid_color_images([c], image_size)[0], cfg.question, c))
        if cfg.data_file:
            self.items.extend(read_qa_file(cfg.data_file, image_size))
        if not self.items:
            raise ValueError("text_task needs `synthetic_colors` or `data_file`")
        self.per_step, self.seed = cfg.prompts_per_step, seed

    def request(self, step: int, num_generations: int) -> RolloutRequest:
        idx = step_indices(len(self.items), self.per_step, self.seed, step, salt=2)
        return RolloutRequest("text", [self.items[i][1] for i in idx], num_generations, step,
                              targets=[self.items[i][2] for i in idx],
                              images=torch.stack([self.items[i][0] for i in idx]))


def load_image(path: Path, size: int | None, where: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    if not path.exists():
        raise FileNotFoundError(f"{where}: image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size:
                im = im.resize((size, size), Image.BICUBIC)
            import numpy as np
            return torch.from_numpy(np.asarray(im).copy()).float() / 255
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: corrupt or unreadable image {path}: {e}") from None


def read_qa_file(path: str, image_size: int):
    p = Path(path)
    items = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON: {e}") from None
        for k in ("image", "question", "answer"):
            if not isinstance(rec.get(k), str):
                raise ValueError(f"{where}: field '{k}' (a string) is missing")
        items.append((load_image(p.parent / rec["image"], image_size, f"{where}: field 'image'"),
                      rec["question"], rec["answer"]))
    return items


def build_tasks(cfg, image_size: int) -> list:
    tasks = []
    if cfg.image_task is not None:
        tasks.append(ImageTask.from_config(cfg.image_task, cfg.seed))
    if cfg.text_task is not None:
        tasks.append(TextTask(cfg.text_task, cfg.seed, image_size))
    if not tasks:
        raise ValueError(f"{cfg.output_dir}: the config defines no task: set image_task and/or text_task")
    return tasks
