"""Evaluation by sampling: every task prompt, n samples with fixed seeds, scored by the reward mixture.

The training reward of a step is noisy (other prompts, other seeds every step); this one is not:
the same prompts and the same per-sample seeds at every evaluation, so two evaluations differ only
by what the adapter learned. GRPO and Flow-GRPO run it every `grpo.eval_steps`; DPO, online DPO and
Diffusion-DPO every `dpo.eval_steps`. Metrics: eval/reward/<name>/mean, eval/reward/<kind>/mean.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..rewards.base import RewardContext
from ..rewards.builtin import named_color
from ..rollouts.worker import RolloutRequest
from .runlog import save_image_grid

EVAL_SEED_STEP = 10 ** 9  # the `step` evaluation samples are seeded with: the same at every evaluation


def image_eval_request(prompts: list[str], samples_per_prompt: int, targets: list[str] | None = None) -> RolloutRequest:
    return RolloutRequest("image", list(prompts), samples_per_prompt, EVAL_SEED_STEP,
                          targets=list(targets) if targets else [named_color(p) or "" for p in prompts])


def eval_requests(tasks, samples_per_prompt: int) -> list[RolloutRequest]:
    """One request per task covering all of its prompts (ImageTask / TextTask), fixed seeds."""
    reqs = []
    for task in tasks or []:
        if task.kind == "image":
            reqs.append(image_eval_request(task.prompts, samples_per_prompt, getattr(task, "targets", None)))
        else:
            reqs.append(RolloutRequest("text", [q for _, q, _ in task.items], samples_per_prompt, EVAL_SEED_STEP,
                                       targets=[a for _, _, a in task.items],
                                       images=torch.stack([im for im, _, _ in task.items])))
    return reqs


@torch.no_grad()
def evaluate_samples(worker, requests: list[RolloutRequest], rewards, policy, step: int,
                     grid_path: str | Path | None = None, table_path: str | Path | None = None,
                     keep: list | None = None) -> dict:
    """Sample `requests` with `worker` (its policy in eval mode) and score them: eval/reward/* metrics.
    With `grid_path`, a PNG grid (a row of samples per prompt, each captioned with its reward); with
    `table_path`, a JSON table of every prompt's mean rewards (`prompt_table`); `keep` receives each
    scored (batch, mixture output) (`uniloop eval` writes every sample)."""
    if rewards is None or not requests:
        return {}
    m, table = {}, []
    for req in requests:
        batch = worker.generate(req)
        if not rewards.applicable(batch.kind):
            continue
        mix = rewards(batch, RewardContext(policy=policy, step=step))
        if keep is not None:
            keep.append((batch, mix))
        for name, out in mix.components.items():
            m[f"eval/reward/{name}/mean"] = out.scores[out.valid].mean().item() if out.valid.any() else float("nan")
        m[f"eval/reward/{batch.kind}/mean"] = mix.total[mix.valid].mean().item() if mix.valid.any() else float("nan")
        table += prompt_table(batch, mix)
        if batch.kind == "image" and grid_path is not None:
            groups = batch.group_ids.unique().tolist()
            per = max(1, min(8, 32 // max(len(groups), 1)))
            idx = [i for g in groups[:32] for i in (batch.group_ids == g).nonzero().flatten().tolist()[:per]]
            save_image_grid(batch.images[idx], [f"{batch.prompts[i]} r={mix.total[i]:.2f}" for i in idx], grid_path,
                            cols=per)
    if table_path is not None and table:
        Path(table_path).parent.mkdir(parents=True, exist_ok=True)
        Path(table_path).write_text(json.dumps({"step": step, "prompts": table}, indent=1))
    return m


def prompt_table(batch, mix) -> list[dict]:
    """Per prompt of a scored batch (an image prompt, or a question about one image): the number of
    samples and the mean of the total and of every component over its valid samples."""
    rows = []
    for g in batch.group_ids.unique().tolist():
        idx = (batch.group_ids == g).nonzero().flatten()
        i0 = int(idx[0])
        target = batch.targets[i0] if batch.targets else ""
        row = {"kind": batch.kind, "prompt": batch.prompts[i0], "target": target, "samples": len(idx),
               "key": f"{batch.kind}: {batch.prompts[i0]}" + (f" [{target}]" if batch.kind == "text" else "")}
        for name, scores, valid in [("total", mix.total, mix.valid),
                                    *((n, o.scores, o.valid) for n, o in mix.components.items())]:
            ok = valid[idx]
            row[name] = scores[idx][ok].float().mean().item() if ok.any() else None
        plans = getattr(batch, "plans", None)
        if plans:  # a reasoned rollout: its most common plan, shown before -> after in the summary
            row["plan"] = Counter(plans[i] for i in idx.tolist()).most_common(1)[0][0]
        rows.append(row)
    return rows
