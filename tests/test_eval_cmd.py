"""`uniloop eval`: fixed seeds (the same samples twice), every reward, the per-prompt table, gallery and
summary consistent with the samples, a checkpoint that differs from the base, `--compare A B`, exit 2."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_adapter
from PIL import Image

from uniloop.policies.registry import build_policy
from uniloop.policies.tiny import solid_color_images
from uniloop.rl.checkpoint import save_checkpoint
from uniloop.rl.cli import main as cli
from uniloop.rl.config import load_config, save_config
from uniloop.rl.trainer import policy_spec

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "quickstart.yaml")


@pytest.fixture(scope="module")
def prompt_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    im = (solid_color_images(["green"], 32)[0].numpy() * 255).astype(np.uint8)
    Image.fromarray(im).save(d / "green.png")
    lines = [{"prompt": "a red image"}, {"prompt": "a blue image"},
             {"image": "green.png", "question": "What color is this image? Answer in one word.", "target": "green"}]
    (d / "set.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d / "set.jsonl"


def overrides(tiny_janus_dir, prompts, out, *extra):
    return ["--set", f"model.name_or_path={tiny_janus_dir}", "--set", f"eval.prompts={prompts}",
            "--set", "eval.samples_per_prompt=2", "--set", f"eval.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory, tiny_janus_dir, prompt_set):
    """The base model twice (A, A2) and a trained-looking checkpoint (C), on the same prompt set."""
    tmp = tmp_path_factory.mktemp("eval")
    run = tmp / "run"
    cfg = load_config(RECIPE, [f"output_dir={run}", f"model.name_or_path={tiny_janus_dir}"])
    policy = build_policy(policy_spec(cfg))
    perturb_adapter(policy, scale=0.3, seed=3)
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_checkpoint(run, 5, policy, {"version": 5})
    outs = {}
    for name, extra in [("A", []), ("A2", []), ("C", ["--checkpoint", str(run)])]:
        outs[name] = tmp / name
        assert cli(["eval", RECIPE, *overrides(tiny_janus_dir, prompt_set, outs[name], *extra)]) == 0
    return outs


def load(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_same_seeds_same_samples_and_the_checkpoint_differs(evaluations):
    a, a2, c = (load(evaluations[k]) for k in ("A", "A2", "C"))
    assert a["checkpoint"] is None and c["checkpoint"].endswith("step_000005/adapter")
    assert a["samples"] == a2["samples"] and a["metrics"] == a2["metrics"]
    for s in a["samples"]:
        if "image" in s:
            assert (evaluations["A"] / s["image"]).read_bytes() == (evaluations["A2"] / s["image"]).read_bytes()
    imgs = [s for s in a["samples"] if "image" in s]
    assert len(imgs) == 4 and len([s for s in a["samples"] if "answer" in s]) == 2
    differ = [s["image"] for s in imgs if (evaluations["A"] / s["image"]).read_bytes() !=
              (evaluations["C"] / s["image"]).read_bytes()]
    assert differ, "the checkpoint's adapter must change the samples"


def test_table_summary_and_gallery_agree_with_the_samples(evaluations):
    out = evaluations["C"]
    s = load(out)
    assert s["rewards"] == ["color", "self_understanding", "exact_match", "color_accuracy"]
    assert s["settings"]["samples_per_prompt"] == 2 and s["settings"]["seed_step"] == 10 ** 9
    for name, kind in [("color", "image"), ("self_understanding", "image"), ("exact_match", "text")]:
        vals = [x[name] for x in s["samples"] if x["kind"] == kind and x[name] is not None]
        assert s["metrics"][f"eval/reward/{name}/mean"] == pytest.approx(np.mean(vals), abs=1e-6)
    for row in s["prompts"]:
        mine = [x for x in s["samples"] if x["kind"] == row["kind"] and x["prompt"] == row["prompt"]]
        assert row["samples"] == len(mine) == 2
        assert row["total"] == pytest.approx(np.mean([x["total"] for x in mine]), abs=1e-6)
    assert json.loads((out / "prompts.json").read_text())["prompts"] == s["prompts"]
    page = (out / "gallery.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(srcs) == sorted(x["image"] for x in s["samples"] if "image" in x)
    for src in srcs:
        arr = np.asarray(Image.open(out / src))
        assert arr.shape[2] == 3 and arr.std() > 0
    for row in s["prompts"]:
        assert row["prompt"] in page
    assert (out / "grid.png").exists()


def test_compare_side_by_side(evaluations, tmp_path, capsys):
    html_out = tmp_path / "cmp.html"
    assert cli(["eval", "--compare", str(evaluations["A"]), str(evaluations["C"]), "--out", str(html_out)]) == 0
    text = capsys.readouterr().out
    a, c = load(evaluations["A"]), load(evaluations["C"])
    key = "eval/reward/color/mean"
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(key))
    assert line.split()[1:] == [f"{a['metrics'][key]:.3f}", f"{c['metrics'][key]:.3f}",
                                f"{c['metrics'][key] - a['metrics'][key]:.3f}"]
    assert "per prompt, A -> B:" in text and "image: a red image" in text
    page = html_out.read_text()
    for name, s in (("A", a), ("C", c)):
        for x in s["samples"]:
            if "image" in x:
                assert f"{name}/{x['image']}" in page
                assert (tmp_path / re.search(rf'src="([^"]*{name}/{x["image"]})"', page).group(1)).resolve().exists()


def test_eval_errors_exit_2_before_any_model_loads(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert cli(["eval", RECIPE, "--set", f"eval.prompts={missing}", "--set", f"output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.prompts" in err[0] and str(missing) in err[0]
    assert cli(["eval", RECIPE, "--set", f"output_dir={tmp_path / 'r'}"]) == 2
    assert "eval.prompts" in capsys.readouterr().err
    assert cli(["eval", "--compare", str(tmp_path), str(tmp_path)]) == 2
    assert "--compare" in capsys.readouterr().err
    assert not (tmp_path / ".tiny_models").exists(), "no model was built"
