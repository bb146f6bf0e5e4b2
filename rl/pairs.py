"""`uniloop pairs CONFIG`: build a preference dataset from the policy's own samples, ranked by the rewards.

Runs online DPO's sample-rank-select step once over every prompt of the config's tasks
(`image_task` prompts, `text_task` images + questions) and writes the kept pairs in the
documented preference format (README "Preference data"): `OUT/pairs.jsonl`, PNG images under
`OUT/images/`, and per record the scores of the chosen and rejected samples, every candidate's
score, each reward component's score and the judges' verdicts (their raw text, when a judge
gives one), so the set can be inspected, filtered, and trained on with `algorithm: dpo`
(`preference_data.train: [OUT]`). `OUT/summary.json` counts kept and dropped prompts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..policies.batches import GENERATION, UNDERSTANDING
from ..policies.registry import build_policy
from ..rewards.base import build_mixture
from ..rewards.builtin import named_color
from ..rollouts.worker import RolloutRequest, RolloutWorker
from .online_dpo import sample_rank_select
from .config import ConfigError, load_config
from .preference_data import JSONL_NAME, PairToWrite, write_preference_jsonl
from .rundir import RunDirError, RunLock
from .tasks import build_tasks
from .trainer import policy_spec, sampling_settings


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, float) and v != v:  # NaN -> null
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def _record_meta(batch, mix, sel, k: int, model_id: str, seed: int) -> dict:
    """Scores and verdicts of the k-th kept pair, for the JSONL record."""
    i, j = sel.chosen[k], sel.rejected[k]
    group = [n for n, g in enumerate(batch.group_ids.tolist()) if g == sel.groups[k]]
    comp = {name: out for name, out in mix.components.items()}
    meta = {
        "chosen_score": sel.chosen_scores[k], "rejected_score": sel.rejected_scores[k],
        "candidate_scores": [float(mix.total[n]) if bool(mix.valid[n]) else None for n in group],
        "chosen_rewards": {name: (float(o.scores[i]) if bool(o.valid[i]) else None) for name, o in comp.items()},
        "rejected_rewards": {name: (float(o.scores[j]) if bool(o.valid[j]) else None) for name, o in comp.items()},
        "model": model_id, "seed": seed,
    }
    verdicts = {}
    for name, o in comp.items():
        for key, values in (o.details or {}).items():
            if isinstance(values, (list, tuple)) and len(values) == len(batch):
                verdicts.setdefault(name, {})[key] = {"chosen": _jsonable(values[i]),
                                                      "rejected": _jsonable(values[j])}
    if verdicts:
        meta["judge"] = verdicts
    if batch.targets and batch.targets[i]:
        meta["target"] = batch.targets[i]
    return meta


def build_pairs(cfg, out_dir: str | Path, max_prompts: int | None = None, prompts_per_batch: int = 16,
                policy=None) -> dict:
    """Sample-rank-select over all task prompts once; write the dataset; return the summary. An output
    directory that already holds a preference set is never overwritten."""
    out_dir = Path(out_dir)
    if (out_dir / JSONL_NAME).exists():
        raise RunDirError(f"{out_dir} already holds a preference set ({out_dir / JSONL_NAME}): choose another --out, "
                          f"or move that one away first (nothing is overwritten)")
    with RunLock(out_dir, what="`uniloop pairs`"):
        return _build_pairs(cfg, out_dir, max_prompts, prompts_per_batch, policy)


def _build_pairs(cfg, out_dir: Path, max_prompts, prompts_per_batch, policy) -> dict:
    if not cfg.rewards:
        raise ValueError("uniloop pairs ranks samples with the reward mixture: configure `rewards`")
    if cfg.rollout.num_generations < 2:
        raise ValueError("uniloop pairs needs rollout.num_generations >= 2 candidates per prompt")
    margin = cfg.dpo.online_margin if cfg.dpo is not None else 0.0
    if policy is None:
        policy = build_policy(policy_spec(cfg))
    policy.model.eval()
    rewards = build_mixture(cfg.rewards, cfg.reward_combine)
    worker = RolloutWorker(policy, sampling_settings(cfg), cfg.seed, shares_learner_policy=True)
    model_id = cfg.model.name_or_path
    written: list[PairToWrite] = []
    summary = {"prompts": 0, "pairs": 0, "dropped_unseparated": 0, "dropped_invalid": 0,
               "num_generations": cfg.rollout.num_generations, "margin": margin, "model": model_id}
    try:
        for task in build_tasks(cfg, policy.image_size):
            if task.kind == "image":
                items = [(p, None, "") for p in task.prompts]
            else:
                items = [(q, im, a) for im, q, a in task.items]
            items = items[:max_prompts] if max_prompts else items
            for start in range(0, len(items), prompts_per_batch):
                chunk = items[start:start + prompts_per_batch]
                targets = [a for _, _, a in chunk] if task.kind == "text" else [_color(p) for p, _, _ in chunk]
                req = RolloutRequest(task.kind, [p for p, _, _ in chunk], cfg.rollout.num_generations, step=0,
                                     prompt_indices=list(range(start, start + len(chunk))), targets=targets,
                                     images=torch.stack([im for _, im, _ in chunk]) if task.kind == "text" else None)
                batch, mix, sel = sample_rank_select(worker, rewards, req, margin, policy, step=0,
                                                     per_prompt=cfg.dpo.online_pairs_per_prompt if cfg.dpo else 1)
                summary["prompts"] += len(chunk)
                summary["dropped_unseparated"] += sel.dropped_unseparated
                summary["dropped_invalid"] += sel.dropped_invalid
                for k, (i, j) in enumerate(zip(sel.chosen, sel.rejected)):
                    meta = _record_meta(batch, mix, sel, k, model_id, cfg.seed)
                    if batch.kind == "image":
                        written.append(PairToWrite(
                            GENERATION, batch.images[i], batch.images[j], prompt=batch.prompts[i],
                            chosen_tokens=batch.image_tokens[i].tolist(),
                            rejected_tokens=batch.image_tokens[j].tolist(), meta=meta))
                    else:
                        written.append(PairToWrite(UNDERSTANDING, batch.answers[i], batch.answers[j],
                                                   prompt=batch.prompts[i], image=batch.images[i], meta=meta))
    finally:
        rewards.close()
    _drop_empty_answers(written, summary)
    path = write_preference_jsonl(written, out_dir)
    summary["pairs"] = len(written)
    summary["file"] = str(path)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _drop_empty_answers(pairs: list[PairToWrite], summary: dict):
    """An empty answer (EOS sampled first) cannot be a record (the format needs non-empty strings)."""
    keep = [p for p in pairs if p.kind == GENERATION or (p.chosen.strip() and p.rejected.strip())]
    summary["dropped_empty_answer"] = len(pairs) - len(keep)
    pairs[:] = keep


def _color(prompt: str) -> str:
    return named_color(prompt) or ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="uniloop pairs",
                                description="Sample N candidates per task prompt, rank them with the configured "
                                            "rewards/judges, keep the best and worst, and write a preference "
                                            "dataset (JSONL + PNG) that `algorithm: dpo` trains on.")
    p.add_argument("config", help="YAML recipe: model, rollout.num_generations, image_task/text_task, rewards")
    p.add_argument("--out", default=None, help="output directory (default: <output_dir>/pairs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set dpo.online_margin=0.1 (repeatable)")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts of each task")
    p.add_argument("--prompts-per-batch", type=int, default=16, help="prompts sampled together")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"uniloop pairs: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "pairs"
    try:
        summary = build_pairs(cfg, out, max_prompts=args.max_prompts, prompts_per_batch=args.prompts_per_batch)
    except ValueError as e:
        print(f"uniloop pairs: {e}", file=sys.stderr)
        return 2
    print(f"uniloop pairs: {summary['pairs']} pairs from {summary['prompts']} prompts "
          f"({summary['dropped_unseparated']} not separated by > {summary['margin']}, "
          f"{summary['dropped_invalid']} without two valid scores) -> {summary['file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
