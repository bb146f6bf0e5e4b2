"""Config loading: typed dataclasses, overrides, errors that name file, line and key."""
from pathlib import Path

import pytest

from uniloop.rl.config import Config, ConfigError, config_help, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_loads_and_roundtrips(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    assert isinstance(cfg, Config) and cfg.algorithm == "grpo"
    assert [r.name for r in cfg.rewards] == ["color", "self_understanding", "exact_match", "color_accuracy"]
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_unknown_key_names_key_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("seed: 1\ngrpo:\n  learning_rate: 1.0e-4\n  lerning_rate: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:4" in msg and "grpo.lerning_rate" in msg and "learning_rate" in msg


def test_wrong_type_and_bad_choice(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rollout:\n  num_generations: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: key 'rollout.num_generations' must be an integer"):
        load_config(p)
    p.write_text("grpo:\n  loss_type: sum\n")
    with pytest.raises(ConfigError, match=r"grpo.loss_type' must be one of"):
        load_config(p)
    p.write_text("rewards:\n  - name: color\n    weight: heavy\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: key 'rewards\[0\].weight' must be a number"):
        load_config(p)


def test_set_overrides_are_typed_and_checked(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      ["grpo.learning_rate=1e-5", "rollout.num_generations=4", "output_dir=/tmp/x",
                       "rewards[0].weight=0.5"])
    assert cfg.grpo.learning_rate == 1e-5 and cfg.rollout.num_generations == 4
    assert cfg.output_dir == "/tmp/x" and cfg.rewards[0].weight == 0.5
    with pytest.raises(ConfigError, match=r"--set grpo.nope"):
        load_config(REPO / "configs" / "quickstart.yaml", ["grpo.nope=1"])


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("seed: 1\ngrpo: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config(p)


def test_every_field_has_help():
    lines = config_help()
    assert len(lines) > 40
    assert all(line.rsplit("|", 1)[1].strip() for line in lines), [ln for ln in lines if not ln.rsplit("|", 1)[1].strip()]


def test_readme_config_reference_is_up_to_date():
    """The README's table is `uniloop config-help --markdown`: a new or changed key must show up there."""
    from pathlib import Path

    from uniloop.rl.config import config_reference_markdown
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert config_reference_markdown() in readme, "regenerate it: uniloop config-help --markdown"
