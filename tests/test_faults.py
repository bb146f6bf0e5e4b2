"""Runs that never lose or mix data, and errors a user can act on: each case through the command line,
as a user meets it. Asserted: the invariant (nothing lost, nothing mixed, exit code, one line), not the
wording."""
import errno
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from uniloop.rewards.base import Reward, RewardOutput, register_reward
from uniloop.rl.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def small(model_dir, out, *extra) -> list[str]:
    """A few-second GRPO run on the tiny model, every value the tests depend on set here."""
    sets = [f"model.name_or_path={model_dir}", f"output_dir={out}", "rollout.num_generations=4",
            "image_task.prompts_per_step=2", "text_task.prompts_per_step=1", "rollout.max_new_tokens=1",
            "grpo.max_steps=3", "logging.tensorboard=false", "logging.image_grid_every=0", "logging.save_every=1",
            "grpo.per_device_train_batch_size=64", "grpo.eval_steps=0", "grpo.beta=0.0",
            "rewards=[{name: color}, {name: exact_match}]", *extra]
    return [a for s in sets for a in ("--set", s)]


GATE = '''
import os, time

def gate(prompts, gate, **kw):
    """Score 0; from the second call on, wait until the file `gate` exists (the test opens it)."""
    seen = gate + ".seen"
    calls = int(open(seen).read()) if os.path.exists(seen) else 0
    open(seen, "w").write(str(calls + 1))
    t0 = time.time()
    while calls >= 1 and not os.path.exists(gate) and time.time() - t0 < 300:
        time.sleep(0.05)
    return [0.0] * len(prompts)
'''


def gated_run(model_dir, out, tmp_path, *extra):
    """A `uniloop train` subprocess whose second step waits until `open_gate()`; returns (proc, open_gate)."""
    (tmp_path / "gate.py").write_text(GATE)
    gate = tmp_path / "gate"
    reward = (f"{{name: gate, type: python, weight: 0.0, args: {{function: '{tmp_path / 'gate.py'}:gate', "
              f"modalities: [image], kwargs: {{gate: '{gate}'}}}}}}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "uniloop.rl.cli", "train", QUICKSTART,
                             *small(model_dir, out, f"rewards=[{{name: color}}, {reward}]", "text_task=null", *extra)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (Path(str(gate) + ".seen").exists() and Path(str(gate) + ".seen").read_text() == "2"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.1)
    return proc, lambda: gate.write_text("open")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    return err


# ----------------------------------------------------------------------------- resume
def test_resume_needs_a_complete_checkpoint_and_touches_nothing_otherwise(tiny_janus_dir, tmp_path, capsys):
    run = tmp_path / "killed_early"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (1, 2, 3)))
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", QUICKSTART, *small(tiny_janus_dir, run), "--resume"]) == 2
    assert "no complete checkpoint" in one_line_error(capsys)
    assert (run / "metrics.jsonl").read_text() == before and not (run / "checkpoints").exists()
    missing = tmp_path / "never_ran"
    assert main(["train", QUICKSTART, *small(tiny_janus_dir, missing), "--resume"]) == 2
    one_line_error(capsys)
    assert not missing.exists()


def test_resume_refuses_changed_settings_unless_allowed_and_keeps_every_config(tiny_janus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", QUICKSTART, *small(tiny_janus_dir, run, "grpo.max_steps=2")]) == 0
    saved = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", QUICKSTART, *small(tiny_janus_dir, run, "grpo.max_steps=3", "grpo.learning_rate=1e-3"),
                 "--resume"]) == 2
    assert "grpo.learning_rate" in one_line_error(capsys)
    assert (run / "config.yaml").read_text() == saved and [r["step"] for r in rows(run)] == [1, 2]
    # a longer run is not a change of settings; a new learning rate is, when asked for explicitly
    assert main(["train", QUICKSTART, *small(tiny_janus_dir, run, "grpo.max_steps=3", "grpo.learning_rate=1e-3"),
                 "--resume", "--allow-config-change"]) == 0
    assert [r["step"] for r in rows(run)] == [1, 2, 3]
    assert sorted(p.name for p in (run / "configs").iterdir()) == ["config_step_000000.yaml", "config_step_000002.yaml"]
    assert "0.001" in (run / "config.yaml").read_text()


def test_keep_checkpoints_must_keep_one_and_the_newest_is_never_deleted(tiny_janus_dir, tmp_path, capsys):
    from uniloop.rl.checkpoint import latest_checkpoint, save_checkpoint

    out = tmp_path / "run"
    for bad in ("0", "-1"):
        assert main(["train", QUICKSTART, *small(tiny_janus_dir, out, f"logging.keep_checkpoints={bad}")]) == 2
        assert "keep_checkpoints" in one_line_error(capsys)
    assert not out.exists()
    for step in (1, 2):
        save_checkpoint(tmp_path / "direct", step, state={"x": step}, keep=0)  # a caller's 0 keeps the newest
    assert latest_checkpoint(tmp_path / "direct").name == "step_000002"


# ----------------------------------------------------------------------------- one directory, one run
def test_a_second_run_into_a_live_runs_directory_is_refused(tiny_janus_dir, tmp_path, capsys):
    run = tmp_path / "live"
    live, open_gate = gated_run(tiny_janus_dir, run, tmp_path)  # held inside its second step
    try:
        assert main(["train", QUICKSTART, *small(tiny_janus_dir, run)]) == 2
        assert "in use" in one_line_error(capsys)
    finally:
        open_gate()
        assert live.wait(timeout=600) == 0, live.stderr.read()
    assert [r["step"] for r in rows(run)] == [1, 2, 3] and not (tmp_path / "live.1").exists()


# ----------------------------------------------------------------------------- what a user gets wrong
USER_ERRORS = {
    "negative learning rate": ["grpo.learning_rate=-1e-4"],
    "no steps": ["grpo.max_steps=0"],
    "rank 0": ["lora.r=0"],
    "one sample per group": ["rollout.num_generations=1"],
    "unknown reward type": ["rewards=[{name: color, type: colour}]"],
    "bad reward args": ["rewards=[{name: color, args: {palette: x}}]"],
    "reward index out of range": ["rewards[9].weight=0.5"],
    "missing local model": ["model.name_or_path=/no/such/janus"],
    "hub id offline, not cached": ["model.name_or_path=someone/not-cached-model"],
    "cuda without a GPU": ["model.device=cuda"],
    "unset API key variable": ["rewards=[{name: judge, type: judge, args: {backend: remote, "
                               "base_url: 'http://127.0.0.1:9/v1', api_key_env: UNILOOP_UNSET_KEY}}]"],
    "output_dir under a file": ["output_dir=__FILE__/run"],
    "a 20k-word prompt": ["image_task.prompts=[" + "red " * 20000 + "]"],
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_are_one_line_and_exit_2_before_any_model_loads(case, tiny_janus_dir, tmp_path, capsys):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    os.environ.pop("UNILOOP_UNSET_KEY", None)
    afile = tmp_path / "a_file"
    afile.write_text("x")
    sets = [s.replace("__FILE__", str(afile)) for s in USER_ERRORS[case]]
    out = tmp_path / "run"
    argv = ["train", QUICKSTART, *small(tiny_janus_dir, out), *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 2
    one_line_error(capsys)
    assert not (out / "metrics.jsonl").exists()


def test_bad_config_files_are_one_line_errors(tmp_path, capsys):
    d = tmp_path / "a_dir"
    d.mkdir()
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    dup = tmp_path / "dup.yaml"
    dup.write_text("seed: 0\ngrpo:\n  learning_rate: 1.0e-4\n  beta: 0.0\n  learning_rate: 3.0e-3\n")
    for path, line in ((d, None), (empty, None), (dup, ":5:")):
        assert main(["train", str(path)]) == 2
        err = one_line_error(capsys)
        assert line is None or line in err


def test_bad_preference_data_is_reported_before_the_model_loads(tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a red image", "chosen": "red.png"}\n')  # no rejected image
    assert main(["train", str(REPO / "configs" / "dpo_quickstart.yaml"), "--set", f"output_dir={tmp_path / 'run'}",
                 "--set", f"preference_data.train=[{bad}]", "--set", "preference_data.synthetic=null"]) == 2
    assert "pairs.jsonl:1" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_full_disk_stops_the_run_and_names_the_intact_checkpoint(tiny_janus_dir, tmp_path, capsys, monkeypatch):
    import uniloop.rl.checkpoint as ckpt

    real_save, calls = torch.save, []

    def save_until_full(obj, f, *a, **kw):  # the second checkpoint's state file hits a full disk
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", save_until_full)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", QUICKSTART, *small(tiny_janus_dir, run, "grpo.max_steps=2")]) == 2
    assert "step_000001" in capsys.readouterr().err.strip().splitlines()[-1]
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert ckpt.latest_checkpoint(run).name == "step_000001" and [r["step"] for r in rows(run)] == [1, 2]
    assert main(["train", QUICKSTART, *small(tiny_janus_dir, run, "grpo.max_steps=2"), "--resume"]) == 0
    assert [r["step"] for r in rows(run)] == [1, 2]  # step 2 again, once


# ----------------------------------------------------------------------------- stopping
@register_reward("test_judge_down")
class JudgeDown(Reward):
    """A judge whose every verdict fails (as when its server answers HTTP 500)."""

    modalities = ("image",)

    def score(self, batch, context):
        n = len(batch)
        return RewardOutput(torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.bool),
                            {"judge_error": ["HTTP 500 after 3 retries"] * n})


def test_an_invalid_reward_abort_names_the_reward_and_cause_and_logs_the_step(tiny_janus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", QUICKSTART, *small(tiny_janus_dir, run, "text_task=null", "grpo.invalid_patience=1",
                                            "rewards=[{name: color}, {name: judge, type: test_judge_down}]")]) == 1
    err = capsys.readouterr().err
    assert "judge" in err and "HTTP 500 after 3 retries x8" in err and "Traceback" not in err
    assert [r["step"] for r in rows(run)] == [1] and rows(run)[0]["reward/judge/invalid"] == 8
    assert (run / "summary.json").exists()


def test_sigint_finishes_the_step_saves_and_says_how_to_resume(tiny_janus_dir, tmp_path):
    run = tmp_path / "run"
    proc, open_gate = gated_run(tiny_janus_dir, run, tmp_path, "grpo.max_steps=200", "logging.save_every=50")
    proc.send_signal(signal.SIGINT)  # in the middle of step 2
    time.sleep(0.5)
    open_gate()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert rows(run)[-1]["step"] == 2 and (run / "checkpoints" / "step_000002" / "COMPLETE").exists()
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


# ----------------------------------------------------------------------------- jobs and pairs
def job_args(model_dir, prompts, out, *extra) -> list[str]:
    sets = [f"model.name_or_path={model_dir}", f"output_dir={out}", f"job.prompts={prompts}",
            "job.samples_per_prompt=2", "job.prompts_per_shard=1", "rollout.max_new_tokens=1",
            "rewards=[{name: color}]", *extra]
    return [a for s in sets for a in ("--set", s)]


def test_rollout_jobs_refuse_changed_rewards_and_keep_their_summary(tiny_janus_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red image\na blue image\n")
    out = tmp_path / "job"
    recipe = str(REPO / "configs" / "rollout_job.yaml")
    assert main(["rollout", recipe, *job_args(tiny_janus_dir, prompts, out)]) == 0
    summary = (out / "summary.json").read_text()
    capsys.readouterr()
    for change in ("rewards=[{name: color, weight: 2.0}]", "rewards=[{name: colour, type: color}]"):
        assert main(["rollout", recipe, *job_args(tiny_janus_dir, prompts, out, change)]) == 2
        assert "rewards" in one_line_error(capsys)
    assert (out / "summary.json").read_text() == summary


def test_pairs_never_overwrites_a_preference_set(tiny_janus_dir, tmp_path, capsys):
    out = tmp_path / "pairs"
    args = ["pairs", QUICKSTART, "--out", str(out), "--max-prompts", "1", "--set",
            f"model.name_or_path={tiny_janus_dir}", "--set", "rollout.num_generations=4",
            "--set", "rollout.max_new_tokens=1"]
    assert main(args) == 0
    first = (out / "pairs.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 2
    one_line_error(capsys)
    assert (out / "pairs.jsonl").read_text() == first


# ----------------------------------------------------------------------------- serve-judge
def test_serve_judge_bounds_requests_and_rejects_unknown_models():
    from uniloop.rewards.server import JudgeServer

    server = JudgeServer(("127.0.0.1", 0), None, "tiny-judge", max_request_bytes=1 << 20)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    try:
        msg = {"messages": [{"role": "user", "content": "hi"}]}
        r = requests.post(url, json={**msg, "model": "someone-else"}, timeout=30)
        assert r.status_code == 404 and "tiny-judge" in r.json()["error"]["message"]
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Length", str(1 << 40))  # 1 TiB announced, 2 bytes sent
        conn.endheaders(b"{}")
        assert conn.getresponse().status == 413
        assert requests.get(url.replace("/v1/chat/completions", "/health"), timeout=30).json() == {"status": "ok"}
    finally:
        server.shutdown()
