"""`uniloop eval CONFIG --set eval.prompts=FILE [--checkpoint RUN_OR_CHECKPOINT]`: one checkpoint on a prompt set.

Every prompt is sampled `eval.samples_per_prompt` times with the seeds training evaluations use
(rl/evaluate.py: the same (seed, prompt, sample) noise for every checkpoint) and the recipe's settings
(or `eval.num_steps` / `eval.cfg_scale`), scored by every configured reward. In `eval.output_dir`:

    summary.json     metrics (eval/reward/<name>/mean), settings, the per-prompt table, every sample
    prompts.json     the per-prompt table (rl/evaluate.py prompt_table: the format of eval_samples/)
    gallery.html     a row per prompt: its mean rewards and every sample with its scores (images/ beside it)
    grid.png         a row of samples per prompt

`uniloop eval --compare A B [--out compare.html]` puts two evaluations side by side (A, B: output
directories or their summary.json): every metric A -> B, every prompt's rewards A -> B, and a gallery
with A's and B's samples of each prompt one above the other.
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import sys
from pathlib import Path

import torch

from .config import ConfigError, RolloutJobConfig, load_config
from .evaluate import EVAL_SEED_STEP, evaluate_samples, prompt_table
from .loop import prompt_changes
from .validate import validate

USAGE_ERRORS = (ConfigError, FileNotFoundError, ValueError)


def load_eval_items(cfg) -> list:
    """The prompt set (the formats of `job.prompts`); errors name eval.prompts and the file."""
    from ..rollouts.job import load_items

    e = cfg.eval
    if not e.prompts:
        raise ConfigError("key 'eval.prompts' is empty: --set eval.prompts=FILE (text, JSONL or a datasets directory)")
    try:
        return load_items(RolloutJobConfig(prompts=e.prompts, limit=e.limit))
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(str(err).replace("job.prompts", "key 'eval.prompts'", 1)) from None


def eval_requests(items, n: int, image_size: int):
    """The prompt set as fixed-seed requests: one for the image prompts, one for the questions."""
    from ..rewards.builtin import named_color
    from ..rollouts.job import _load_question_image
    from ..rollouts.worker import RolloutRequest

    reqs = []
    images = [it for it in items if it.kind == "image"]
    if images:  # the color reward reads its color from the target, as in training evaluations
        reqs.append(RolloutRequest("image", [it.prompt for it in images], n, EVAL_SEED_STEP,
                                   targets=[it.target or named_color(it.prompt) or "" for it in images]))
    questions = [it for it in items if it.kind == "text"]
    if questions:
        reqs.append(RolloutRequest("text", [it.prompt for it in questions], n, EVAL_SEED_STEP,
                                   targets=[it.target for it in questions],
                                   images=torch.stack([_load_question_image(it, image_size) for it in questions])))
    return reqs


def run_eval(cfg) -> dict:
    """Evaluate `cfg.eval.checkpoint` (or the base model) on `cfg.eval.prompts`; returns the summary."""
    from ..policies.registry import build_policy
    from ..rewards.base import build_mixture
    from ..rollouts.worker import RolloutWorker
    from .jobs import adapter_spec, policy_section, resolve_adapter
    from .trainer import sampling_settings, seed_everything

    e = cfg.eval
    items = load_eval_items(cfg)  # a bad prompt file stops here, before any model loads
    if not cfg.rewards:
        raise ConfigError("key 'rewards' is empty: an evaluation scores with the recipe's rewards")
    out = Path(e.output_dir or Path(cfg.output_dir) / "eval")
    adapter = resolve_adapter(e.checkpoint, key="eval.checkpoint")
    section = policy_section(cfg)
    sampling = sampling_settings(cfg, section)
    if e.cfg_scale is not None:
        sampling.image["cfg_scale"] = e.cfg_scale
    if e.num_steps and section == "flow":
        sampling.image["num_steps"] = e.num_steps
    seed_everything(cfg.seed)
    policy = build_policy(adapter_spec(cfg, adapter, section))
    policy.model.eval()
    requests = eval_requests(items, e.samples_per_prompt, getattr(policy, "image_size", 0))
    rewards = build_mixture(cfg.rewards, cfg.reward_combine)
    out.mkdir(parents=True, exist_ok=True)
    scored: list = []
    try:
        worker = RolloutWorker(policy, sampling, cfg.seed, shares_learner_policy=True)
        metrics = evaluate_samples(worker, requests, rewards, policy, 0, out / "grid.png", out / "prompts.json",
                                   keep=scored)
    finally:
        rewards.close()
    summary = {"checkpoint": adapter, "model": adapter_spec(cfg, None, section).name_or_path,
               "prompts_file": str(e.prompts), "metrics": metrics,
               "settings": {"seed": cfg.seed, "seed_step": EVAL_SEED_STEP, "samples_per_prompt": e.samples_per_prompt,
                            **{k: v for k, v in dataclasses.asdict(sampling).items() if v}},
               "rewards": [rc.name for rc in cfg.rewards],
               "prompts": [row for b, m in scored for row in prompt_table(b, m)],
               "samples": [s for b, m in scored for s in sample_rows(b, m, out)]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    write_gallery(out, summary)
    return summary


def sample_rows(batch, mix, out: Path) -> list[dict]:
    """Every sample of a scored batch: its prompt, seed index, rewards, and its PNG (images) or answer (text)."""
    from PIL import Image

    rows = []
    count: dict[int, int] = {}
    for i in range(len(batch.prompts)):
        g = int(batch.group_ids[i])
        j = count[g] = count.get(g, -1) + 1
        row = {"kind": batch.kind, "prompt": batch.prompts[i], "group": g, "sample": j,
               "total": mix.total[i].item() if mix.valid[i] else None,
               **{n: (o.scores[i].item() if o.valid[i] else None) for n, o in mix.components.items()}}
        if batch.kind == "image":
            rel = f"images/{g:04d}_{j:02d}.png"
            (out / "images").mkdir(exist_ok=True)
            arr = (batch.images[i].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            Image.fromarray(arr).save(out / rel)
            row["image"] = rel
        else:
            row["answer"] = batch.answers[i]
        rows.append(row)
    return rows


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _sample_cells(samples: list[dict], rewards: list[str], base: Path, root: Path) -> str:
    cells = []
    for s in samples:
        scores = " ".join(f"{n}={_fmt(s.get(n))}" for n in rewards)
        body = (f'<img src="{html.escape(os.path.relpath(root / s["image"], base))}" width="128">' if "image" in s
                else f"<pre>{html.escape(s.get('answer', ''))}</pre>")
        cells.append(f"<td>{body}<br><small>total {_fmt(s['total'])}<br>{html.escape(scores)}</small></td>")
    return "".join(cells)


def _by_prompt(summary: dict) -> dict:
    out: dict = {}
    for s in summary["samples"]:
        out.setdefault((s["kind"], s["prompt"]), []).append(s)
    return out


def write_gallery(out: Path, summary: dict) -> Path:
    rewards = summary["rewards"]
    samples = _by_prompt(summary)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["prompt", "total", *rewards])
    rows = []
    for r in summary["prompts"]:
        means = "".join(f"<td>{_fmt(r.get(n))}</td>" for n in ["total", *rewards])
        rows.append(f"<tr><td>{html.escape(r['key'])}</td>{means}"
                    f"{_sample_cells(samples.get((r['kind'], r['prompt']), []), rewards, out, out)}</tr>")
    metrics = "".join(f"<li>{html.escape(k)}: {_fmt(v)}</li>" for k, v in sorted(summary["metrics"].items()))
    page = (f"<html><head><meta charset='utf-8'><title>uniloop eval</title></head><body>"
            f"<h2>{html.escape(str(summary['checkpoint'] or summary['model']))} on "
            f"{html.escape(summary['prompts_file'])}</h2><ul>{metrics}</ul>"
            f"<p>settings: {html.escape(json.dumps(summary['settings']))}</p>"
            f"<table border='1' cellspacing='0'><tr>{head}<th>samples</th></tr>{''.join(rows)}</table></body></html>")
    (out / "gallery.html").write_text(page)
    return out / "gallery.html"


# ----------------------------------------------------------------------------- comparing two evaluations
def read_summary(path: str | Path) -> tuple[dict, Path]:
    p = Path(path)
    f = p / "summary.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"--compare: no evaluation summary at {path} (an `uniloop eval` output directory "
                                f"or its summary.json)")
    summary = json.loads(f.read_text())
    if "samples" not in summary or "prompts" not in summary:
        raise ValueError(f"--compare: {f} is not an `uniloop eval` summary")
    return summary, f.parent


def compare(a: str | Path, b: str | Path) -> dict:
    """Metrics and per-prompt rewards of two evaluations: {"metrics": {k: {A, B, delta}}, "per_prompt": ...}."""
    (sa, _), (sb, _) = read_summary(a), read_summary(b)
    keys = sorted(set(sa["metrics"]) | set(sb["metrics"]))
    metrics = {k: {"A": sa["metrics"].get(k), "B": sb["metrics"].get(k),
                   "delta": None if sa["metrics"].get(k) is None or sb["metrics"].get(k) is None
                   else sb["metrics"][k] - sa["metrics"][k]} for k in keys}
    return {"A": str(a), "B": str(b), "metrics": metrics,
            "per_prompt": prompt_changes({"step": "A", "prompts": sa["prompts"]}, {"step": "B", "prompts": sb["prompts"]})}


def write_compare_html(a, b, path: Path) -> Path:
    (sa, root_a), (sb, root_b) = read_summary(a), read_summary(b)
    rewards = list(dict.fromkeys(sa["rewards"] + sb["rewards"]))
    by_a, by_b = _by_prompt(sa), _by_prompt(sb)
    base = path.parent.absolute()
    rows = []
    for key in dict.fromkeys(list(by_a) + list(by_b)):
        label = html.escape(f"{key[0]}: {key[1]}")
        rows.append(f"<tr><td rowspan='2'>{label}</td><td>A</td>"
                    f"{_sample_cells(by_a.get(key, []), rewards, base, root_a.absolute())}</tr>"
                    f"<tr><td>B</td>{_sample_cells(by_b.get(key, []), rewards, base, root_b.absolute())}</tr>")
    path.write_text(f"<html><head><meta charset='utf-8'><title>uniloop eval: A vs B</title></head><body>"
                    f"<h2>A = {html.escape(str(a))}<br>B = {html.escape(str(b))}</h2>"
                    f"<table border='1' cellspacing='0'>{''.join(rows)}</table></body></html>")
    return path


def print_compare(result: dict):
    from .cli import print_prompt_table
    print(f"A = {result['A']}\nB = {result['B']}")
    print(f"  {'metric':44s}{'A':>10s}{'B':>10s}{'B - A':>10s}")
    for k, v in result["metrics"].items():
        print(f"  {k:44s}{_fmt(v['A']):>10s}{_fmt(v['B']):>10s}{_fmt(v['delta']):>10s}")
    print_prompt_table(result["per_prompt"], title="per prompt, A -> B:")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="uniloop eval", description=(
        "Evaluate a checkpoint on a prompt set with fixed seeds and settings and every configured reward: "
        "a per-prompt table, an HTML gallery and a JSON summary. --compare A B puts two evaluations side by side."))
    p.add_argument("config", nargs="?", help="YAML recipe (its model, rewards and sampling settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set eval.prompts=prompts.txt (repeatable)")
    p.add_argument("--checkpoint", help="adapter, checkpoint or run directory (= --set eval.checkpoint=...)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two `uniloop eval` output directories")
    p.add_argument("--out", help="with --compare: write a side-by-side gallery (HTML) here")
    args = p.parse_args(argv)
    try:
        if args.compare:
            result = compare(*args.compare)
            print_compare(result)
            if args.out:
                print(f"side by side: {write_compare_html(*args.compare, Path(args.out))}")
            return 0
        if not args.config:
            raise ConfigError("give a recipe (uniloop eval CONFIG --set eval.prompts=FILE) or --compare A B")
        overrides = args.overrides + ([f"eval.checkpoint={args.checkpoint}"] if args.checkpoint else [])
        cfg = load_config(args.config, overrides)
        load_eval_items(cfg)  # a bad prompt set is named first: validation may build a tiny model
        validate(cfg)  # every bad key is one line before any model loads
        summary = run_eval(cfg)
    except USAGE_ERRORS as e:
        print(f"uniloop eval: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.eval.output_dir or Path(cfg.output_dir) / "eval")
    print(f"uniloop eval: {len(summary['samples'])} samples of {len(summary['prompts'])} prompts -> {out}")
    for k, v in sorted(summary["metrics"].items()):
        print(f"  {k:44s}{_fmt(v):>10s}")
    names = ["total", *summary["rewards"]]
    print("  " + f"{'prompt':40s}" + "".join(f"{n[:14]:>16s}" for n in names))
    for r in summary["prompts"]:
        print(f"  {r['key'][:40]:40s}" + "".join(f"{_fmt(r.get(n)):>16s}" for n in names))
    print(f"  gallery: {out / 'gallery.html'}")
    return 0
