"""The layers import downward only (rl -> rollouts -> rewards -> policies), with no import circle,
and registries decide what a config may name (a registered algorithm is accepted like a built-in)."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["rl", "rollouts", "rewards", "policies"]  # each may import only the ones after it


def module_imports() -> dict[str, set[str]]:
    """uniloop module -> the uniloop modules it imports (function-level imports included)."""
    mods = {}
    for pkg in LAYERS:
        for f in (REPO / pkg).glob("*.py"):
            name = f"uniloop.{pkg}" if f.name == "__init__.py" else f"uniloop.{pkg}.{f.stem}"
            mods[name] = f
    graph = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                out |= {target} | {f"{target}.{a.name}" for a in node.names}
        graph[name] = {m for m in out if m in mods and m != name}
    return graph


def test_layers_import_downward_only():
    graph = module_imports()
    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts
                    if LAYERS.index(t.split(".")[1]) < LAYERS.index(m.split(".")[1]))
    assert not upward, upward
    # in particular nothing below rl/ reads the run config or the trainers
    assert not [m for m, ts in graph.items() if m.split(".")[1] != "rl" and any(".rl" in t for t in ts)]


def test_no_import_circle():
    graph = module_imports()
    state, stack, cycles = {}, [], []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in graph[v]:
            if state.get(w) == "open":
                cycles.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = "done"

    for v in graph:
        if v not in state:
            visit(v)
    assert not cycles, cycles[:3]


def test_no_source_file_over_500_lines():
    big = {str(f.relative_to(REPO)): n for pkg in LAYERS for f in (REPO / pkg).glob("*.py")
           if (n := len(f.read_text().splitlines())) > 500}
    assert not big, big


def test_a_registered_algorithm_is_accepted_and_runs(tmp_path, tiny_janus_dir):
    """The README's 'adding an algorithm' recipe: subclass a trainer, register it, name it in a config."""
    from uniloop.rl.cli import main
    from uniloop.rl.grpo import GRPOTrainer
    from uniloop.rl.registry import register_algorithm
    from uniloop.rl.validate import load_run_config

    @register_algorithm("test_grpo_best_half")
    class BestHalf(GRPOTrainer):
        """GRPO that keeps only the better half of each group (a toy rejection-sampling variant)."""

        def set_advantages(self, sb):
            super().set_advantages(sb)
            sb.advantages = sb.advantages.clamp(min=0.0)

    out = tmp_path / "run"
    sets = [f"model.name_or_path={tiny_janus_dir}", f"output_dir={out}", "algorithm=test_grpo_best_half",
            "grpo.max_steps=2", "rollout.num_generations=4", "logging.progress_bar=false",
            "logging.tensorboard=false", "logging.image_grid_every=0"]
    cfg = load_run_config(REPO / "configs" / "quickstart.yaml", sets)
    assert cfg.algorithm == "test_grpo_best_half"
    assert main(["train", str(REPO / "configs" / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)]]) == 0
    assert (out / "checkpoints" / "step_000002" / "COMPLETE").exists()


def test_unknown_names_are_config_errors_with_file_and_line(tmp_path):
    from uniloop.rl.config import ConfigError
    from uniloop.rl.validate import load_run_config

    p = tmp_path / "bad.yaml"
    p.write_text("seed: 0\nalgorithm: not_an_algorithm\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: key 'algorithm' must be a registered algorithm"):
        load_run_config(p)
    p.write_text("rewards:\n  - name: color\n  - name: judge\n    type: nope\n")
    with pytest.raises(ConfigError, match=rf"{p}:4: key 'rewards\[1\].type' names no registered reward type"):
        load_run_config(p)
    p.write_text("rewards:\n  - name: color\n    args: {colour: red}\n")
    with pytest.raises(ConfigError, match=rf"{p}:3: key 'rewards\[0\].args' does not fit reward type 'color'"):
        load_run_config(p)


def test_the_readmes_example_algorithm_runs(tmp_path, tiny_janus_dir):
    """The 'Adding an algorithm' code block of the README, executed as written, trains for two steps."""
    import re

    from uniloop.rl.algorithms import get_algorithm
    from uniloop.rl.config import load_config

    readme = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(from uniloop.rl.registry import register_algorithm\n.*?)```", readme, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name_or_path={tiny_janus_dir}", f"output_dir={tmp_path / 'run'}", "algorithm=best_of_n_sft",
        "grpo.max_steps=2", "rollout.num_generations=4", "logging.progress_bar=false", "logging.tensorboard=false"])
    summary = get_algorithm("best_of_n_sft")(cfg)
    assert summary["steps"] == 2 and "reward/color/mean" in summary
