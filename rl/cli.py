"""`uniloop` command line: train, rollout, pairs, serve-judge, export, eval, config-help."""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from pathlib import Path

# Subcommands implemented elsewhere: name -> "module:function(argv)". New tools add a line here.
COMMANDS = {
    "rollout": "uniloop.rl.jobs:main",
    "pairs": "uniloop.rl.pairs:main",
    "serve-judge": "uniloop.rewards.server:main",
    "export": "uniloop.rl.export:main",
    "eval": "uniloop.rl.eval_cmd:main",
}

DEFAULT_CONFIG = "configs/quickstart.yaml"


def default_config_path() -> Path:
    """configs/quickstart.yaml in the current directory, else the copy installed with the package."""
    local = Path(DEFAULT_CONFIG)
    if local.exists():
        return local
    return Path(importlib.import_module("uniloop.configs").__file__).parent / "quickstart.yaml"


def train_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="uniloop train", description="Train a policy with the algorithm a recipe names.")
    p.add_argument("config", nargs="?", help=f"YAML recipe (default: {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set grpo.learning_rate=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in output_dir")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept settings that differ from the run's (both configs are kept)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = p.parse_args(argv)
    from .algorithms import get_algorithm  # the trainers import torch: not needed for `uniloop --help`
    from .config import ConfigError
    from .preference_data import PreferenceDataError
    from .rundir import RunAborted, RunDirError, RunInterrupted
    from .validate import load_run_config

    path = Path(args.config) if args.config else default_config_path()
    try:
        cfg = load_run_config(path, args.overrides)
        algo = get_algorithm(cfg.algorithm)
        print(f"uniloop train: {path} -> {cfg.output_dir} ({cfg.algorithm})")
        summary = algo(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    except (ConfigError, RunDirError, PreferenceDataError) as e:
        if args.debug:
            raise
        print(f"uniloop train: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        print(f"uniloop train: {e}; checkpoint and summary written. Resume with:\n  {resume_command(argv)}",
              file=sys.stderr)
        return 130 if e.signal_name == "SIGINT" else 143
    except RunAborted as e:
        print(f"uniloop train: the run stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"uniloop train: interrupted during a step; the last checkpoint is intact. Resume with:\n  "
              f"{resume_command(argv)}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; the traceback with --debug
        if args.debug:
            raise
        print(f"uniloop train: error: {type(e).__name__}: {e} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


def resume_command(argv) -> str:
    words = ["uniloop", "train", *(argv if argv is not None else sys.argv[2:])]
    return shlex.join(words + ([] if "--resume" in words else ["--resume"]))


def print_summary(summary: dict):
    if not summary:
        return
    print(f"done: {summary.get('steps', '?')} steps")
    for k, v in summary.items():
        if isinstance(v, dict) and "first_10pct" in v:
            print(f"  {k:40s} first 10%: {v['first_10pct']:.4f}   last 10%: {v['last_10pct']:.4f}")
        elif isinstance(v, dict) and "initial" in v:
            print(f"  {k:40s} step {v['initial_step']}: {v['initial']:.4f}   step {v['final_step']}: {v['final']:.4f}")
    print_prompt_table(summary.get("per_prompt"))


def print_prompt_table(table: dict | None, max_rows: int = 24, title: str | None = None):
    """Per prompt, each reward at the first -> the last evaluation (the worst final ones when there are many)."""
    if not table or not table.get("prompts"):
        return
    rows = table["prompts"]
    metrics = sorted({m for r in rows.values() for m in r}, key=lambda m: (m != "total", m))
    fmt = lambda x: "  -  " if x is None else str(x)[:7] if isinstance(x, str) else f"{x:.2f}"  # noqa: E731
    print(title or f"per prompt, evaluation at step {table['initial_step']} -> step {table['final_step']}:")
    print("  " + f"{'prompt':34s}" + "".join(f"{m[:16]:>18s}" for m in metrics))
    keys = list(rows)
    if len(keys) > max_rows:
        keys = sorted(keys, key=lambda k: rows[k].get("total", {}).get("final") or 0.0)[:max_rows]
        print(f"  ({len(rows) - max_rows} more in the summary; the {max_rows} lowest final totals:)")
    for k in keys:
        cells = "".join(f"{fmt(rows[k].get(m, {}).get('initial')) + ' -> ' + fmt(rows[k].get(m, {}).get('final')):>18s}"
                        for m in metrics)
        print(f"  {short_key(k, 34):34s}{cells}")


def short_key(key: str, width: int) -> str:
    """`key` cut to `width`, keeping a trailing "[target]" (text prompts share one question)."""
    if len(key) <= width:
        return key
    tail = key[key.rindex(" ["):] if key.endswith("]") and " [" in key else ""
    return key[:width - len(tail) - 1] + "~" + tail


def config_help_main(argv=None) -> int:
    """`uniloop config-help [--markdown]`: every key, its type, default and help."""
    from .config import config_help, config_reference_markdown
    if argv and "--markdown" in argv:
        print(config_reference_markdown())
        return 0
    for line in config_help():
        print(line)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ["train", *COMMANDS, "config-help"]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: uniloop {" + ",".join(names) + "} ...\n\n"
              "  train        train a policy (GRPO, DPO, ...) from a YAML recipe\n"
              "  rollout      sample + score a prompt file into shards and a gallery (resumable)\n"
              "  pairs        build a preference dataset by sample-rank-select\n"
              "  serve-judge  serve a transformers VLM as an OpenAI-compatible judge endpoint\n"
              "  export       a run or checkpoint -> merged weights + processor (or the adapter), optional hub push\n"
              "  eval         a checkpoint on a prompt set: fixed seeds, every reward, table, gallery, summary\n"
              "  config-help  list every config key with its type, default and help")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # in a log file, per-file "Loading weights" bars are noise
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_main(rest)
    if cmd == "config-help":
        return config_help_main(rest)
    if cmd in COMMANDS:
        mod, fn = COMMANDS[cmd].split(":")
        return int(getattr(importlib.import_module(mod), fn)(rest) or 0)
    print(f"uniloop: unknown command {cmd!r}; choose from {names}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
