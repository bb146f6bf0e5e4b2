"""logging.report_to: a quickstart-shaped run reaches W&B (offline), Trackio (local SQLite) and MLflow
(sqlite store) with the same scalars as metrics.jsonl and the sample grids; bad entries exit 2."""
import glob
import hashlib
import importlib.util
import json
import sqlite3
import struct
from pathlib import Path

import pytest

from uniloop.rl.algorithms import get_algorithm
from uniloop.rl.config import load_config
from uniloop.rl.runlog import read_metrics

REPO = Path(__file__).resolve().parents[1]


def short_run(tmp_path, tiny_janus_dir, tracker: str):
    """Two GRPO steps of the quickstart recipe (image task only), a grid every step."""
    out = tmp_path / f"run_{tracker}"
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"output_dir={out}", f"model.name_or_path={tiny_janus_dir}", "text_task=null",
        "rewards=[{name: color, weight: 1.0}]", "rollout.num_generations=2", "image_task.prompts_per_step=1",
        "logging.progress_bar=false", "grpo.max_steps=2", "logging.image_grid_every=1", "grpo.eval_steps=0",
        f"logging.report_to=[{tracker}]", "logging.run_name=quick"])
    get_algorithm("grpo")(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    return out, rows


def scalars(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte W&B header, then LevelDB-log blocks of 32 KiB whose
    chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) carry the serialized records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = Path(path).read_bytes(), 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (uniloop[tracking])")
def test_wandb_offline_run_has_the_metrics_and_grids(tmp_path, tiny_janus_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, rows = short_run(tmp_path, tiny_janus_dir, "wandb")
    assert not (out / "tensorboard").exists(), "report_to [wandb] replaces the default tensorboard"
    (run,) = glob.glob(str(out / "wandb" / "offline-run-*"))
    (log,) = glob.glob(f"{run}/run-*.wandb")
    history = {}
    for rec in wandb_records(log):
        if rec.WhichOneof("record_type") == "history":
            history[rec.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                             for i in rec.history.item}
    assert sorted(history) == [1, 2]
    for row in rows:
        got = history[row["step"]]
        for k, v in scalars(row).items():
            assert got[k] == v, (row["step"], k)  # the same JSON number, bit for bit
        # the grid of the step, the very PNG of the run directory
        assert got["samples/_type"] == "image-file"
        assert got["samples/sha256"] == sha256(out / "samples" / f"step_{row['step']:06d}.png")
        assert (Path(run) / "files" / got["samples/path"]).exists()


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None,
                    reason="trackio is not installed (uniloop[tracking]; trackio 0.43 needs pillow<13)")
def test_trackio_local_sqlite_has_the_metrics_and_grids(tmp_path, tiny_janus_dir, monkeypatch):
    monkeypatch.delenv("TRACKIO_SPACE_ID", raising=False)
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    out, rows = short_run(tmp_path, tiny_janus_dir, "trackio")
    db = tmp_path / "trackio" / "uniloop.db"
    assert db.exists()
    logged = {}  # trackio writes a row per log call: the scalars and the image of a step are two rows
    with sqlite3.connect(db) as con:
        for step, m in con.execute("SELECT step, metrics FROM metrics WHERE run_name=?", ("quick",)):
            logged.setdefault(step, {}).update(json.loads(m))
    for row in rows:
        got = logged[row["step"]]
        for k, v in scalars(row).items():
            assert got[k] == v, (row["step"], k)
        img = got["samples"]
        assert img.get("_type") == "trackio.image"
        assert sha256(tmp_path / "trackio" / "media" / img["file_path"]) == \
            sha256(out / "samples" / f"step_{row['step']:06d}.png")


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                    reason="mlflow is not installed (uniloop[tracking]; mlflow-skinny 3.17 needs importlib_metadata<10)")
def test_mlflow_sqlite_store_has_the_metrics_and_grids(tmp_path, tiny_janus_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    out, rows = short_run(tmp_path, tiny_janus_dir, "mlflow")
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out.absolute()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("uniloop").experiment_id])
    assert run.info.run_name == "quick"
    for key in ("reward/mean", "reward/color/mean", "loss"):
        hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert hist == {r["step"]: pytest.approx(r[key], rel=1e-12) for r in rows if r.get(key) is not None}
    images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    assert len([p for p in images if p.endswith(".png")]) >= 2
    assert list((out / "mlruns").rglob("*.png")), "the grids stay inside the run directory"
    assert not (tmp_path / "mlruns").exists()


def test_report_to_errors_exit_2_before_any_model_loads(tmp_path, capsys):
    from uniloop.rl.cli import main as cli

    assert cli(["train", str(REPO / "configs" / "quickstart.yaml"), "--set", f"output_dir={tmp_path / 'r'}",
                "--set", "logging.report_to=[tensorboard, neptune]"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "logging.report_to" in lines[0] and "neptune" in lines[0], lines
    assert not (tmp_path / ".tiny_models").exists(), "no model was built"

def test_report_to_forms_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
    from uniloop.rl import validate as v
    from uniloop.rl.config import ConfigError
    from uniloop.rl.trackers import normalize_report_to, tracker_names

    assert normalize_report_to("none") == [] and normalize_report_to("wandb") == ["wandb"]
    assert normalize_report_to("all") == tracker_names() == ["mlflow", "tensorboard", "trackio", "wandb"]
    assert normalize_report_to(["wandb", "wandb", "mlflow"]) == ["wandb", "mlflow"]
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"output_dir={tmp_path}", "logging.report_to=[trackio]"])
    monkeypatch.setattr(v, "missing_package", lambda name: "trackio" if name == "trackio" else None)
    with pytest.raises(ConfigError) as e:
        v.check_report_to(cfg, v.source_of(cfg))
    assert "logging.report_to" in str(e.value) and "uniloop[tracking]" in str(e.value) and "\n" not in str(e.value)
    cfg.logging.report_to = ["tensorboard"]
    cfg.logging.tensorboard = False  # the old switch still turns it off, and then needs no package
    monkeypatch.setattr(v, "missing_package", lambda name: name)
    v.check_report_to(cfg, v.source_of(cfg))
