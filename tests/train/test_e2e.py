"""End to end on CPU: a few-step run writes everything it promises, and a killed run resumes exactly."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.tiny import cli, tiny
from tsched.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow

def final_params(run_dir, step):
    tree = ocp.StandardCheckpointer().restore(os.path.join(run_dir, "ckpt", "rl", str(step), "state"))
    return tree


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from tsched.train import trainer

    tmp = tmp_path_factory.mktemp("e2e")
    cfg = tiny(base_config(), tmp, "full")
    return tmp, cfg, trainer.run(cfg)


def test_few_step_run_writes_summary_logs_and_checkpoints(uninterrupted):
    _, cfg, path = uninterrupted
    summary = json.load(open(path))
    for key in ("eval_accuracy_before_rl", "eval_accuracy_after_rl", "eval_problems", "wall_time_s"):
        assert key in summary
    assert summary["eval_problems"] == 40
    assert 0.0 <= summary["eval_accuracy_after_rl"] <= 1.0
    rows = [json.loads(ln) for ln in open(os.path.join(cfg.run_dir, "metrics.jsonl"))]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert [r["step"] for r in rl] == list(range(1, 9))
    assert rl[0]["magnitude"] > rl[-1]["magnitude"]  # the schedule moved
    for key in ("reward", "tokens_optimized_frac", "entropy_last10", "kl_bin9", "clip_frac", "sample_s"):
        assert key in rl[0]
    assert os.path.exists(os.path.join(cfg.run_dir, "curves.png"))
    assert os.listdir(os.path.join(cfg.run_dir, "tb"))
    assert sorted(os.listdir(os.path.join(cfg.run_dir, "ckpt", "rl"))) == ["6", "8"]


def test_killed_run_resumes_to_the_same_parameters(uninterrupted):
    tmp, full_cfg, _ = uninterrupted
    cfg = tiny(base_config(), tmp, "killed")
    # Launched from the temp dir with a relative run_dir, as users do from their own working directory.
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = lambda **extra: cli(cfg, os.path.join(ROOT, "configs", "default.py"), run_dir="killed", **extra)
    proc = subprocess.Popen(command(), cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(cfg.run_dir, "ckpt", "rl", "2")
    deadline = time.monotonic() + 600
    while not os.path.isdir(ckpt) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(s) for s in os.listdir(os.path.dirname(ckpt)) if s.isdigit())
    assert done and done[-1] < 8, f"the run was not interrupted mid-RL: checkpoints {done}"

    out = subprocess.run(command(**{"train.resume": True}), cwd=tmp, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed RL at step {done[-1]}" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == os.path.join("killed", "summary.json")

    a, b = final_params(full_cfg.run_dir, 8), final_params(cfg.run_dir, 8)
    flat_a, flat_b = (sorted(_flatten(t).items()) for t in (a, b))
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    for (k, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y, err_msg=k)  # bitwise
    rows = [json.loads(ln) for ln in open(os.path.join(cfg.run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["phase"] == "rl"] == list(range(1, 9))


def test_warm_start_from_another_runs_sft_gives_that_runs_rl_exactly(uninterrupted):
    """sft.warm_start restores the other run's final SFT state instead of training: with the same config the
    RL that follows is the other run's, bitwise (what tsched.study relies on to share one SFT per seed)."""
    from tsched.train import trainer
    from tsched.train.checkpoint import complete_steps

    tmp, full_cfg, full_summary = uninterrupted
    # Its own evaluation before RL, which must equal the other run's: what makes reusing that one sound.
    cfg = tiny(base_config(), tmp, "warm", sft__warm_start=full_cfg.run_dir, eval__reuse_warm_start=False)
    summary = json.load(open(trainer.run(cfg)))
    assert summary["sft_warm_start"] == full_cfg.run_dir and summary["eval_before_rl_from"] == ""
    assert complete_steps(os.path.join(cfg.run_dir, "ckpt", "sft")) == []  # nothing trained, nothing saved
    rows = lambda d: [json.loads(ln) for ln in open(os.path.join(d, "metrics.jsonl"))]
    assert {r["phase"] for r in rows(cfg.run_dir)} == {"rl"}
    timing = ("sample_s", "verify_s", "update_s", "sample_tokens_per_s", "verify_latency_p50_s", "verify_latency_p99_s")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs if r["phase"] == "rl"]
    assert strip(rows(cfg.run_dir)) == strip(rows(full_cfg.run_dir))
    full = json.load(open(full_summary))
    for key in ("eval_per_set_before_rl", "eval_per_set_after_rl"):
        assert summary[key] == full[key]
    a, b = final_params(full_cfg.run_dir, 8), final_params(cfg.run_dir, 8)
    for (k, x), (_, y) in zip(sorted(_flatten(a).items()), sorted(_flatten(b).items())):
        np.testing.assert_array_equal(x, y, err_msg=k)


def test_warm_start_takes_the_other_runs_evaluation_before_rl(uninterrupted, capsys):
    from tsched.train import trainer

    tmp, full_cfg, full_summary = uninterrupted
    cfg = tiny(base_config(), tmp, "warm_reuse", sft__warm_start=full_cfg.run_dir, rl__steps=2,
               rl__credit__strategy="uniform")  # another method: the evaluation before RL is still the same
    summary = json.load(open(trainer.run(cfg)))
    assert f"evaluation before RL: the one of {full_cfg.run_dir}" in capsys.readouterr().out
    assert summary["eval_before_rl_from"] == full_cfg.run_dir
    assert summary["eval_per_set_before_rl"] == json.load(open(full_summary))["eval_per_set_before_rl"]
    assert json.load(open(os.path.join(cfg.run_dir, "eval_before_rl.json"))) == \
        json.load(open(os.path.join(full_cfg.run_dir, "eval_before_rl.json")))


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: np.asarray(tree)}
