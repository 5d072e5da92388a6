"""Multi-host training end to end: `python -m tsched.main` as 2 processes x 4 CPU devices gives the loss curve,
evaluations and final parameters of 1 process x 8 devices, also when both processes are killed in RL and
the run is resumed, by 2 processes or by 1.

The processes find each other through `mesh.coordinator` (jax.distributed, gloo collectives on CPU).
Each reads its block of every batch, scores its own rows and writes its shards of each checkpoint;
process 0 alone writes the run directory's files. The task is a JSONL file of copy problems the tiny
model half learns in its SFT, so that RL sees mixed rewards: a reward scored in the wrong row or lost
between processes changes the curve.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import faults
from tests.tiny import TINY
from tsched import multihost
from tsched.config import ConfigError, base_config
from tsched.train.checkpoint import restore_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_problems(directory) -> dict:
    """train.jsonl / eval.jsonl of 'Repeat 7' -> 'Answer: 7' problems; their config fields."""
    rng = random.Random(0)
    os.makedirs(directory, exist_ok=True)
    for name, n in (("train", 400), ("eval", 40)):
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            for _ in range(n):
                a = rng.randint(0, 19)
                f.write(json.dumps({"problem": f"Repeat {a}", "solution": f"Answer: {a}", "answer": str(a),
                                    "verifier": "exact"}) + "\n")
    return {"data.source": "jsonl", "data.train_files": os.path.join(directory, "train.jsonl"),
            "data.eval_files": os.path.join(directory, "eval.jsonl")}


def _launch(n: int, run_dir, tmp, kill_at=None) -> list[str]:
    """Runs the experiment as `n` processes (n x 8/n devices); with kill_at (an event of process 0, e.g.
    ('rl_step', 5)) SIGKILLs every process there. Returns each process's stdout."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    fields = {**TINY, **_copy_problems(tmp / "jsonl"), "run_dir": run_dir, "data.data_dir": tmp / "data",
              "mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1, "rl.prompts_per_step": 8, "rl.group_size": 4,
              "sft.steps": 60, "sft.lr": 1e-2, "train.resume": "auto"}
    env = dict(faults.env(str(tmp / "jax_cache")), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}")
    procs = []
    for i in range(n):
        own = {"mesh.num_processes": n, "mesh.process_id": i, "mesh.coordinator": f"localhost:{port}"} if n > 1 else {}
        command = [sys.executable, "-m", "tsched.main", "--config=configs/default.py",
                   *(f"--config.{k}={v}" for k, v in {**fields, **own}.items())]
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(tmp / f"{run_dir.name}.{i}.out", "w"), text=True,
                                      stderr=subprocess.PIPE if i == 0 else open(tmp / f"{run_dir.name}.{i}.err", "w")))
    errors = []  # process 0's stderr, read as it comes for the events
    for line in procs[0].stderr:
        errors.append(line)
        if kill_at and line.startswith("tsched-event:") and faults._parse(line) == kill_at:
            for p in procs:
                p.send_signal(signal.SIGKILL)
    codes = [p.wait(timeout=600) for p in procs]
    others = [open(tmp / f"{run_dir.name}.{i}.err").read() for i in range(1, n)]
    if kill_at:
        assert codes == [-signal.SIGKILL] * n, (codes, "".join(errors)[-3000:])
    else:
        assert codes == [0] * n, (codes, "".join(errors)[-3000:], [e[-3000:] for e in others])
    return [open(tmp / f"{run_dir.name}.{i}.out").read() for i in range(n)]


def _assert_same_run(one, other) -> None:
    """`other` logged, evaluated and trained what `one` did, up to float32 rounding."""
    # One log, in order (a resumed run rewrote the steps after its checkpoint)
    rows_one, rows_other = (faults.comparable_rows(str(d / "metrics.jsonl")) for d in (one, other))
    assert [(r["phase"], r["step"]) for r in rows_other] == [(r["phase"], r["step"]) for r in rows_one]
    for a, b in zip(rows_one, rows_other):
        assert a.keys() == b.keys()
        numbers = [k for k in a if not isinstance(a[k], str)]
        # Only the order of the cross-process sums differs (gloo): float32 rounding, which 60 Adam steps
        # grow to 2e-4 relative in a gradient norm here
        np.testing.assert_allclose([b[k] for k in numbers], [a[k] for k in numbers], rtol=1e-3, atol=1e-6,
                                   err_msg=f"{a['phase']} step {a['step']}: {numbers}")
    rewards = [r["reward"] for r in rows_one if r["phase"] == "rl"]
    assert 0 < np.mean(rewards) < 1  # mixed rewards: scoring and its gather matter to the curve

    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, other))
    for k in ("eval_accuracy_before_rl", "eval_accuracy_after_rl", "eval_greedy_accuracy_after_rl", "eval_problems"):
        assert s1[k] == s2[k], k

    p1, p2 = (restore_params(str(d / "ckpt" / "rl" / "8" / "state")) for d in (one, other))
    for (path, a), b in zip(jax.tree.leaves_with_path(p1), jax.tree.leaves(p2)):
        # measured: at most 9e-5 apart (weights up to 1.3) after the 68 steps
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2e-4, err_msg=jax.tree_util.keystr(path))

    # Process 0 alone wrote the run directory's files: one copy of each, no per-process leftovers
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in one.iterdir())


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_killed_and_resumed_equal_one_process(tmp_path):
    one, two, then_one = tmp_path / "one", tmp_path / "two", tmp_path / "then_one"
    _launch(1, one, tmp_path)
    _launch(2, two, tmp_path, kill_at=("rl_step", 5))  # the last checkpoint is step 4
    assert not (two / "summary.json").exists()
    shutil.copytree(two, then_one)

    out = _launch(2, two, tmp_path)
    assert "resumed RL at step 4" in out[0] and "eval after RL" in out[0]
    assert "eval after RL" not in out[1]  # progress lines come from process 0 only
    _assert_same_run(one, two)

    # The same checkpoints resume under another process count (each process's data position is the step)
    out = _launch(1, then_one, tmp_path)
    assert "resumed RL at step 4" in out[0]
    _assert_same_run(one, then_one)


@pytest.mark.parametrize("fields, named", [
    ({"num_processes": -1}, "mesh.num_processes"),
    ({"num_processes": 2, "process_id": 2, "coordinator": "h:1"}, "mesh.process_id"),
    ({"num_processes": 2, "process_id": -1, "coordinator": "h:1"}, "mesh.process_id"),
    ({"num_processes": 2, "process_id": 0, "coordinator": ""}, "mesh.coordinator"),
    ({"num_processes": 2, "process_id": 0, "coordinator": "host"}, "mesh.coordinator"),
    ({"num_processes": 1, "process_id": 1}, "mesh.process_id"),
])
def test_bad_process_fields_name_the_field_before_jax_starts(fields, named):
    cfg = base_config()
    cfg.mesh.update(fields)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        multihost.initialize(cfg.mesh)


def test_one_process_is_the_identity():
    x = {"a": np.arange(6).reshape(3, 2), "b": np.array([True, False, True])}
    assert multihost.all_rows(x) is x and multihost.own_rows(x) is x
    assert multihost.agree(True, False) == (True, False)
    assert np.array_equal(multihost.fetch(jax.numpy.arange(4)), np.arange(4))
    assert multihost.main_first(lambda: 7, "unused") == 7
